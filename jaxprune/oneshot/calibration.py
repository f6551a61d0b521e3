"""Calibration: a model as parameters plus a forward pass that reports its layer calls, the
order of those calls, and the statistics of their inputs summed over calibration batches.

* :func:`nnx_runner` / :func:`linen_runner`: the parameters of a Flax NNX or
  linen model and ``apply(params, batch, hook)``, which runs the model with
  ``hook(path, call)`` called for every registered layer call
  (:mod:`jaxprune.oneshot.layers`); ``path`` is the kernel's parameter path as
  :func:`jaxprune.selection.path_str` names it.
* :func:`stages`: the calls of the selected kernels in forward order, found by
  one abstract pass (``jax.eval_shape``); kernels that read the same input
  tensor (attention's query, key and value) form one stage.
* :func:`accumulate`: a statistic of the captured inputs (:func:`hessian`:
  ``2 X^T X`` in float32; :func:`input_norms`: ``sum x_i^2``) summed over the
  batches, jitted, with the batches split over a mesh's data axis, so the sum
  over tokens is data-parallel (XLA all-reduces it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune import selection as selection_lib
from jaxprune.oneshot import layers

HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- #
# The model as parameters plus a forward pass that reports layer calls.
# --------------------------------------------------------------------------- #


class Runner(NamedTuple):
  params: Any
  apply: Callable[[Any, Any, Callable[[str, layers.LayerCall], None]], Any]
  finish: Callable[[Any], Any]


def nnx_runner(model: nnx.Module, forward) -> Runner:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = forward or (lambda m, batch: m(batch))

  def apply(params, batch, hook):
    merged = nnx.merge(graphdef, params, rest)
    names = {id(m): "/".join(map(str, path)) for path, m in nnx.iter_modules(merged)}
    with layers.intercept(lambda m, call: hook(f"{names.get(id(m))}/{call.param}", call)):
      return forward(merged, batch)

  def finish(params):
    nnx.update(model, params)
    return params

  return Runner(params, apply, finish)


def linen_runner(model: nn.Module, variables, forward) -> Runner:
  forward = forward or (lambda v, batch: model.apply(v, batch))

  def apply(params, batch, hook):
    def on_call(m, call):
      hook("/".join(("params", *map(str, m.path), call.param)), call)
    with layers.intercept(on_call):
      return forward(params, batch)

  return Runner(variables, apply, lambda params: params)


class Tree:
  """A parameter tree's leaves by path, and a way to put new leaves back."""

  def __init__(self, params):
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.paths = [selection_lib.path_str(p) for p, _ in flat]
    self.leaves = [leaf for _, leaf in flat]
    self.index = {p: i for i, p in enumerate(self.paths)}

  def __getitem__(self, path: str):
    return self.leaves[self.index[path]]

  def __setitem__(self, path: str, value) -> None:
    self.leaves[self.index[path]] = value

  def tree(self):
    return self.treedef.unflatten(self.leaves)


# --------------------------------------------------------------------------- #
# Finding the layers and their order.
# --------------------------------------------------------------------------- #


class Stage(NamedTuple):
  paths: tuple[str, ...]              # kernels that share the input (and so the Hessian)
  layouts: tuple[layers.Layout, ...]  # theirs; all read the inputs the same way

  @property
  def layout(self) -> layers.Layout:
    return self.layouts[0]


def stages(runner: Runner, batch, plans: dict[str, Any]) -> list[Stage]:
  """Calls of the planned kernels in forward order, grouped by shared input tensor."""
  calls: list[tuple[str, int, layers.LayerCall]] = []

  def record(path, call):
    if path in plans:
      calls.append((path, id(call.inputs), call))

  def trace(params, batch):
    runner.apply(params, batch, record)
    return 0

  jax.eval_shape(trace, runner.params, batch)
  missing = [p for p in plans if p not in {c[0] for c in calls}]
  if missing:
    raise ValueError(
        f"selected parameters {missing} are not the kernel of a layer one-shot calibration can "
        "see in the forward pass (nnx.Linear/LinearGeneral/Einsum, linen Dense/DenseGeneral/"
        "Einsum, or a type given to jaxprune.oneshot.register_layer); exclude them in `select`.")
  counts = {p: sum(c[0] == p for c in calls) for p in plans}
  stages: list[tuple[list[str], int, list[layers.Layout]]] = []
  seen: set[str] = set()

  def reads(lay):   # how a layout turns the input into (G, tokens, in)
    return lay.inputs_perm, [lay.kernel_shape[a] for a in lay.batch_axes + lay.in_axes]

  for path, key, call in calls:
    if path in seen:
      continue
    seen.add(path)
    lay = layers.layout(call, plans[path].shape, plans[path].nm_axis)
    last = stages[-1] if stages else None
    if (last and counts[path] == 1 and counts[last[0][0]] == 1 and last[1] == key
        and reads(last[2][0]) == reads(lay)):
      last[0].append(path)
      last[2].append(lay)
    else:
      stages.append(([path], key, [lay]))
  return [Stage(tuple(paths), tuple(lays)) for paths, _, lays in stages]


# --------------------------------------------------------------------------- #
# Calibration statistics.
# --------------------------------------------------------------------------- #


def _shardings(mesh, data_axis: str, batch):
  if mesh is None:
    return None, None
  if data_axis not in mesh.shape:
    raise ValueError(f"`data_axis` {data_axis!r} is not an axis of `mesh` {dict(mesh.shape)}.")
  size = mesh.shape[data_axis]
  for leaf in jax.tree.leaves(batch):
    if not np.ndim(leaf) or np.shape(leaf)[0] % size:
      raise ValueError(f"calibration batches must have a leading axis divisible by the "
                       f"{size} devices of mesh axis {data_axis!r}, got shape {np.shape(leaf)}.")
  return NamedSharding(mesh, P()), NamedSharding(mesh, P(data_axis))


def accumulate(runner: Runner, params, batches, statistic, mesh, data_axis: str):
  """Sums ``statistic(inputs_by_path)`` over the calibration batches (jitted, data-parallel)."""

  def one(params, batch):
    caught: dict[str, list] = {}
    runner.apply(params, batch, lambda path, call: caught.setdefault(path, []).append(call))
    return statistic(caught)

  replicated, split = _shardings(mesh, data_axis, batches[0])
  if mesh is None:
    fn = jax.jit(one)
  else:
    fn = jax.jit(one, in_shardings=(replicated, split), out_shardings=replicated)
    params = jax.device_put(params, replicated)
  total = None
  for batch in batches:
    out = fn(params, batch)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return jax.device_get(total)


def hessian(stage: Stage):
  """``statistic`` for :func:`accumulate`: the stage's ``(G, in, in)`` sum of ``2 X^T X``."""
  lead = stage.paths[0]

  def statistic(caught):
    h = jnp.zeros((stage.layout.groups, stage.layout.n_in, stage.layout.n_in), jnp.float32)
    tokens = 0
    for call in caught.get(lead, []):
      x = stage.layout.inputs(call.inputs).astype(jnp.float32)
      h = h + 2 * jnp.einsum("gti,gtj->gij", x, x, precision=HIGHEST)
      tokens += x.shape[1]
    return h, jnp.int32(tokens)

  return statistic


def input_norms(stages: Sequence[Stage]):
  """``statistic``: per stage lead, the ``(G, in)`` sum of squares of each input feature."""
  def statistic(caught):
    out = {}
    for stage in stages:
      s = jnp.zeros((stage.layout.groups, stage.layout.n_in), jnp.float32)
      for call in caught.get(stage.paths[0], []):
        s = s + jnp.sum(jnp.square(stage.layout.inputs(call.inputs).astype(jnp.float32)), axis=1)
      out[stage.paths[0]] = s
    return out

  return statistic
