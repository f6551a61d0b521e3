"""Which layers one-shot calibration sees, and how it reads their kernels and inputs.

A *layer* is a module that multiplies its input by a kernel parameter. While
the model runs, :func:`intercept` calls a hook with a :class:`LayerCall` for
every call of a registered layer type: the input operand and the
``lax.dot_general`` dimension numbers of the product ``inputs x kernel``.
From these, :class:`Layout` views the kernel as ``G`` matrices ``(in, out)``
(the Flax layout the layer functions take; ``G`` > 1 for kernels with batch
axes, e.g. per-head weights) and the inputs as ``(G, tokens, in)``, so that
``H_g = 2 X_g^T X_g``.

Registered: ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and linen's
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` (linen through
``flax.linen.intercept_methods``). Another layer type is one call::

    def describe(module, args, kwargs) -> LayerCall:
      x = args[0]                                # the operand the kernel multiplies
      return LayerCall(x, (((x.ndim - 1,), (0,)), ((), ())), param="w")

    jaxprune.oneshot.register_layer(MyLinear, describe)

where the dimension numbers are those of ``lax.dot_general(x, kernel, ...)``
(contracting axes, then batch axes, of the input and of the kernel) and
``param`` is the attribute (NNX) or parameter name (linen) of the kernel. A
subclass of a registered type is handled by its parent's entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]],
                         tuple[tuple[int, ...], tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a layer: ``lax.dot_general(inputs, kernel, dimension_numbers)``."""

  inputs: Array
  dimension_numbers: DimensionNumbers
  param: str = "kernel"


_REGISTRY: dict[type, Callable[[Any, tuple, dict], LayerCall]] = {}
_LOCK = threading.RLock()


def register_layer(cls: type, describe: Callable[[Any, tuple, dict], LayerCall]) -> None:
  """Lets one-shot calibration see layers of type ``cls`` (NNX or linen module classes).

  ``describe(module, args, kwargs)`` is called with the arguments of each
  ``__call__`` and returns the :class:`LayerCall` of the product.
  """
  if not isinstance(cls, type) or not issubclass(cls, nnx.Module | nn.Module):
    raise ValueError(f"`cls` must be a flax NNX or linen Module class, got {cls!r}.")
  if not callable(describe):
    raise ValueError(f"`describe` must be callable, got {describe!r}.")
  _REGISTRY[cls] = describe


def describer(module) -> Callable | None:
  """The registered ``describe`` of ``module``'s most specific registered class, or None."""
  for cls in type(module).__mro__:
    if cls in _REGISTRY:
      return _REGISTRY[cls]
  return None


def _normalize(axes, ndim: int) -> tuple[int, ...]:
  axes = axes if isinstance(axes, Sequence) else (axes,)
  return tuple(int(a) % ndim for a in axes)


def _last_axis(module, args, kwargs) -> LayerCall:
  x = args[0] if args else kwargs["inputs"]
  return LayerCall(x, (((x.ndim - 1,), (0,)), ((), ())))


def _general(x, axis, batch_axes) -> LayerCall:
  axis = _normalize(axis, x.ndim)
  batch = _normalize(tuple(batch_axes), x.ndim)
  return LayerCall(x, ((axis, tuple(range(len(batch), len(batch) + len(axis)))),
                       (batch, tuple(range(len(batch))))))


def einsum_dimension_numbers(equation: str, ndim: int) -> DimensionNumbers:
  """``dot_general`` dimension numbers of ``einsum(equation, inputs, kernel)`` (inputs ``ndim``-D).

  Every kernel label must appear in the output (a batch or output axis) or in
  the inputs but not the output (contracted); every input label outside the
  kernel must reach the output (a token axis). ``...`` may stand for leading
  token axes of the inputs.
  """
  eq = equation.replace(" ", "")
  try:
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
  except ValueError:
    raise ValueError(f"einsum {equation!r} is not of the form 'inputs,kernel->out'.") from None
  if "..." in rhs:
    raise ValueError(f"einsum {equation!r}: the kernel operand cannot have '...'.")
  if "..." in lhs:
    extra = ndim - (len(lhs) - 3)
    fresh = "".join(chr(0x3B1 + i) for i in range(extra))   # Greek letters: unused by einsum.
    lhs, out = lhs.replace("...", fresh), out.replace("...", fresh)
  if len(lhs) != ndim or len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs):
    raise ValueError(f"einsum {equation!r} does not fit a {ndim}-D input with distinct labels.")
  bad = [c for c in rhs if c not in out and c not in lhs] + [
      c for c in lhs if c not in out and c not in rhs]
  if bad:
    raise ValueError(f"einsum {equation!r} sums over axes of one operand only ({bad}); "
                     "not a linear layer one-shot calibration can read.")
  contract = [c for c in lhs if c in rhs and c not in out]
  batch = [c for c in lhs if c in rhs and c in out]
  return ((tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
          (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)))


def _einsum(einsum_str):
  def describe(module, args, kwargs) -> LayerCall:
    x = args[0] if args else kwargs["inputs"]
    eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or einsum_str(module)
    return LayerCall(x, einsum_dimension_numbers(eq, x.ndim))
  return describe


def _nnx_general(module, args, kwargs) -> LayerCall:
  return _general(args[0] if args else kwargs["inputs"], module.axis, module.batch_axis.keys())


def _linen_general(module, args, kwargs) -> LayerCall:
  return _general(args[0] if args else kwargs["inputs"], module.axis, module.batch_dims)


register_layer(nnx.Linear, _last_axis)
register_layer(nnx.LinearGeneral, _nnx_general)
register_layer(nnx.Einsum, _einsum(lambda m: m.einsum_str))
register_layer(nn.Dense, _last_axis)
register_layer(nn.DenseGeneral, _linen_general)
register_layer(nn.Einsum, _einsum(lambda m: m.einsum_str))


# --------------------------------------------------------------------------- #
# Running a model with the hook.
# --------------------------------------------------------------------------- #

Hook = Callable[[Any, LayerCall], None]


@contextlib.contextmanager
def intercept(hook: Hook):
  """Calls ``hook(module, call)`` before every call of a registered layer, NNX and linen.

  NNX has no method interceptor, so the registered NNX classes' ``__call__``
  are wrapped for the duration (under a lock; the wrappers pass everything
  through). A module is reported once per call even if several registered
  classes of its hierarchy wrap ``__call__``.
  """
  active: set[int] = set()

  def report(module, args, kwargs):
    describe = describer(module)
    if describe is not None and id(module) not in active:
      hook(module, describe(module, args, kwargs))
      return True
    return False

  def wrap(original):
    def __call__(self, *args, **kwargs):
      first = report(self, args, kwargs)
      if first:
        active.add(id(self))
      try:
        return original(self, *args, **kwargs)
      finally:
        if first:
          active.discard(id(self))
    return __call__

  def linen_interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      report(context.module, args, kwargs)
    return next_fun(*args, **kwargs)

  with _LOCK:
    patched = [(cls, cls.__dict__.get("__call__")) for cls in _REGISTRY
               if issubclass(cls, nnx.Module)]
    try:
      for cls, _ in patched:
        cls.__call__ = wrap(cls.__call__)
      with nn.intercept_methods(linen_interceptor):
        yield
    finally:
      for cls, own in reversed(patched):
        if own is None:
          delattr(cls, "__call__")
        else:
          cls.__call__ = own


# --------------------------------------------------------------------------- #
# Kernels and inputs as matrices.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Layout:
  """A kernel viewed as ``G`` Flax ``(in, out)`` matrices and its inputs as ``(G, tokens, in)``.

  ``kernel_perm`` orders the kernel's axes as (batch, contracted, output);
  ``inputs_perm`` the input's as (batch, token, contracted), the contracted
  axes paired. ``in_axes`` are the kernel's contracted axes in that order: the
  flattened ``in`` index runs fastest along the last of them (the N:M axis,
  when there is one).
  """

  kernel_shape: tuple[int, ...]
  kernel_perm: tuple[int, ...]
  inputs_perm: tuple[int, ...]
  batch_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  @property
  def groups(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.batch_axes)

  @property
  def n_in(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.in_axes)

  @property
  def n_out(self) -> int:
    return math.prod(self.kernel_shape[a] for a in self.out_axes)

  def matrices(self, kernel: Array) -> Array:
    return jnp.transpose(kernel, self.kernel_perm).reshape(self.groups, self.n_in, self.n_out)

  def kernel(self, matrices: Array) -> Array:
    permuted = tuple(self.kernel_shape[a] for a in self.kernel_perm)
    inverse = tuple(int(i) for i in np.argsort(self.kernel_perm))
    return jnp.transpose(matrices.reshape(permuted), inverse)

  def inputs(self, x: Array) -> Array:
    return jnp.transpose(x, self.inputs_perm).reshape(self.groups, -1, self.n_in)


def layout(call: LayerCall, kernel_shape: Sequence[int], nm_axis: int | None = None) -> Layout:
  """The :class:`Layout` of a call on a kernel of ``kernel_shape``.

  ``nm_axis``: a kernel axis that must be contracted, put last among the
  contracted axes so that N:M groups of consecutive ``in`` indices run along it.
  """
  (x_contract, k_contract), (x_batch, k_batch) = call.dimension_numbers
  kernel_shape = tuple(kernel_shape)
  pairs = list(zip(x_contract, k_contract, strict=True))
  if nm_axis is not None:
    if nm_axis not in k_contract:
      raise ValueError(f"the N:M axis {nm_axis} of a kernel of shape {kernel_shape} is not an "
                       f"input (contracted) axis {tuple(k_contract)}: SparseGPT and Wanda prune "
                       "N:M groups along the inputs; set the selection's `axis`.")
    pairs.sort(key=lambda p: p[1] == nm_axis)
  k_out = tuple(a for a in range(len(kernel_shape)) if a not in k_contract and a not in k_batch)
  ndim = call.inputs.ndim
  x_tokens = tuple(a for a in range(ndim) if a not in x_contract and a not in x_batch)
  return Layout(
      kernel_shape=kernel_shape,
      kernel_perm=tuple(k_batch) + tuple(p[1] for p in pairs) + k_out,
      inputs_perm=tuple(x_batch) + x_tokens + tuple(p[0] for p in pairs),
      batch_axes=tuple(k_batch),
      in_axes=tuple(p[1] for p in pairs),
      out_axes=k_out,
  )
