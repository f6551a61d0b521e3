"""Which parameters are pruned, and how sparse each one is.

This is the *distribution* axis of a pruning method: a :class:`Selection` says
which leaves of a parameter tree are pruned, and :func:`resolve` turns it and a
global target sparsity into one :class:`LeafSpec` (or ``None``) per leaf.

Parameters are named by '/'-joined paths (:func:`path_str`), the same for plain
dicts, Flax linen params (``'params/Dense_0/kernel'``) and ``flax.nnx.State``
(``'blocks/0/kernel'``: the trailing ``.value`` of an ``nnx.Variable`` is
dropped). Selections are regexes matched with ``re.search`` against these paths.

Default rule (``include=None``): every floating-point leaf with ``ndim >= 2``
whose path does not match :data:`DEFAULT_EXCLUDE` (embeddings and the output
head, which are known to be sensitive to pruning). Biases and norm scales
(``ndim == 1``) are never selected by the default rule.

N:M axis. The default N:M axis is the *input* (reduction) axis of a Flax
kernel: axis 0 of an ``(in, out)`` Dense kernel, axis ``ndim - 2`` (the ``I`` of
``HWIO``) of a conv kernel. Groups of ``m`` consecutive weights along the
reduction axis are what 2:4 sparse tensor cores need (``y = x @ W`` with ``W``
sparse along the dimension that is summed over). JaxPruner groups along the
last (output) axis for Flax kernels, which gives masks the hardware cannot use.
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

from jaxprune import _checks
from jaxprune.masks import default_nm_axis

#: Paths excluded by the default rule: token/position embeddings (nnx
#: ``embedding``, linen ``Embed_0``, ``pos_embed``, GPT-2 ``wte``/``wpe``) and
#: the output head (``head``, ``lm_head``, ``logits``). Case-insensitive.
DEFAULT_EXCLUDE = r"(?i)embed|logits|(^|/)(lm_)?head(_\d+)?(/|$)|(^|/)(wte|wpe)(/|$)"

DISTRIBUTIONS = ("uniform", "erk")
OVERRIDE_KEYS = ("sparsity", "axis")

_DROPPED_ATTRS = ("value", "raw_value")
_MAX_LISTED_PATHS = 20


# --------------------------------------------------------------------------- #
# Paths.
# --------------------------------------------------------------------------- #


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(key_path: Sequence[Any]) -> str:
  """'/'-joined names of a ``jax.tree_util`` key path.

  A trailing ``GetAttrKey('value')`` (or ``'raw_value'``), as found on the leaves
  of ``flax.nnx.State``, is dropped, so that
  ``(DictKey('blocks'), DictKey(0), DictKey('kernel'), GetAttrKey('value'))``
  becomes ``'blocks/0/kernel'``.
  """
  keys = list(key_path)
  if (keys and isinstance(keys[-1], jax.tree_util.GetAttrKey)
      and keys[-1].name in _DROPPED_ATTRS):
    keys = keys[:-1]
  return "/".join(_key_name(k) for k in keys)


def _flatten(params) -> tuple[list[str], list[Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [path_str(p) for p, _ in flat], [leaf for _, leaf in flat]


def leaf_paths(params) -> list[str]:
  """:func:`path_str` of every leaf, in ``jax.tree_util.tree_leaves`` order."""
  return _flatten(params)[0]


def _shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of an array, ``jax.ShapeDtypeStruct`` or Python scalar."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), leaf.dtype
  leaf = np.asarray(leaf)
  return leaf.shape, leaf.dtype


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
  regexes = (value,) if isinstance(value, str) else tuple(value)
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

  def __post_init__(self):
    # Normalise here too, so that `Selection(...)` validates like `select(...)`.
    set_ = object.__setattr__
    set_(self, "include", _as_regexes("include", self.include))
    set_(self, "exclude", _as_regexes("exclude", self.exclude) or ())
    overrides = self.overrides
    items = overrides.items() if isinstance(overrides, Mapping) else (overrides or ())
    checked = []
    for regex, settings in items:
      _as_regexes("overrides", regex)
      checked.append((regex, _as_override(regex, settings)))
    set_(self, "overrides", tuple(checked))
    if self.distribution not in DISTRIBUTIONS:
      raise ValueError(
          f"`distribution` must be one of {DISTRIBUTIONS}, got {self.distribution!r}.")
    set_(self, "prune_embeddings", bool(self.prune_embeddings))

  def selects(self, path: str, shape: Sequence[int], dtype) -> bool:
    """Whether the rule (include/exclude/default) selects a leaf; no error checks."""
    if any(re.search(r, path) for r in self.exclude):
      return False
    if self.include is not None:
      return any(re.search(r, path) for r in self.include)
    if not self.prune_embeddings and re.search(DEFAULT_EXCLUDE, path):
      return False
    return len(shape) >= 2 and jnp.issubdtype(dtype, jnp.floating)

  def override(self, path: str) -> Override | None:
    """The first override (in mapping order) whose regex matches ``path``."""
    for regex, settings in self.overrides:
      if re.search(regex, path):
        return settings
    return None


def select(
    include: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    prune_embeddings: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    distribution: str = "uniform",
) -> Selection:
  """Selects the parameters to prune.

  Args:
    include: regex or sequence of regexes, matched with ``re.search`` against
      each leaf's :func:`path_str`; a leaf is selected when any matches. An
      explicit ``include`` replaces the default rule entirely (no dtype, ndim or
      embedding filter). ``None``: the default rule, every floating-point leaf
      with ``ndim >= 2`` except paths matching :data:`DEFAULT_EXCLUDE`.
    exclude: regex or sequence of regexes; matching leaves are never selected.
    prune_embeddings: with the default rule, also select embeddings and the
      output head (drops :data:`DEFAULT_EXCLUDE`).
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
  )


# --------------------------------------------------------------------------- #
# Resolution against a parameter tree.
# --------------------------------------------------------------------------- #


class LeafSpec(NamedTuple):
  """How one leaf is pruned: target ``sparsity`` and N:M ``axis`` (non-negative)."""

  path: str
  sparsity: float
  axis: int


class _Planned(NamedTuple):
  path: str
  shape: tuple[int, ...]
  axis: int
  fixed_sparsity: float | None  # From an override, else None.


def _plan(selection: Selection, params) -> list[_Planned | None]:
  """Selected leaves with their axis and override; raises on inconsistent selections."""
  paths, leaves = _flatten(params)
  for regex in selection.include or ():
    if not any(re.search(regex, p) for p in paths):
      raise ValueError(
          f"`include` regex {regex!r} matches no leaf; available paths: {_listing(paths)}.")
  plan: list[_Planned | None] = []
  used_overrides = set()
  for path, leaf in zip(paths, leaves, strict=True):
    shape, dtype = _shape_dtype(leaf)
    if not selection.selects(path, shape, dtype):
      plan.append(None)
      continue
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(f"integer leaves cannot be pruned: {path} (dtype {dtype}); "
                       "narrow `include` or add it to `exclude`.")
    if not shape:
      raise ValueError(f"scalar leaves cannot be pruned: {path}; "
                       "narrow `include` or add it to `exclude`.")
    used_overrides.update(r for r, _ in selection.overrides if re.search(r, path))
    override = selection.override(path) or Override()
    axis = default_nm_axis(len(shape)) if override.axis is None else override.axis
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"`axis` {axis} is out of range for {path} with shape {shape}: "
                       f"must be in [{-len(shape)}, {len(shape)}).")
    plan.append(_Planned(path, shape, axis % len(shape), override.sparsity))
  if all(p is None for p in plan):
    raise ValueError(f"the selection selects no leaf ({selection}); "
                     f"available paths: {_listing(paths)}.")
  selected = [p.path for p in plan if p is not None]
  for regex, _ in selection.overrides:
    if regex not in used_overrides:
      raise ValueError(f"`overrides` regex {regex!r} matches no selected leaf; "
                       f"selected paths: {_listing(selected)}.")
  return plan


def resolve(
    selection: Selection,
    params,
    sparsity: float,
    *,
    m: int | None = None,
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
    m: if given, the N:M group size; every pruned leaf must have
      ``shape[axis] % m == 0``.

  Returns:
    One entry per leaf in ``jax.tree_util.tree_leaves(params)`` order:
    a :class:`LeafSpec` for pruned leaves, ``None`` for the others.
  """
  _checks.check_sparsity("sparsity", sparsity)
  sparsity = float(sparsity)
  if m is not None:
    m = _checks.check_int("m", m, minimum=1)
  plan = _plan(selection, params)
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
    if p.fixed_sparsity == 0.0:
      continue
    if m is not None and p.shape[p.axis] % m:
      raise ValueError(f"{p.path}: size {p.shape[p.axis]} of axis {p.axis} (shape {p.shape}) "
                       f"is not divisible by m={m}; set another `axis` or override "
                       "its sparsity to 0 to keep it dense.")
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
