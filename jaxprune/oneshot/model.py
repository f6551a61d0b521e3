"""One call to prune and/or quantize a trained model, calibrating layer by layer.

:func:`prune` runs the layer-level methods of :mod:`jaxprune.oneshot` on every
selected layer of a Flax NNX or linen model, in the order the forward pass
calls them, as the papers do (SparseGPT, Wanda and GPTQ's sequential mode):

1. One abstract forward pass (``jax.eval_shape``) finds the calls of the
   selected layers (:mod:`jaxprune.oneshot.layers`). Layers that read the same
   input tensor (attention's query, key and value) form one *stage* and share
   one Hessian.
2. For each stage in order, the calibration batches run through the model as
   it is now, with every earlier stage already pruned, and the stage's
   ``H = 2 X^T X`` is accumulated in float32 (one ``in x in`` Hessian in
   memory at a time; per kernel batch index for kernels with batch axes).
   The forward pass is jitted with the batches sharded over ``mesh``'s data
   axis, so the sum over tokens is data-parallel (an all-reduce).
3. Each layer of the stage is pruned/quantized from that Hessian, and the
   report records its relative reconstruction error
   ``||X W - X W'||^2 / ||X W||^2 = tr(dW^T H dW) / tr(W^T H W)``, its sparsity
   and the time taken.

``select`` chooses layers exactly as the pruning transforms do
(:func:`jaxprune.select`, :func:`jaxprune.selection.resolve`): the same paths,
per-layer sparsities (uniform, ERK, overrides) and N:M axes. OWL
(``distribution='owl'``) replaces the per-layer targets by OWL's, computed
from a first pass over the unpruned model.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import _checks, quant
from jaxprune import pruning as pruning_lib
from jaxprune import selection as selection_lib
from jaxprune.oneshot import _args, calibration, grids, layers
from jaxprune.oneshot.gptq import gptq
from jaxprune.oneshot.owl import outlier_ratio, owl_sparsities
from jaxprune.oneshot.sparsegpt import sparsegpt
from jaxprune.oneshot.wanda import magnitude, wanda

METHODS = ("magnitude", "wanda", "sparsegpt")
QUANTIZERS = ("gptq", "rtn")
DISTRIBUTIONS = ("uniform", "owl")
#: OWL's layers: the shortest path prefix ending in a numbered component ('layers/3',
#: 'params/Block_3'); a kernel outside any is its own layer.
OWL_GROUP = r"^.*?[/_]\d+(?=/)"
HIGHEST = jax.lax.Precision.HIGHEST


class CalibrationWarning(UserWarning):
  """The calibration set is too small for a full-rank Hessian."""


class LayerReport(NamedTuple):
  """What :func:`prune` did to one kernel."""

  path: str
  shape: tuple[int, ...]
  target: str          # '50.0%', '2:4', 'int4', '2:4+int4', ...
  sparsity: float      # fraction of exact zeros after
  error: float | None  # ||X W - X W'||^2 / ||X W||^2 on the calibration inputs (None: no data)
  tokens: int          # calibration tokens the Hessian was built from
  seconds: float       # the method on this kernel (compilation included)
  calibration_seconds: float   # the Hessian of its stage (shared by the stage's kernels)


@dataclasses.dataclass(frozen=True)
class OneShotReport:
  """Per-kernel rows and totals; ``table()`` prints them."""

  layers: tuple[LayerReport, ...]
  seconds: float
  devices: int

  def table(self) -> str:
    head = ("path", "shape", "target", "sparsity", "rel. error", "tokens", "method s", "calib s")
    rows = [(r.path, str(r.shape), r.target, f"{r.sparsity:.2%}",
             "-" if r.error is None else f"{r.error:.4g}", str(r.tokens),
             f"{r.seconds:.2f}", f"{r.calibration_seconds:.2f}") for r in self.layers]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    size = sum(math.prod(r.shape) for r in self.layers)
    zeros = sum(r.sparsity * math.prod(r.shape) for r in self.layers)
    lines.append(f"{len(self.layers)} kernels, {size} weights, {zeros / max(size, 1):.2%} zero; "
                 f"{self.seconds:.1f} s on {self.devices} device(s)")
    return "\n".join(lines)

  def as_dict(self) -> dict:
    return {"seconds": self.seconds, "devices": self.devices,
            "layers": [r._asdict() for r in self.layers]}


class OneShotResult(NamedTuple):
  """``params``: the new parameters (NNX: ``nnx.State`` of ``nnx.Param``, also written into the
  model; linen: the variables); ``masks``: path -> kept mask of each pruned kernel;
  ``report``: an :class:`OneShotReport`."""

  params: Any
  masks: dict[str, jax.Array]
  report: OneShotReport


# --------------------------------------------------------------------------- #
# What to do to each kernel.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _Options:
  method: str | None
  nm: tuple[int, int] | None
  quantize: str | None
  quantizer: str
  group_size: int | None
  act_order: bool
  blocksize: int
  damp: float


class _Plan(NamedTuple):
  path: str
  shape: tuple[int, ...]
  sparsity: float
  axis: int                  # the selection's axis (N:M, and RTN's without calibration)
  nm_axis: int | None        # the kernel axis N:M groups must run along (SparseGPT, Wanda)


def _target(o: _Options, plan: _Plan) -> str:
  parts = []
  if o.method:
    parts.append(f"{o.nm[0]}:{o.nm[1]}" if o.nm else f"{plan.sparsity:.1%}")
  if o.quantize:
    parts.append(o.quantize + ("" if o.group_size is None else f"/g{o.group_size}"))
  return f"{o.method or o.quantizer} " + "+".join(parts)


def _quant_kwargs(o: _Options, axis: int) -> dict:
  """``quant.quantize`` settings matching GPTQ's grid along the kernel's input ``axis``."""
  if grids.grid(o.quantize).fmt.kind == "mx":
    return {"axis": axis, "block_size": o.group_size or quant.MX_BLOCK_SIZE}
  if o.group_size is None:
    return {"axis": axis, "granularity": "channel"}
  return {"axis": axis, "block_size": o.group_size}


def _on_matrices(o: _Options, plan: _Plan, kernel, h, lay: layers.Layout):
  """SparseGPT, Wanda or GPTQ on each of the kernel's ``(in, out)`` matrices."""
  mats = lay.matrices(kernel)
  outs, kept = [], []
  sparsity = None if o.nm else plan.sparsity
  for g in range(lay.groups):
    if o.method == "wanda":
      r = wanda(mats[g], jnp.sqrt(jnp.diagonal(h[g]) / 2), sparsity=sparsity, nm=o.nm)
      outs.append(r.kernel)
      kept.append(r.mask)
    elif o.method == "sparsegpt":
      r = sparsegpt(mats[g], h[g], sparsity=sparsity, nm=o.nm, blocksize=o.blocksize,
                    damp=o.damp, quantize=o.quantize, group_size=o.group_size)
      outs.append(r.kernel)
      kept.append(r.mask)
    else:
      outs.append(gptq(mats[g], h[g], o.quantize, blocksize=o.blocksize, damp=o.damp,
                       group_size=o.group_size, act_order=o.act_order))
  new = lay.kernel(jnp.stack(outs))
  return new, (lay.kernel(jnp.stack(kept)) if kept else None)


def _process(o: _Options, plan: _Plan, kernel, h, lay: layers.Layout | None):
  """The new kernel and its kept mask (None when nothing is pruned)."""
  kept = None
  if o.method == "magnitude":
    kernel, kept = magnitude(kernel, sparsity=plan.sparsity, nm=o.nm, axis=plan.axis)
  elif o.method is not None or o.quantizer == "gptq":   # (no quantize: a method is given)
    kernel, kept = _on_matrices(o, plan, kernel, h, lay)
  if o.quantize and o.quantizer == "rtn":
    axis = plan.axis if lay is None else _single_input_axis(plan, lay)
    kernel = quant.quantize(kernel, o.quantize, **_quant_kwargs(o, axis))
  return kernel, kept


def _single_input_axis(plan: _Plan, lay: layers.Layout) -> int:
  if len(lay.in_axes) != 1:
    raise ValueError(f"{plan.path}: quantization scales run along one input axis, but the kernel "
                     f"(shape {plan.shape}) contracts over axes {lay.in_axes}; exclude it.")
  return lay.in_axes[0]


def _relative_error(old, new, h, lay: layers.Layout) -> float:
  """``tr(dW^T H dW) / tr(W^T H W)`` summed over the kernel's matrices."""
  w = lay.matrices(old).astype(jnp.float32)
  d = lay.matrices(new).astype(jnp.float32) - w
  def quadratic(a):
    return jnp.sum(a * jnp.matmul(h, a, precision=HIGHEST))
  den = float(quadratic(w))
  return float(quadratic(d)) / den if den > 0 else 0.0


def _owl_targets(runner, params, batches, stages, plans, o, target, lam, threshold, group,
                 mesh, data_axis) -> dict[str, float]:
  """OWL: per-group sparsities from the Wanda-score outlier ratios of the unpruned model."""
  norms = calibration.accumulate(runner, params, batches, calibration.input_norms(stages), mesh,
                                 data_axis)
  tree = calibration.Tree(params)
  groups: dict[str, list] = {}
  for stage in stages:
    norm = jnp.sqrt(norms[stage.paths[0]])
    for path, lay in zip(stage.paths, stage.layouts, strict=True):
      score = jnp.abs(lay.matrices(tree[path]).astype(jnp.float32)) * norm[:, :, None]
      found = re.match(group, path)
      groups.setdefault(found.group(0) if found else path, []).append(score)
  ratios = [float(outlier_ratio(scores, threshold)) for scores in groups.values()]
  per_group = dict(zip(groups, owl_sparsities(ratios, target, lam=lam), strict=True))
  out = {}
  for path in plans:
    found = re.match(group, path)
    out[path] = per_group[found.group(0) if found else path]
  return out


# --------------------------------------------------------------------------- #
# The one call.
# --------------------------------------------------------------------------- #


def _options(method, sparsity, nm, quantize, quantizer, group_size, act_order, blocksize, damp,
             distribution) -> _Options:
  if method is not None and method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS} or None, got {method!r}.")
  if quantizer not in QUANTIZERS:
    raise ValueError(f"`quantizer` must be one of {QUANTIZERS}, got {quantizer!r}.")
  if method is None and quantize is None:
    raise ValueError("nothing to do: give a pruning `method`, a `quantize` format, or both.")
  if method is None and (sparsity is not None or nm is not None):
    raise ValueError("`sparsity`/`nm` need a pruning `method` ('magnitude', 'wanda' or "
                     "'sparsegpt').")
  if method is not None:
    if sparsity is not None and nm is not None:
      raise ValueError(f"give either `sparsity` or `nm`, not both; got {sparsity!r}, {nm!r}.")
    if sparsity is None and nm is None:
      raise ValueError("a pruning `method` needs `sparsity` (in [0, 1)) or `nm` (e.g. (2, 4)).")
    if sparsity is not None:
      _checks.check_sparsity("sparsity", sparsity)
    if nm is not None:
      if not isinstance(nm, tuple | list) or len(nm) != 2:
        raise ValueError(f"`nm` must be a pair (n, m), got {nm!r}.")
      nm = _checks.check_nm(*nm)
  if quantize is not None:
    grids.grid(quantize) if quantizer == "gptq" else quant.get_format(quantize)
    if quantizer == "gptq" and method in ("magnitude", "wanda"):
      raise ValueError(f"GPTQ would refill the zeros of method={method!r}: use "
                       "quantizer='rtn' (prune, then round), or method='sparsegpt' for joint "
                       "pruning and GPTQ-style quantization.")
    if quantizer == "rtn" and method == "sparsegpt":
      raise ValueError("method='sparsegpt' quantizes jointly: use quantizer='gptq'.")
  elif group_size is not None or act_order:
    raise ValueError("`group_size` and `act_order` are quantization settings; give `quantize`.")
  if group_size is not None:
    group_size = _checks.check_int("group_size", group_size, minimum=1)
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"`distribution` must be one of {DISTRIBUTIONS}, got {distribution!r}.")
  if distribution == "owl" and (method is None or nm is not None):
    raise ValueError("distribution='owl' sets per-layer unstructured sparsities: it needs a "
                     "pruning `method` and `sparsity` (not `nm`).")
  return _Options(method, None if nm is None else tuple(nm), quantize, quantizer, group_size,
                  bool(act_order), _args.blocksize(blocksize), _args.damp(damp))


def _plans(o: _Options, params, select, sparsity) -> dict[str, _Plan]:
  selection = pruning_lib.as_selection(select)
  # Unstructured targets have no grouping axis: 0 stands in, so that kernels whose layout only
  # the traced layer tells (an Einsum kernel without bias) need no override.
  specs = selection_lib.resolve(selection, params, sparsity or 0.0,
                                m=o.nm[1] if o.nm else None, axis=None if o.nm else 0)
  plans = {}
  for spec, leaf in zip(specs, jax.tree.leaves(params), strict=True):
    if spec is not None:
      nm_axis = spec.axis if o.nm and o.method in ("wanda", "sparsegpt") else None
      plans[spec.path] = _Plan(spec.path, tuple(np.shape(leaf)), spec.sparsity, spec.axis,
                               nm_axis)
  return plans


def _warn_rank(path: str, tokens: int, h, damp: float) -> None:
  n_in = h.shape[-1]
  if tokens < n_in:
    diag = np.diagonal(np.asarray(h), axis1=-2, axis2=-1)
    lam = damp * np.mean(np.where(diag == 0, 1.0, diag), axis=-1)
    warnings.warn(
        f"{path}: {tokens} calibration tokens for {n_in} inputs: the Hessian is rank-deficient "
        f"(rank <= {tokens}); the methods use H + lambda I with lambda = damp * mean(diag H) = "
        f"{damp} * mean(diag H) = {', '.join(f'{x:.4g}' for x in np.ravel(lam))}. Give more "
        "calibration data.", CalibrationWarning, stacklevel=3)


def _finish_layer(o, tree, masks, plan, lay, h, tokens: int, calib_s: float) -> LayerReport:
  """Prunes/quantizes one layer in ``tree`` (its mask into ``masks``) and reports it."""
  t0 = time.perf_counter()
  old = tree[plan.path]
  new, kept = _process(o, plan, old, h, lay)
  new = jax.block_until_ready(new)
  seconds = time.perf_counter() - t0
  tree[plan.path] = new.astype(old.dtype)
  if kept is not None:
    masks[plan.path] = kept
  error = None if h is None else _relative_error(old, new, h, lay)
  return LayerReport(plan.path, plan.shape, _target(o, plan),
                     float(np.mean(np.asarray(new) == 0)), error, tokens, seconds, calib_s)


def _runner(model, variables, forward):
  """The calibration runner of an NNX module, or of a linen module with its ``variables``."""
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("`variables` is for linen models; an NNX model holds its parameters.")
    return calibration.nnx_runner(model, forward)
  if isinstance(model, nn.Module):
    if variables is None:
      raise ValueError("a linen model needs its `variables` ({'params': ...}).")
    return calibration.linen_runner(model, variables, forward)
  raise ValueError(f"`model` must be a Flax NNX or linen Module, got {type(model).__name__}.")


def _check_owl_select(select) -> None:
  """OWL sets every layer's sparsity, so ``select`` must be uniform without overrides."""
  selection = pruning_lib.as_selection(select)
  if selection.distribution != "uniform" or any(
      x.sparsity is not None for _, x in selection.overrides):
    raise ValueError("distribution='owl' sets every selected layer's sparsity: use a uniform "
                     "`select` without sparsity overrides.")


def prune(
    model: nnx.Module | nn.Module,
    batches: Iterable | None,
    *,
    method: str | None = "sparsegpt",
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    quantize: str | None = None,
    quantizer: str = "gptq",
    group_size: int | None = None,
    act_order: bool = False,
    blocksize: int = 128,
    damp: float = 0.01,
    select=None,
    distribution: str = "uniform",
    owl_lambda: float = 0.08,
    owl_threshold: float = 5.0,
    owl_group: str = OWL_GROUP,
    variables=None,
    forward: Callable | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
) -> OneShotResult:
  """Prunes and/or quantizes a trained model in one shot, calibrating layer by layer.

  See the module docstring for the procedure. Examples::

      result = oneshot.prune(model, batches, method="sparsegpt", nm=(2, 4))
      result = oneshot.prune(model, batches, method="wanda", sparsity=0.7, distribution="owl")
      result = oneshot.prune(model, batches, method=None, quantize="int4", group_size=32)
      result = oneshot.prune(model, batches, method="sparsegpt", nm=(2, 4), quantize="int4")
      print(result.report.table())

  Args:
    model: a Flax NNX module (its parameters are updated in place) or a linen
      module (then give ``variables``).
    batches: calibration batches, each one argument of ``forward`` (e.g.
      ``[batch, time]`` tokens); ``None`` only for ``'magnitude'`` and RTN,
      which need no data (then no errors are reported).
    method: ``'magnitude'``, ``'wanda'``, ``'sparsegpt'`` or ``None`` (no pruning).
    sparsity: unstructured target in [0, 1) (per layer as ``select`` resolves
      it: uniform, ERK, overrides; or OWL's).
    nm: ``(n, m)``: keep ``n`` of every ``m`` along each layer's N:M axis (the
      input axis by default; SparseGPT and Wanda need an input axis).
    quantize: a :mod:`jaxprune.quant` format: with ``method=None`` post-training
      quantization, with ``'sparsegpt'`` joint (sparsity first), with
      ``'magnitude'``/``'wanda'`` and ``quantizer='rtn'`` prune then round.
    quantizer: ``'gptq'`` (int and MX formats) or ``'rtn'`` (round to nearest,
      :func:`jaxprune.quant.quantize`).
    group_size: inputs per quantization scale (default: per output channel for
      int, 32-element blocks for MX); ``act_order``: GPTQ's order by ``H_ii``.
    blocksize, damp: SparseGPT/GPTQ's lazy-update block and dampening.
    select: which kernels, as for the pruning transforms (:func:`jaxprune.select`
      or regex(es)); default: kernels with ``ndim >= 2`` except embeddings and
      the output head.
    distribution: ``'uniform'`` (what ``select`` resolves) or ``'owl'``.
    owl_lambda, owl_threshold: OWL's ``lambda`` and ``M``.
    owl_group: regex whose match on a kernel's path names its OWL layer (by
      default the block: ``'layers/3'``); kernels without a match are layers
      of their own.
    variables: a linen model's variables (``{'params': ...}``).
    forward: how a batch goes through the model: ``forward(model, batch)``
      (NNX; default ``model(batch)``) or ``forward(variables, batch)`` (linen;
      default ``model.apply(variables, batch)``).
    mesh: a ``jax.sharding.Mesh``: calibration batches are split over its
      ``data_axis`` and the Hessian sums are all-reduced.

  Returns:
    :class:`OneShotResult` ``(params, masks, report)``.

  Raises:
    ValueError: for inconsistent arguments (naming them), a ``select`` that
      matches no parameter, a selected parameter that is not the kernel of a
      layer the forward pass calls, or an N:M axis that is not an input axis.
    Warns :class:`CalibrationWarning` when a layer's calibration tokens are
    fewer than its inputs (a rank-deficient Hessian), with the damping used.
  """
  start = time.perf_counter()
  o = _options(method, sparsity, nm, quantize, quantizer, group_size, act_order, blocksize, damp,
               distribution)
  runner = _runner(model, variables, forward)
  batches = None if batches is None else list(batches)
  needs_data = o.method in ("wanda", "sparsegpt") or (o.quantize and o.quantizer == "gptq")
  if not batches and (needs_data or distribution == "owl"):
    raise ValueError("this method needs calibration `batches` (a non-empty sequence).")
  plans = _plans(o, runner.params, select, sparsity)
  if distribution == "owl":
    _check_owl_select(select)
  tree = calibration.Tree(runner.params)
  rows, masks = [], {}

  def finish_layer(plan, lay, h, tokens, calib_s):
    rows.append(_finish_layer(o, tree, masks, plan, lay, h, tokens, calib_s))

  if not batches:
    for plan in plans.values():
      finish_layer(plan, None, None, 0, 0.0)
  else:
    stages = calibration.stages(runner, batches[0], plans)
    if distribution == "owl":
      targets = _owl_targets(runner, runner.params, batches, stages, plans, o, sparsity,
                             owl_lambda, owl_threshold, owl_group, mesh, data_axis)
      plans = {p: plan._replace(sparsity=targets[p]) for p, plan in plans.items()}
    for stage in stages:
      t0 = time.perf_counter()
      h, tokens = calibration.accumulate(runner, tree.tree(), batches, calibration.hessian(stage),
                                         mesh, data_axis)
      calib_s = time.perf_counter() - t0
      tokens = int(tokens)
      for path, lay in zip(stage.paths, stage.layouts, strict=True):
        if needs_data:
          _warn_rank(path, tokens, h, o.damp)
        finish_layer(plans[path], lay, jnp.asarray(h), tokens, calib_s)
  params = runner.finish(tree.tree())
  report = OneShotReport(tuple(rows), time.perf_counter() - start,
                         1 if mesh is None else mesh.size)
  return OneShotResult(params, masks, report)
