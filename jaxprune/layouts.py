"""What each parameter is (kernel, bias, norm, embedding) and which axis its layer sums over.

The defaults of :func:`jaxprune.select` follow the layer, not the rank: a leaf
is classified from its name, its siblings and, for Equinox, the module class
that holds it; a kernel's N:M grouping axis is the *innermost reduction axis*
of its layer, so that groups of ``m`` consecutive weights are summed together
in ``y = x W`` (what 2:4 sparse tensor cores need, and what NVIDIA's ASP
does for PyTorch's ``(out, in, kh, kw)`` weights).

**Kinds** (:func:`describe`; the last path component is the leaf's name):

* *bias*: named ``bias`` or ``*_bias`` (or Haiku's ``b`` beside a ``w``),
  whatever its rank: Equinox conv biases ``(out, 1, 1)`` and attention q/k/v
  biases ``(heads, head_dim)`` included.
* *norm*: named ``scale``, or held by a module whose name looks like a norm
  (``LayerNorm_0``, ``norm``, ``ln_f``, ``bn1``) or an Equinox ``*Norm``.
* *embedding*: named ``embedding(s)``, a path matching :data:`EMBEDDING_NAMES`
  (``embed``, ``wte``, ``wpe``), or an Equinox ``Embedding``.
* *kernel*: any other floating-point leaf with ``ndim >= 2``; *vector* below that.

**Grouping axis of a kernel** (the first rule that applies):

1. Equinox (a ``weight`` held by an ``eqx.Module``): ``Linear`` is ``(out, in)``
   -> axis 1; ``Conv*`` is ``(out, in, *window)`` -> axis 1 (the input
   channels, as ASP); another module with a bias of ``out`` entries -> axis 1.
2. Flax and plain trees, ``(in..., out...)``: a 2-D kernel ``(in, out)`` -> axis 0.
3. ``ndim >= 3`` with a sibling ``bias`` equal to the kernel's trailing
   dimensions: those are the outputs, the leading ones the reduction, and the
   axis is the last of the reduction axes. This covers conv ``HWIO`` (bias
   ``(O,)`` -> axis 2, the ``I`` axis), ``DenseGeneral``/``LinearGeneral`` and
   in-first ``Einsum`` kernels, attention q/k/v ``(in, heads, head_dim)``
   (bias ``(heads, head_dim)`` -> axis 0) and the attention output
   ``(heads, head_dim, out)`` (bias ``(out,)`` -> axis 1: groups run along
   ``head_dim`` within each head, which is the same grouping as ``m``
   consecutive entries of the flattened ``heads * head_dim`` reduction
   whenever ``m`` divides ``head_dim``).
4. Without a bias: attention modules by their Flax names (``query``, ``key``,
   ``value`` -> axis 0; ``out`` beside a ``query`` -> axis 1), then a module
   whose name contains ``conv`` -> ``ndim - 2`` (HWIO).
5. Otherwise the layout is unknown (e.g. a bias-free ``DenseGeneral`` or
   ``Einsum``) and selecting the leaf raises, naming it and asking for an
   ``axis`` (:func:`einsum_axis` computes it from an einsum string).

Non-kernel leaves selected explicitly keep the rank rule: axis 0, or
``ndim - 2`` for ``ndim >= 3``.

**Output head** (:func:`head_paths`): kernels whose path matches
:data:`HEAD_NAMES` (``head``, ``lm_head``, ``logits``, ``Head_0``); if none
does and the tree holds at least two kernels, the kernel of the *last
single-kernel top-level layer* in natural path order (numbers compared as
numbers, so ``Dense_10`` comes after ``Dense_9``). A top-level layer is the
first path component (after linen's ``params``), or the first two when the
second is a sequence index (``layers/8``): linen ``Dense_1``, NNX
``linear2`` and Equinox ``layers/8`` are heads; the blocks of a transformer
with tied embeddings (``layers/11``, many kernels each) are not. The rule
reads paths only, so it gives the same answer for a tree at ``init``, inside
``jit`` and after ``apply_updates`` (which reorder dict keys); name the head
with ``select(head=...)`` when it is elsewhere.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: Paths of embeddings (case-insensitive): nnx ``embedding``, linen ``Embed_0``,
#: ``pos_embed``, GPT-2 ``wte``/``wpe``.
EMBEDDING_NAMES = r"(?i)embed|(^|/)(wte|wpe)(/|$)"
#: Paths of output heads (case-insensitive): ``head``, ``lm_head``, ``Head_0``, ``logits``.
HEAD_NAMES = r"(?i)logits|(^|/)(lm_)?head(_\d+)?(/|$)"

KINDS = ("kernel", "bias", "norm", "embedding", "vector", "other")

_DROPPED_ATTRS = ("value", "raw_value")
_BIAS = re.compile(r"(?i)^(.*_)?bias$")
_NORM_MODULE = re.compile(r"(?i)norm|^ln(_|\d|$)|^bn\d*$")
_CONV_MODULE = re.compile(r"(?i)conv")
_QKV = ("query", "key", "value")


class LeafInfo(NamedTuple):
  """One leaf of a parameter tree, as :func:`describe` sees it.

  ``axis`` is the N:M grouping axis of a kernel (None: unknown layout, or
  not a kernel); ``rule`` says in words why (shown in errors and reports);
  ``order`` sorts leaves in the tree's own order (insertion order of dicts).
  """

  path: str
  shape: tuple[int, ...]
  dtype: Any
  kind: str
  axis: int | None
  rule: str
  owner: str  # the class of the Equinox module holding the leaf, else ''


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
  """'/'-joined names of a ``jax.tree_util`` key path, without a trailing ``.value``.

  ``(DictKey('blocks'), DictKey(0), DictKey('kernel'), GetAttrKey('value'))``
  (a leaf of ``flax.nnx.State``) becomes ``'blocks/0/kernel'``.
  """
  keys = list(key_path)
  if (keys and isinstance(keys[-1], jax.tree_util.GetAttrKey)
      and keys[-1].name in _DROPPED_ATTRS):
    keys = keys[:-1]
  return "/".join(_key_name(k) for k in keys)


def _shape_dtype(leaf) -> tuple[tuple[int, ...], Any] | None:
  """Shape and dtype of an array, ``ShapeDtypeStruct`` or number; None for anything else."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), leaf.dtype
  if isinstance(leaf, (bool, int, float, complex, np.generic)):
    a = np.asarray(leaf)
    return a.shape, a.dtype
  return None


def _eqx_module_type():
  eqx = sys.modules.get("equinox")  # Only an Equinox tree can hold one; never import it.
  return None if eqx is None else eqx.Module


def _walk(params):
  """``(key_path, leaf, owner)`` per leaf, in ``jax.tree.leaves`` order.

  ``owner`` is the innermost ``eqx.Module`` holding the leaf (None outside Equinox).
  """
  module_type = _eqx_module_type()
  out = []

  def visit(node, keys, owner):
    children, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0][0] == () and children[0][1] is node:
      out.append((tuple(keys), node, owner))
      return
    if module_type is not None and isinstance(node, module_type):
      owner = node
    for key_path, child in children:
      if child is not None:
        visit(child, keys + list(key_path), owner)

  visit(params, [], None)
  return out


def _kind(path: str, name: str, parent: str, shape, dtype, siblings, owner) -> str:
  owner_name = type(owner).__name__ if owner is not None else ""
  if _BIAS.match(name) or (name == "b" and "w" in siblings):
    return "bias"
  module = parent.rsplit("/", 1)[-1]
  if name == "scale" or _NORM_MODULE.search(module) or owner_name.endswith("Norm"):
    return "norm"
  if (name in ("embedding", "embeddings") or re.search(EMBEDDING_NAMES, path)
      or owner_name == "Embedding"):
    return "embedding"
  if not jnp.issubdtype(dtype, jnp.inexact):
    return "other"
  return "kernel" if len(shape) >= 2 else "vector"


def _eqx_axis(shape, owner, siblings) -> tuple[int | None, str]:
  eqx = sys.modules["equinox"]
  name = type(owner).__name__
  if isinstance(owner, eqx.nn.Linear):
    return 1, "Equinox Linear (out, in): axis 1"
  if isinstance(owner, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
    return 1, f"Equinox {name} (out, in, *window): axis 1, the input channels"
  bias = siblings.get("bias")
  if bias is not None and bias[0] and bias[0][0] == shape[0]:
    return 1, f"Equinox {name} weight with a bias of {shape[0]} outputs, (out, in, ...): axis 1"
  return None, f"an Equinox {name} `weight` of unknown layout"


def _flax_axis(shape, parent: str, siblings, parent_siblings) -> tuple[int | None, str]:
  ndim = len(shape)
  if ndim == 2:
    return 0, "(in, out): axis 0"
  bias = siblings.get("bias")
  if bias is not None and 1 <= len(bias[0]) < ndim and tuple(shape[ndim - len(bias[0]):]) == (
      tuple(bias[0])):
    k = ndim - len(bias[0])
    return k - 1, (f"(reduction {tuple(shape[:k])}, out {tuple(bias[0])}) by its bias: "
                   f"axis {k - 1}, the innermost reduction axis")
  module = parent.rsplit("/", 1)[-1]
  if ndim == 3 and module in _QKV:
    return 0, "attention q/k/v (in, heads, head_dim): axis 0"
  if ndim == 3 and module == "out" and "query" in parent_siblings:
    return 1, "attention output (heads, head_dim, out): axis 1, head_dim within each head"
  if _CONV_MODULE.search(module):
    return ndim - 2, f"convolution (*window, in, out): axis {ndim - 2}, the input channels"
  return None, "unknown layout: a kernel with ndim >= 3 and no bias to tell its outputs"


def describe(params) -> list[LeafInfo]:
  """One :class:`LeafInfo` per leaf of ``params``, in ``jax.tree.leaves`` order.

  Leaves that are not arrays or numbers (a function left in an unfiltered
  Equinox model, a string) get kind ``'other'`` and dtype None.
  """
  walked = _walk(params)
  paths = [path_str(k) for k, _, _ in walked]
  sds = [_shape_dtype(leaf) for _, leaf, _ in walked]
  children: dict[str, dict[str, Any]] = {}
  for path, sd in zip(paths, sds, strict=True):
    parent, _, name = path.rpartition("/")
    children.setdefault(parent, {})[name] = sd
  modules: dict[str, set[str]] = {}
  for parent in children:
    grand, _, module = parent.rpartition("/")
    modules.setdefault(grand, set()).add(module)
  out = []
  for path, sd, (_, _, owner) in zip(paths, sds, walked, strict=True):
    parent, _, name = path.rpartition("/")
    siblings = {k: v for k, v in children[parent].items() if v is not None}
    if sd is None:
      out.append(LeafInfo(path, (), None, "other", None, "not an array", ""))
      continue
    shape, dtype = sd
    kind = _kind(path, name, parent, shape, dtype, siblings, owner)
    axis, rule = None, ""
    if kind == "kernel":
      if owner is not None and name == "weight":
        axis, rule = _eqx_axis(shape, owner, siblings)
      else:
        axis, rule = _flax_axis(shape, parent, siblings,
                                modules.get(parent.rpartition("/")[0], set()))
    elif shape:
      axis = 0 if len(shape) <= 2 else len(shape) - 2
      rule = f"{kind}: axis {axis} by rank"
    owner_name = "" if owner is None else type(owner).__name__
    out.append(LeafInfo(path, tuple(shape), dtype, kind, axis, rule, owner_name))
  return out


def _top_layer(path: str) -> str:
  parts = path.split("/")
  if parts[0] == "params" and len(parts) > 2:
    parts = parts[1:]
  depth = 2 if len(parts) > 2 and parts[1].isdigit() else 1
  return "/".join(parts[:depth])


def _natural(path: str) -> tuple:
  """Sort key of a path with numbers compared as numbers: ``Dense_9`` < ``Dense_10``."""
  return tuple((0, int(c), "") if c.isdigit() else (1, 0, c)
               for c in re.split(r"(\d+)", path) if c)


def head_paths(infos: Sequence[LeafInfo]) -> list[str]:
  """Paths of the output head among ``infos`` (see the module docstring for the rule)."""
  kernels = [i for i in infos if i.kind == "kernel" and math.prod(i.shape)]
  named = [i.path for i in kernels if re.search(HEAD_NAMES, i.path)]
  if named or len(kernels) < 2:
    return named
  by_layer: dict[str, list[str]] = {}
  for i in kernels:
    by_layer.setdefault(_top_layer(i.path), []).append(i.path)
  single = [paths[0] for paths in by_layer.values() if len(paths) == 1]
  return [max(single, key=_natural)] if single else []


def einsum_axis(spec: str) -> int:
  """The N:M grouping axis of a Flax ``Einsum`` kernel: its innermost reduction axis.

  ``spec`` is the module's einsum string ``'inputs,kernel->outputs'``; the
  reduction axes of the kernel are its letters that appear in the inputs but
  not in the outputs. ``einsum_axis('btd,dnh->btnh') == 0``,
  ``einsum_axis('btnh,nhd->btd') == 1``, ``einsum_axis('bd,hd->bh') == 1``.
  Use it as ``select(overrides={'attn/q_einsum': {'axis': einsum_axis(...)}})``.
  """
  match = re.fullmatch(r"\s*([\w.]+)\s*,\s*(\w+)\s*->\s*([\w.]*)\s*", spec)
  if match is None:
    raise ValueError(f"`spec` must be an einsum string 'inputs,kernel->outputs', got {spec!r}.")
  inputs, kernel, outputs = match.groups()
  reduced = [i for i, c in enumerate(kernel) if c in inputs and c not in outputs]
  if not reduced:
    raise ValueError(f"`spec` {spec!r}: no kernel axis is summed over.")
  return reduced[-1]
