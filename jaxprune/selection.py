"""Which parameters are pruned, and how sparse each one is.

This is the *distribution* axis of a pruning method: a :class:`Selection` says
which leaves of a parameter tree are pruned, and :func:`resolve` turns it and a
global target sparsity into one :class:`LeafSpec` (or ``None``) per leaf.

Parameters are named by '/'-joined paths (:func:`path_str`), the same for plain
dicts, Flax linen params (``'params/Dense_0/kernel'``), ``flax.nnx.State``
(``'blocks/0/kernel'``: the trailing ``.value`` of an ``nnx.Variable`` is
dropped) and Equinox modules (``'layers/0/weight'``). Selections are regexes
matched with ``re.search`` against these paths.

Default rule (``include=None``): the layer decides, not the rank. Every
*kernel* (:mod:`jaxprune.layouts`: a floating-point leaf with ``ndim >= 2``
that is not a bias, a norm scale or an embedding, whatever its rank) except
the output head (:func:`jaxprune.layouts.head_paths`: a kernel named like
``head``/``lm_head``/``logits``, else the last layer of the tree).

N:M axis. A kernel's grouping axis is the innermost axis its layer sums over
(:mod:`jaxprune.layouts`): ``in`` of a Flax ``(in, out)`` Dense kernel and of
an Equinox ``(out, in)`` Linear weight, the input channels of a conv (``I`` of
``HWIO``, ``in`` of Equinox's ``(out, in, kh, kw)``), ``head_dim`` of an
attention output ``(heads, head_dim, out)``. Groups of ``m`` consecutive
weights along it are what 2:4 sparse tensor cores need. JaxPruner groups
along the last (output) axis of Flax kernels, which the hardware cannot use.
With a group size ``m`` (:func:`resolve`), a layer whose grouping axis ``m``
does not divide is skipped and stays dense, as NVIDIA's ASP does (e.g. the
first conv of an MNIST CNN, with one input channel); an explicit ``include``
or ``axis`` override that names such a layer raises instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _checks, layouts
from jaxprune.layouts import path_str

#: Paths excluded by name by the default rule: token/position embeddings (nnx
#: ``embedding``, linen ``Embed_0``, ``pos_embed``, GPT-2 ``wte``/``wpe``) and
#: the output head (``head``, ``lm_head``, ``logits``). Case-insensitive.
DEFAULT_EXCLUDE = r"(?i)embed|logits|(^|/)(lm_)?head(_\d+)?(/|$)|(^|/)(wte|wpe)(/|$)"

DISTRIBUTIONS = ("uniform", "erk")
OVERRIDE_KEYS = ("sparsity", "axis")

_MAX_LISTED_PATHS = 20


# --------------------------------------------------------------------------- #
# Paths.
# --------------------------------------------------------------------------- #


def _flatten(params) -> tuple[list[str], list[Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [path_str(p) for p, _ in flat], [leaf for _, leaf in flat]


def leaf_paths(params) -> list[str]:
  """:func:`path_str` of every leaf, in ``jax.tree_util.tree_leaves`` order."""
  return _flatten(params)[0]


def _listing(paths: Sequence[str]) -> str:
  shown = ", ".join(repr(p) for p in paths[:_MAX_LISTED_PATHS])
  if len(paths) > _MAX_LISTED_PATHS:
    shown += f", ... ({len(paths) - _MAX_LISTED_PATHS} more)"
  return f"[{shown}]"


# --------------------------------------------------------------------------- #
# Selection.
# --------------------------------------------------------------------------- #


class Override(NamedTuple):
  """Per-parameter settings; ``None`` keeps the value from the distribution/default."""

  sparsity: float | None = None
  axis: int | None = None


def _as_regexes(name: str, value) -> tuple[str, ...] | None:
  if value is None:
    return None
  if isinstance(value, str):
    regexes = (value,)
  elif isinstance(value, Sequence):
    regexes = tuple(value)
  else:
    raise ValueError(f"`{name}` must be a regex string or a sequence of them, got {value!r}.")
  for regex in regexes:
    if not isinstance(regex, str):
      raise ValueError(f"`{name}` must be a regex string or a sequence of them, got {regex!r}.")
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f"`{name}` regex {regex!r} does not compile: {e}.") from e
  return regexes


def _as_override(regex: str, settings) -> Override:
  if isinstance(settings, Override):
    settings = settings._asdict()
  if not isinstance(settings, Mapping):
    raise ValueError(
        f"`overrides[{regex!r}]` must be a dict with keys among {OVERRIDE_KEYS}, "
        f"got {settings!r}.")
  unknown = sorted(set(settings) - set(OVERRIDE_KEYS))
  if unknown:
    raise ValueError(
        f"`overrides[{regex!r}]` has unknown keys {unknown}; valid keys: {OVERRIDE_KEYS}.")
  sparsity = settings.get("sparsity")
  if sparsity is not None:
    _checks.check_sparsity(f"overrides[{regex!r}]['sparsity']", sparsity)
    sparsity = float(sparsity)
  axis = settings.get("axis")
  if axis is not None:
    axis = _checks.check_int(f"overrides[{regex!r}]['axis']", axis)
  return Override(sparsity, axis)


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which leaves are pruned, per-leaf overrides, and the sparsity distribution.

  Build it with :func:`select`, which documents the fields. Immutable and
  hashable, so it can be a static argument.
  """

  include: tuple[str, ...] | None = None
  exclude: tuple[str, ...] = ()
  prune_embeddings: bool = False
  overrides: tuple[tuple[str, Override], ...] = ()
  distribution: str = "uniform"
  head: str | None = "auto"

  def __post_init__(self):
    # Normalise here too, so that `Selection(...)` validates like `select(...)`.
    set_ = object.__setattr__
    set_(self, "include", _as_regexes("include", self.include))
    set_(self, "exclude", _as_regexes("exclude", self.exclude) or ())
    overrides = self.overrides
    if isinstance(overrides, Mapping):
      items = overrides.items()
    elif isinstance(overrides, Sequence):
      items = overrides
    else:
      raise ValueError(f"`overrides` must be a dict regex -> settings, got {overrides!r}.")
    checked = []
    for regex, settings in items:
      _as_regexes("overrides", regex)
      checked.append((regex, _as_override(regex, settings)))
    set_(self, "overrides", tuple(checked))
    if self.distribution not in DISTRIBUTIONS:
      raise ValueError(
          f"`distribution` must be one of {DISTRIBUTIONS}, got {self.distribution!r}.")
    if not isinstance(self.prune_embeddings, bool | np.bool_):
      raise ValueError(f"`prune_embeddings` must be a bool, got {self.prune_embeddings!r}.")
    set_(self, "prune_embeddings", bool(self.prune_embeddings))
    if self.head is not None and self.head != "auto":
      _as_regexes("head", self.head)
      if not isinstance(self.head, str):
        raise ValueError(f"`head` must be 'auto', a regex or None, got {self.head!r}.")

  def override(self, path: str) -> Override | None:
    """The first override (in mapping order) whose regex matches ``path``."""
    for regex, settings in self.overrides:
      if re.search(regex, path):
        return settings
    return None

  def heads(self, infos: Sequence[layouts.LeafInfo]) -> set[str]:
    """Paths of the output head(s) the default rule leaves out."""
    if self.head is None or (self.head == "auto" and self.prune_embeddings):
      return set()
    if self.head == "auto":
      return set(layouts.head_paths(infos))
    return {i.path for i in infos if re.search(self.head, i.path)}

  def chooses(self, info: layouts.LeafInfo, heads: set[str]) -> bool:
    """Whether the rule (include/exclude/default) selects a leaf; no error checks."""
    if any(re.search(r, info.path) for r in self.exclude):
      return False
    if self.include is not None:
      return any(re.search(r, info.path) for r in self.include)
    if info.path in heads:
      return False
    if self.prune_embeddings and info.kind == "embedding":
      return len(info.shape) >= 2 and jnp.issubdtype(info.dtype, jnp.floating)
    return info.kind == "kernel" and jnp.issubdtype(info.dtype, jnp.floating)


def select(
    include: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    prune_embeddings: bool = False,
    head: str | None = "auto",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    distribution: str = "uniform",
) -> Selection:
  """Selects the parameters to prune.

  Args:
    include: regex or sequence of regexes, matched with ``re.search`` against
      each leaf's :func:`path_str`; a leaf is selected when any matches. An
      explicit ``include`` replaces the default rule entirely (no kind, head
      or embedding filter). ``None``: the default rule, every kernel
      (:mod:`jaxprune.layouts`; never a bias, norm scale or embedding,
      whatever its rank) except the output head.
    exclude: regex or sequence of regexes; matching leaves are never selected.
    prune_embeddings: with the default rule, also select embeddings and (with
      ``head='auto'``) the output head.
    head: the output head, which the default rule leaves dense: ``'auto'``
      (kernels named ``head``/``lm_head``/``logits``, else the last layer of
      the tree; see :func:`jaxprune.layouts.head_paths`), a regex naming it,
      or ``None`` to prune it like any other kernel.
    overrides: mapping ``regex -> {'sparsity': s, 'axis': a}`` (either key may be
      left out). ``sparsity`` in [0, 1) replaces the distribution's target for
      that leaf; 0 keeps the leaf dense (it is then not pruned at all, N:M
      included). ``axis`` is the N:M grouping axis (negative allowed). The
      *first* regex in mapping order that matches a path wins; later matching
      entries are ignored for that leaf.
    distribution: ``'uniform'`` (every selected leaf at the global sparsity) or
      ``'erk'`` (Erdos-Renyi-Kernel, :func:`erk_sparsities`).

  Returns:
    A :class:`Selection`; apply it to a parameter tree with :func:`resolve`.
  """
  return Selection(
      include=include,
      exclude=exclude,
      prune_embeddings=prune_embeddings,
      overrides=overrides or (),
      distribution=distribution,
      head=head,
  )


# --------------------------------------------------------------------------- #
# Resolution against a parameter tree.
# --------------------------------------------------------------------------- #


class LeafSpec(NamedTuple):
  """How one leaf is pruned: target ``sparsity`` and N:M ``axis`` (non-negative)."""

  path: str
  sparsity: float
  axis: int


class Skipped(NamedTuple):
  """A layer the default rule would prune but that stays dense: its ``axis`` cannot be tiled."""

  path: str
  shape: tuple[int, ...]
  axis: int
  reason: str


class Planned(NamedTuple):
  """A selected leaf: its grouping ``axis`` (non-negative) and its override's sparsity."""

  path: str
  shape: tuple[int, ...]
  axis: int
  fixed_sparsity: float | None  # From an override, else None.


def _check_leaf(info: layouts.LeafInfo) -> None:
  """Raises for an explicitly selected leaf that cannot be pruned."""
  if info.dtype is not None and jnp.issubdtype(info.dtype, jnp.bool_):
    raise ValueError(f"bool leaves cannot be pruned: {info.path}; "
                     "narrow `include` or add it to `exclude`.")
  if not jnp.issubdtype(info.dtype, jnp.inexact):
    raise ValueError(f"integer leaves cannot be pruned: {info.path} (dtype {info.dtype}); "
                     "narrow `include` or add it to `exclude`.")
  if not info.shape:
    raise ValueError(f"scalar leaves cannot be pruned: {info.path}; "
                     "narrow `include` or add it to `exclude`.")


def _leaf_axis(info: layouts.LeafInfo, override: Override, axis: int | None) -> int:
  """The grouping axis of a selected leaf: override, then ``axis``, then its layout."""
  chosen = override.axis if override.axis is not None else axis
  if chosen is None:
    chosen = info.axis
  if chosen is None:
    raise ValueError(
        f"cannot infer the N:M / quantization axis of {info.path} with shape {info.shape} "
        f"({info.rule}); give it: the transform's `axis=`, or "
        f"select(overrides={{{info.path!r}: {{'axis': a}}}}) with `a` the innermost axis its "
        "layer sums over (jaxprune.einsum_axis(spec) computes it for an Einsum kernel).")
  ndim = len(info.shape)
  if not -ndim <= chosen < ndim:
    raise ValueError(f"`axis` {chosen} is out of range for {info.path} with shape "
                     f"{info.shape}: must be in [{-ndim}, {ndim}).")
  return chosen % ndim


def _check_arrays(infos: Sequence[layouts.LeafInfo]) -> None:
  bad = [i.path for i in infos if i.dtype is None]
  if bad:
    raise ValueError(
        f"`params` has leaves that are not arrays: {_listing(bad)}. Pass only the arrays, "
        "e.g. eqx.filter(model, eqx.is_array) for an Equinox model.")


def plan_leaves(
    selection: Selection,
    params,
    *,
    m: int | None = None,
    axis: int | None = None,
) -> tuple[list[Planned | None], tuple[Skipped, ...]]:
  """Selected leaves with their grouping axis, and the layers skipped because ``m`` cannot tile.

  The one place where a selection meets a parameter tree: :func:`resolve`,
  the pruning transforms and :func:`jaxprune.sparsity_summary` all go
  through it.

  Args:
    selection: from :func:`select`.
    params: parameter tree; leaves may be arrays or ``jax.ShapeDtypeStruct``.
    m: the size the grouping axis must be a multiple of (the N:M group size),
      or None. A leaf chosen by the default rule whose axis ``m`` does not
      divide is skipped (kept dense) and listed; one named by ``include`` or
      by an ``axis`` override raises.
    axis: the grouping axis of every leaf without an ``axis`` override (the
      transform's ``axis=``); None: each leaf's layout (:mod:`jaxprune.layouts`).

  Returns:
    One :class:`Planned` or None per leaf (``jax.tree.leaves`` order), and the
    skipped layers. Zero-size leaves are never planned (nothing to prune).
  """
  infos = layouts.describe(params)
  _check_arrays(infos)
  paths = [i.path for i in infos]
  for regex in selection.include or ():
    if not any(re.search(regex, p) for p in paths):
      raise ValueError(
          f"`include` regex {regex!r} matches no leaf; available paths: {_listing(paths)}.")
  if selection.head not in (None, "auto") and not any(re.search(selection.head, p)
                                                        for p in paths):
    raise ValueError(
        f"`head` regex {selection.head!r} matches no leaf; available paths: {_listing(paths)}.")
  heads = selection.heads(infos)
  plan: list[Planned | None] = []
  skipped: list[Skipped] = []
  used_overrides = set()
  for info in infos:
    if not selection.chooses(info, heads):
      plan.append(None)
      continue
    _check_leaf(info)
    used_overrides.update(r for r, _ in selection.overrides if re.search(r, info.path))
    override = selection.override(info.path) or Override()
    if override.sparsity == 0.0 or math.prod(info.shape) == 0:
      plan.append(None if math.prod(info.shape) == 0 else Planned(
          info.path, info.shape, 0, 0.0))
      continue
    leaf_axis = _leaf_axis(info, override, axis)
    size = info.shape[leaf_axis]
    if m is not None and size % m:
      if selection.include is not None or override.axis is not None:
        raise ValueError(
            f"{info.path}: size {size} of axis {leaf_axis} (shape {info.shape}) is not "
            f"divisible by m={m}; set another `axis` or override its sparsity to 0 to keep "
            "it dense.")
      skipped.append(Skipped(info.path, info.shape, leaf_axis,
                             f"m={m} does not divide size {size} of axis {leaf_axis}"))
      plan.append(None)
      continue
    plan.append(Planned(info.path, info.shape, leaf_axis, override.sparsity))
  if all(p is None for p in plan):
    if skipped:
      raise ValueError(
          f"every selected layer is skipped because its grouping axis cannot be tiled: "
          f"{_listing([f'{s.path} {s.shape}: {s.reason}' for s in skipped])}; give an "
          "`axis` that m divides, or select other layers.")
    raise ValueError(f"the selection selects no leaf ({selection}); "
                     f"available paths: {_listing(paths)}.")
  selected = [p.path for p in plan if p is not None] + [s.path for s in skipped]
  for regex, _ in selection.overrides:
    if regex not in used_overrides:
      raise ValueError(f"`overrides` regex {regex!r} matches no selected leaf; "
                       f"selected paths: {_listing(selected)}.")
  return plan, tuple(skipped)


def resolve(
    selection: Selection,
    params,
    sparsity: float,
    *,
    m: int | None = None,
    axis: int | None = None,
) -> list[LeafSpec | None]:
  """Per-leaf pruning specs for ``params`` at global target ``sparsity``.

  Each selected leaf gets its target from ``selection.distribution``
  (uniform: ``sparsity``; ERK: :func:`erk_sparsities` over the selected leaves
  without a sparsity override, as rigl does with its ``custom_sparsity_map``:
  overridden leaves keep their own target and are outside the ERK budget).
  Leaves whose override sparsity is 0 are kept dense and resolve to ``None``.

  Args:
    selection: from :func:`select`.
    params: parameter tree; leaves may be arrays or ``jax.ShapeDtypeStruct``.
    sparsity: global target in [0, 1).
    m: if given, the N:M group size: layers of the default rule whose grouping
      axis it does not divide are skipped (``None``, see :func:`plan_leaves`);
      explicitly named ones raise.
    axis: the grouping axis of leaves without an ``axis`` override; None:
      each leaf's layout.

  Returns:
    One entry per leaf in ``jax.tree_util.tree_leaves(params)`` order:
    a :class:`LeafSpec` for pruned leaves, ``None`` for the others.
  """
  _checks.check_sparsity("sparsity", sparsity)
  sparsity = float(sparsity)
  if m is not None:
    m = _checks.check_int("m", m, minimum=1)
  if axis is not None:
    axis = _checks.check_int("axis", axis)
  plan, _ = plan_leaves(selection, params, m=m, axis=axis)
  return specs_of(selection, plan, sparsity)


def specs_of(selection: Selection, plan: Sequence[Planned | None],
             sparsity: float) -> list[LeafSpec | None]:
  """Each planned leaf's :class:`LeafSpec` at global target ``sparsity`` (:func:`resolve`)."""
  chosen = {str(i): p for i, p in enumerate(plan) if p is not None}
  targets = {k: p.fixed_sparsity for k, p in chosen.items() if p.fixed_sparsity is not None}
  free = {k: p.shape for k, p in chosen.items() if p.fixed_sparsity is None}
  if selection.distribution == "erk" and free:
    # As rigl: overridden layers stay out of the ERK budget, which the others share.
    targets.update(erk_sparsities(free, sparsity))
  else:
    targets.update({k: sparsity for k in free})
  specs: list[LeafSpec | None] = [None] * len(plan)
  for k, p in chosen.items():
    if p.fixed_sparsity != 0.0:
      specs[int(k)] = LeafSpec(p.path, targets[k], p.axis)
  return specs


# --------------------------------------------------------------------------- #
# Erdos-Renyi-Kernel.
# --------------------------------------------------------------------------- #


def erk_sparsities(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    *,
    power_scale: float = 1.0,
    fixed: Mapping[str, float] | None = None,
) -> dict[str, float]:
  """Erdos-Renyi-Kernel per-layer sparsities.

  Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners"
  (https://arxiv.org/abs/1911.11134), following ``get_sparsities_erdos_renyi``
  in google-research/rigl. Layer ``l`` with shape ``(n_1, ..., n_k)`` and size
  ``N_l`` gets density

      d_l = min(1, eps * p_l),   p_l = ((n_1 + ... + n_k) / (n_1 * ... * n_k)) ** power_scale,

  where the one global scale ``eps`` solves

      sum_l d_l * N_l = (1 - sparsity) * sum_l N_l.

  Layers with ``eps * p_l > 1`` are made dense and ``eps`` is recomputed over the
  rest, until no layer exceeds 1 (raising ``eps`` never brings a dense layer
  back, so all offenders are moved at once). Densities are never above 1,
  unlike the over-allocating variant reported in sparse_learning issue 20.

  ``fixed`` layers keep their given sparsity and their non-zeros count against
  the global budget: the total over *all* layers is ``(1 - sparsity) * sum N_l``,
  and the free layers share what the fixed ones leave. (rigl instead leaves
  custom layers out of the budget; to get that, call this function on the free
  layers only and add the fixed sparsities yourself.)

  The returned sparsities are real numbers; the total non-zero count matches the
  target exactly before each layer rounds its own count (so within one per
  layer after rounding).

  Args:
    shapes: layer name -> shape.
    sparsity: global target in [0, 1).
    power_scale: exponent on the ERK ratio; < 1 makes the distribution closer to
      uniform, 0 is uniform.
    fixed: layer name -> sparsity in [0, 1) for layers not distributed by ERK.

  Returns:
    Layer name -> sparsity in [0, 1), for every name in ``shapes``.
  """
  _checks.check_sparsity("sparsity", sparsity)
  fixed = dict(fixed or {})
  unknown = sorted(set(fixed) - set(shapes))
  if unknown:
    raise ValueError(f"`fixed` names {unknown} are not in `shapes`.")
  for name, s in fixed.items():
    _checks.check_sparsity(f"fixed[{name!r}]", s)
  sizes = {name: math.prod(shape) for name, shape in shapes.items()}
  budget = (1.0 - sparsity) * sum(sizes.values())
  budget -= sum((1.0 - s) * sizes[n] for n, s in fixed.items())
  densities = {n: 1.0 - s for n, s in fixed.items()}
  densities.update({n: 1.0 for n in shapes if n not in fixed and sizes[n] == 0})
  free = [n for n in shapes if n not in densities]
  if free:
    free_size = sum(sizes[n] for n in free)
    if budget <= 0.0:
      raise ValueError(
          f"`fixed` layers hold more non-zeros than the global `sparsity`={sparsity} "
          "allows; nothing is left for the other layers.")
    if budget > free_size * (1.0 + 1e-9):
      raise ValueError(
          f"`fixed` layers are too sparse for the global `sparsity`={sparsity}: even with "
          "every other layer dense the total is sparser than the target.")
    raw = {n: (sum(shapes[n]) / sizes[n]) ** power_scale for n in free}
    densities.update(_scaled_densities(raw, sizes, budget))
  return {n: fixed[n] if n in fixed else 1.0 - densities[n] for n in shapes}


def _scaled_densities(
    raw: Mapping[str, float], sizes: Mapping[str, int], budget: float
) -> dict[str, float]:
  """``min(1, eps * raw)`` with ``eps`` such that the non-zeros sum to ``budget``."""
  densities = {}
  free = list(raw)
  while free:
    eps = budget / sum(raw[n] * sizes[n] for n in free)
    too_dense = [n for n in free if eps * raw[n] > 1.0]
    if not too_dense:
      break
    for n in too_dense:
      densities[n] = 1.0
      budget -= sizes[n]
    free = [n for n in free if n not in too_dense]
  densities.update({n: min(1.0, eps * raw[n]) for n in free})
  return densities
