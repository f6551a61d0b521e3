"""The compressed storage format: bit-packed codes, scales and positions, Orbax save/load.

Compressed export
-----------------
:func:`export_compressed` stores each selected leaf in its *canonical layout*
``w2 = moveaxis(w, axis, -1).reshape(R, L)``: rows are the other dims in
row-major order, ``L = shape[axis]`` and sparsity groups and scale blocks run
along a row (for an ``(in, out)`` Dense kernel with the default ``axis=0``, this
is the ``(out, in)`` layout of sparse tensor cores). Per leaf, a dict of numpy
arrays (all bit streams little-endian: code ``j`` occupies bits
``j*b .. j*b+b-1`` of the stream, e.g. the low nibble of a byte comes first):

* ``values``: the kept entries in row-major order of ``w2`` (N:M: group by
  group, ``n`` per group, in index order). Quantized: their integer codes,
  ``b = fmt.bits`` bits each, bit-packed into ``uint8`` when ``b < 8`` (int4, nvfp4 and
  mxfp4 two per byte, mxfp6 four per three bytes, intK at K bits), ``int8`` for
  int8 and mxint8 (two's complement ``k`` of ``k / 64``), ``uint8`` bit patterns
  for 8-bit floats. intK codes are ``K``-bit two's complement of ``n`` in
  ``[-q_max, q_max]`` (``[-2^(K-1), 2^(K-1) - 1]`` with ``convention='harma'``);
  float elements are ``ml_dtypes`` bit patterns (``float8_e4m3fn``,
  ``float8_e5m2``, ``float6_e3m2fn``, ``float6_e2m3fn``, ``float4_e2m1fn``, also
  for NVFP4). Without ``fmt``: the kept values themselves.
* ``scales`` (quantized only), one per scaling group, shape ``(1, 1)``
  (tensor), ``(R, 1)`` (channel) or ``(R, L / block_size)`` (block). int and FP8:
  ``float32`` ``s = fl32(amax / max_normal)`` with ``amax`` of the sparse group
  (``convention='harma'``: ``fl32(D / (2^k - 1))``, see ``quant_scaled.harma``),
  value ``fl32(code * s)`` (bit-exact while ``s`` is a normal float32; the
  export refuses groups where it is not). MX: ``uint8`` E8M0 ``e + 127``, value
  ``code * 2^e`` (always exact in float32). NVFP4: ``uint8`` E4M3FN bit patterns
  of the block scales ``s_b`` (shape ``(R, L / 16)``, values in ``[2^-6, 448]``),
  value ``fl32(code * fl32(s_t * s_b))``.
* ``tensor_scale`` (NVFP4 only): the ``float32`` per-tensor scale
  ``s_t = fl32(amax / 2688)`` of the sparse tensor, shape ``(1,)``; 0 (with all
  block scales 0) for a tensor that quantizes to zeros (``s_t < 2^-120``). So
  NVFP4 stores 4.5 bits per weight (dense) plus 32 bits per tensor.
* ``index`` (N:M): the position in ``[0, m)`` of each kept value inside its
  group, ``ceil(log2 m)`` bits each (2 bits for 2:4), bit-packed into ``uint8``.
* ``mask`` (unstructured): ``np.packbits`` of the ``(R, L)`` keep-mask, 1 bit per
  weight.
* ``dense`` (leaves that are not selected, and empty ones): the leaf as is.

The metadata (paths, shapes, dtypes, settings) is the static
:class:`LeafLayout` per leaf; scale and bitmap overheads are counted in
:func:`compressed_size_report`, the metadata is not.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune import quant, quant_nvfp4
from jaxprune import selection as selection_lib
from jaxprune.compress import LeafLayout, check_finite, compress_leaf, leaf_layouts


# ---------------------------------------------------------------------------
# Codes: packing and the element encodings.
# ---------------------------------------------------------------------------
def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """Little-endian bit stream of ``codes`` (each ``< 2^bits``) as ``uint8``."""
  codes = np.asarray(codes, np.uint8).reshape(-1)
  if bits == 8:
    return codes
  stream = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(stream.reshape(-1), bitorder="little")


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
  """Inverse of :func:`_pack_bits`: ``count`` codes of ``bits`` bits, as ``uint8``."""
  if bits == 8:
    return np.asarray(packed, np.uint8)[:count]
  stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
  return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


_ELEMENT_DTYPES = {  # (ebits, mbits) -> ml_dtypes type whose bit patterns are the codes
    (4, 3): ml_dtypes.float8_e4m3fn,
    (5, 2): ml_dtypes.float8_e5m2,
    (3, 2): ml_dtypes.float6_e3m2fn,
    (2, 3): ml_dtypes.float6_e2m3fn,
    (2, 1): ml_dtypes.float4_e2m1fn,
}


def _element_codes(v: np.ndarray, fmt: quant.Format) -> np.ndarray:
  """Codes of element values ``v`` (float64): ``int8`` for integer elements, else ``uint8``."""
  if fmt.kind == "int":
    return np.rint(v).astype(np.int8)
  if fmt.name == "mxint8":
    return np.rint(v * 64.0).astype(np.int8)
  return v.astype(_ELEMENT_DTYPES[fmt.ebits, fmt.mbits]).view(np.uint8)


def _element_values(codes: np.ndarray, fmt: quant.Format) -> np.ndarray:
  """Inverse of :func:`_element_codes`, as float64."""
  if fmt.kind == "int":
    return codes.astype(np.float64)
  if fmt.name == "mxint8":
    return codes.astype(np.float64) / 64.0
  return codes.view(_ELEMENT_DTYPES[fmt.ebits, fmt.mbits]).astype(np.float64)


def _store_codes(codes: np.ndarray, fmt: quant.Format) -> np.ndarray:
  """Codes as stored: as they are at 8 bits, else their low ``fmt.bits`` bits packed."""
  if fmt.bits == 8:
    return codes
  return _pack_bits(codes.view(np.uint8) & ((1 << fmt.bits) - 1), fmt.bits)


def _load_codes(stored: np.ndarray, fmt: quant.Format, count: int) -> np.ndarray:
  """Inverse of :func:`_store_codes` (integer codes are sign-extended back to ``int8``)."""
  if fmt.bits == 8:
    return np.asarray(stored)
  codes = _unpack_bits(stored, fmt.bits, count)
  if fmt.kind != "int":
    return codes
  shift = np.uint8(8 - fmt.bits)
  return ((codes << shift).view(np.int8) >> shift).astype(np.int8)


def _rows(a: np.ndarray, axis: int) -> np.ndarray:
  """The canonical ``(R, L)`` layout: ``axis`` last, other dims flattened."""
  return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def _unrows(a2: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
  moved = shape[:axis] + shape[axis + 1:] + (shape[axis],)
  return np.moveaxis(a2.reshape(moved), -1, axis)


def _scale_groups(a2: np.ndarray, lay: LeafLayout) -> np.ndarray:
  """``(R_s, C_s, group)`` view of ``a2`` with one scaling group per ``(r, c)``."""
  if lay.granularity == "tensor":
    return a2.reshape(1, 1, -1)
  if lay.granularity == "channel":
    return a2[:, None, :]
  return a2.reshape(a2.shape[0], -1, lay.block_size)


def _broadcast_scales(scales: np.ndarray, shape2: tuple[int, int]) -> np.ndarray:
  rows, cols = shape2
  return np.broadcast_to(np.repeat(scales, cols // scales.shape[1], axis=1), shape2)


_nvfp4_scales = jax.jit(quant_nvfp4.scales)


def _encode_nvfp4(q2: np.ndarray, xs2: np.ndarray, lay: LeafLayout, fmt: quant.Format):
  """NVFP4's codes, E4M3 block scales and per-tensor scale: the scales of the sparse input
  ``xs2``, as ``quantize`` computes them (:func:`jaxprune.quant_nvfp4.scales`); the codes
  are ``q2 / fl32(s_t s_b)``, each within a few ulps of an E2M1 value."""
  s_t, s_b, flushed = (np.asarray(a) for a in _nvfp4_scales(_scale_groups(xs2, lay)))
  s_b = np.where(flushed, np.float32(0), s_b[..., 0])
  s_t = np.where(flushed, np.float32(0), s_t)
  hp = _broadcast_scales((s_t * s_b).astype(np.float64), q2.shape)
  v = np.divide(q2.astype(np.float64), hp, out=np.zeros(q2.shape), where=hp > 0)
  return _element_codes(v, fmt), {
      "scales": s_b.astype(ml_dtypes.float8_e4m3fn).view(np.uint8),
      "tensor_scale": np.reshape(s_t, (1,)).astype(np.float32)}


def _encode_quantized(q2: np.ndarray, xs2: np.ndarray, lay: LeafLayout, fmt: quant.Format):
  """Element codes ``(R, L)`` and the scale arrays (by field name) of the quantized float32
  values ``q2``.

  ``xs2`` is the sparse input of the quantizer, whose group maxima give the
  int/FP8 (and NVFP4) scales; the MX shared exponent is read off the quantized
  block, whose largest magnitude is ``2^(e + emax)`` up to ``max_normal * 2^e``.
  """
  q64 = q2.astype(np.float64)
  if fmt.kind == "nvfp4":
    return _encode_nvfp4(q2, xs2, lay, fmt)
  if fmt.kind == "mx":
    top = np.abs(_scale_groups(q64, lay)).max(axis=-1)
    e = np.where(top > 0, np.frexp(top)[1] - 1 - fmt.emax, -126 - fmt.emax)
    e = np.maximum(e, -127)
    v = np.ldexp(q64, -_broadcast_scales(e, q2.shape))
    return _element_codes(v, fmt), {"scales": (e + 127).astype(np.uint8)}
  groups = _scale_groups(xs2.astype(np.float64), lay)
  amax = np.abs(groups).max(axis=-1)
  if lay.convention == "harma":  # s = D / (2^k - 1), D = 2 amax with a negative entry, else amax
    s = (amax * np.where((groups < 0).any(axis=-1), 2, 1) / (2**fmt.bits - 1)).astype(np.float32)
  else:
    s = (amax / fmt.max_normal).astype(np.float32)
  s_full = _broadcast_scales(s.astype(np.float64), q2.shape)
  v = np.divide(q64, s_full, out=np.zeros_like(q64), where=s_full > 0)
  return _element_codes(v, fmt), {"scales": s}


def _decode_quantized(codes2: np.ndarray, fields: Mapping[str, np.ndarray],
                      fmt: quant.Format) -> np.ndarray:
  v = _element_values(codes2, fmt)
  scales = np.asarray(fields["scales"])
  if fmt.kind == "nvfp4":  # fl32(code * fl32(s_t * s_b)): float32 products, as quantize's
    s_b = scales.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    hp = np.asarray(fields["tensor_scale"], np.float32)[0] * s_b
    return v.astype(np.float32) * _broadcast_scales(hp, codes2.shape)
  if fmt.kind == "mx":
    e = _broadcast_scales(scales.astype(np.int32) - 127, codes2.shape)
    return np.ldexp(v, e).astype(np.float32)
  return v.astype(np.float32) * _broadcast_scales(scales, codes2.shape)


def _index_bits(m: int) -> int:
  return (m - 1).bit_length()


# ---------------------------------------------------------------------------
# Export, decompression, Orbax.
# ---------------------------------------------------------------------------
@functools.partial(jax.tree_util.register_dataclass, data_fields=["leaves"],
                   meta_fields=["layouts", "treedef"])
@dataclasses.dataclass(frozen=True)
class CompressedParams:
  """A compressed parameter tree: per leaf a dict of numpy arrays and its layout.

  ``leaves[i]`` holds the arrays of leaf ``i`` (fields in the module docstring)
  and ``layouts[i]`` its static :class:`LeafLayout`; ``treedef`` rebuilds the
  original tree (None after :func:`load_compressed` without ``like``: nested
  dicts from the paths). A pytree whose leaves are the arrays.
  """

  leaves: tuple[dict[str, np.ndarray], ...]
  layouts: tuple[LeafLayout, ...]
  treedef: Any = None


def _encode(w: np.ndarray, lay: LeafLayout) -> dict[str, np.ndarray]:
  """The stored arrays of one selected leaf; checks that they decode bit-exactly."""
  fmt = quant.get_format(lay.fmt) if lay.fmt else None
  y, mask = compress_leaf(w, lay, dtype=jnp.float32 if fmt else None)
  a2 = _rows(y, lay.axis)
  m2 = None if mask is None else _rows(mask, lay.axis)
  fields = {}
  if fmt is None:
    codes2 = a2
  else:
    xs = w.astype(np.float32) if mask is None else np.where(mask, w.astype(np.float32), 0)
    codes2, scales = _encode_quantized(a2, _rows(xs, lay.axis), lay, fmt)
    fields.update(scales)
  if lay.nm is not None:
    n, m = lay.nm
    groups = m2.reshape(-1, m)
    kept = codes2.reshape(-1, m)[groups]
    if _index_bits(m):
      fields["index"] = _pack_bits(np.nonzero(groups)[1], _index_bits(m))
  elif m2 is not None:
    kept = codes2[m2]
    fields["mask"] = np.packbits(m2.reshape(-1), bitorder="little")
  else:
    kept = codes2.reshape(-1)
  fields["values"] = kept if fmt is None else _store_codes(kept, fmt)
  expected = y if fmt is None or lay.dtype == "float32" else compress_leaf(w, lay)[0]
  decoded = _decode(fields, lay)
  if not np.array_equal(_bit_view(decoded), _bit_view(expected)):
    bad = int(np.sum(_bit_view(decoded) != _bit_view(expected)))
    raise ValueError(
        f"{lay.path}: {bad} entries would not decode to compress()'s values bit for bit, "
        "e.g. a scaling group with amax / max_normal below the float32 normal range "
        "(2^-126); rescale the leaf or use an MX format.")
  return {k: np.ascontiguousarray(v) for k, v in fields.items()}


def _bit_view(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a).view(np.dtype(f"uint{8 * a.dtype.itemsize}"))


def _decode(fields: Mapping[str, np.ndarray], lay: LeafLayout) -> np.ndarray:
  """The leaf ``compress`` gives, from its stored arrays."""
  if not lay.compressed:
    return np.asarray(fields["dense"])
  fmt = quant.get_format(lay.fmt) if lay.fmt else None
  dtype = jnp.dtype(lay.dtype)
  length = lay.shape[lay.axis]
  rows = math.prod(lay.shape) // length
  if lay.nm is not None:
    n, m = lay.nm
    count = rows * length // m * n
    if _index_bits(m):
      index = _unpack_bits(fields["index"], _index_bits(m), count).astype(np.int64)
    else:
      index = np.zeros(count, np.int64)
    position = (np.arange(count) // n) * m + index  # flat position in (R, L)
  elif lay.sparsity is not None:
    bits = np.unpackbits(fields["mask"], count=rows * length, bitorder="little")
    position = np.flatnonzero(bits)
    count = position.size
  else:
    count = rows * length
    position = np.arange(count)
  values = np.asarray(fields["values"])
  if fmt is None:
    out = np.zeros(rows * length, dtype)
    out[position] = values
    return _unrows(out.reshape(rows, length), lay.shape, lay.axis)
  codes = _load_codes(values, fmt, count)
  full = np.zeros(rows * length, codes.dtype)
  full[position] = codes
  kept = np.zeros(rows * length, bool)
  kept[position] = True
  v = _decode_quantized(full.reshape(rows, length), fields, fmt)
  v = np.where(kept.reshape(rows, length), v, np.float32(0)).astype(dtype)
  v[_bit_view(v) == (1 << (8 * v.dtype.itemsize - 1))] = 0  # -0.0 -> +0.0, as compress.
  return _unrows(v, lay.shape, lay.axis)


def export_compressed(
    params,
    *,
    fmt: str | quant.Format | None = None,
    nm: tuple[int, int] | None = None,
    sparsity: float | None = None,
    axis: int | None = None,
    select=None,
    block_size: int | None = None,
    granularity: str | None = None,
    round: str = "even",
    convention: str = "absmax",
) -> CompressedParams:
  """Stores the selected leaves sparsified then quantized (S->Q), in real compressed form.

  Each selected leaf ``w`` becomes ``compress(w, fmt, nm=nm, sparsity=...,
  axis=..., order='sq', ...)`` stored as kept values (integer codes plus scales
  when quantized) with their positions (N:M indices or a bitmask); the layout is
  in the module docstring. Other leaves are stored as is.
  ``decompress(export_compressed(params, ...))`` equals ``compress`` of each
  selected leaf bit for bit (checked here: a leaf that cannot be stored
  exactly raises). Packing runs in numpy on the host.

  Args:
    params: parameter tree.
    fmt: a name in ``quant.FORMATS`` (symmetric int, FP8, MX or NVFP4), or None to
      store sparse float values.
    nm: ``(n, m)`` N:M sparsity along each leaf's ``axis``.
    sparsity: unstructured sparsity; per leaf as the selection resolves it
      (uniform, ERK, overrides).
    axis: grouping and scale axis for every selected leaf; None: each leaf's
      N:M axis from the selection (the input axis of a kernel).
    select: a ``Selection``, regex(es), or None for ``jaxprune.select()``.
    block_size, granularity, round, convention: as in ``quant.quantize``; the
      layout records ``round`` and ``convention`` (``convention='harma'`` stores
      ``k``-bit codes in ``[-2^(k-1), 2^(k-1) - 1]`` with its scales).

  Returns:
    A :class:`CompressedParams`.

  Raises:
    ValueError: for bad settings (as :func:`compress`), a non-finite selected
      leaf, or a leaf whose values cannot be stored bit-exactly.
  """
  layouts = leaf_layouts(params, select, fmt, sparsity, nm, axis, block_size, granularity,
                         (round, convention))
  leaves, treedef = jax.tree.flatten(params)
  stored = []
  for lay, leaf in zip(layouts, leaves, strict=True):
    w = np.asarray(jax.device_get(leaf))
    stored.append(_encode(check_finite(lay.path, w), lay) if lay.compressed else {"dense": w})
  return CompressedParams(tuple(stored), tuple(layouts), treedef)


def _nested(paths: Sequence[str], leaves: Sequence[Any]) -> dict:
  tree: dict = {}
  for path, leaf in zip(paths, leaves, strict=True):
    *parents, name = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def decompress(compressed: CompressedParams):
  """The parameter tree of ``compressed``: numpy arrays, compressed leaves as ``compress`` gives.

  With ``compressed.treedef`` None (loaded without ``like``), nested dicts keyed
  by the ``'/'``-split paths.
  """
  leaves = [_decode(f, lay) for f, lay in zip(compressed.leaves, compressed.layouts,
                                               strict=True)]
  if compressed.treedef is None:
    return _nested([lay.path for lay in compressed.layouts], leaves)
  return compressed.treedef.unflatten(leaves)


def _expected_fields(lay: LeafLayout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The shape and dtype of each array ``_encode`` stores for ``lay`` (from an all-zero leaf;
  an unstructured mask's ``values`` length is checked against the mask instead)."""
  if not lay.compressed:
    return {"dense": (tuple(lay.shape), np.dtype(lay.dtype))}
  zeros = np.zeros(lay.shape, np.dtype(lay.dtype))
  return {k: (v.shape, v.dtype) for k, v in _encode(zeros, lay).items()}


def check_stored(fields: Mapping[str, np.ndarray], lay: LeafLayout, where: str) -> None:
  """Raises unless ``fields`` are what ``_encode`` stores for ``lay``: the same arrays with
  their sizes and dtypes, N:M indices strictly increasing below ``m`` in every group, and an
  unstructured mask whose kept count is the layout's and matches the stored values."""
  try:
    expected = _expected_fields(lay)
  except (ValueError, TypeError, KeyError, IndexError) as e:
    raise ValueError(f"{where}: the layout of {lay.path} is not valid ({e}).") from e
  if set(fields) != set(expected):
    raise ValueError(f"{where}: {lay.path} stores {sorted(fields)}, its layout needs "
                     f"{sorted(expected)}.")
  for k, (shape, dtype) in expected.items():
    got = np.asarray(fields[k])
    if got.dtype != dtype or (got.shape != shape and not (k == "values" and "mask" in fields)):
      raise ValueError(f"{where}: {lay.path}'s {k!r} has shape {got.shape} and dtype "
                       f"{got.dtype}; its layout {tuple(lay.shape)} needs {shape} {dtype}.")
  if "mask" in fields:
    size = math.prod(lay.shape)
    bits = np.unpackbits(np.asarray(fields["mask"]), bitorder="little")
    kept = int(bits[:size].sum())
    want = size - int(masks_lib.num_pruned(lay.sparsity, size))
    stored = np.asarray(fields["values"]).size
    if bits[size:].any() or kept != want or stored != _values_size(kept, lay):
      raise ValueError(f"{where}: {lay.path}'s mask keeps {kept} of {size} entries, with "
                       f"{stored} stored values (padding bits set: {bool(bits[size:].any())}); "
                       f"sparsity {lay.sparsity} keeps {want}.")
  if "tensor_scale" in fields:
    _check_nvfp4_scales(fields, lay, where)
  if "index" in fields:
    n, m = lay.nm
    count = math.prod(lay.shape) // m * n
    index = _unpack_bits(np.asarray(fields["index"]), _index_bits(m), count).reshape(-1, n)
    if (index >= m).any() or (np.diff(index, axis=1) <= 0).any():
      raise ValueError(f"{where}: {lay.path}'s N:M indices are not {n} distinct positions "
                       f"below m={m} in every group.")


def _check_nvfp4_scales(fields: Mapping[str, np.ndarray], lay: LeafLayout, where: str) -> None:
  """NVFP4: a per-tensor scale of at least ``2^-120`` with E4M3 block scales in ``[2^-6, 448]``
  (bytes ``0x08`` to ``0x7E``), or a zero tensor scale with zero block scales."""
  s_t = float(np.asarray(fields["tensor_scale"]).reshape(-1)[0])
  s_b = np.asarray(fields["scales"])
  ok = ((s_t >= quant_nvfp4.MIN_TENSOR_SCALE and np.isfinite(s_t)
         and ((s_b >= 0x08) & (s_b <= 0x7E)).all()) or (s_t == 0 and not s_b.any()))
  if not ok:
    raise ValueError(f"{where}: {lay.path}'s NVFP4 scales are not what the format produces: "
                     f"tensor scale {s_t!r} (finite, >= 2^-120, or 0 with zero block scales), "
                     f"block scale bytes in [{int(s_b.min(initial=255))}, "
                     f"{int(s_b.max(initial=0))}] (E4M3 values in [2^-6, 448]: 8 to 126).")


def _values_size(kept: int, lay: LeafLayout) -> int:
  """The size of the stored ``values`` of ``kept`` entries (codes below 8 bits are packed)."""
  fmt = quant.get_format(lay.fmt) if lay.fmt else None
  return kept if fmt is None or fmt.bits == 8 else -(-kept * fmt.bits // 8)


def _layout_json(lay: LeafLayout) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in lay._asdict().items()}


def _layout_from_json(d: Mapping[str, Any]) -> LeafLayout:
  d = dict(d)
  d["shape"] = tuple(d["shape"])
  d["nm"] = None if d["nm"] is None else tuple(d["nm"])
  return LeafLayout(**d)


def _digest(layouts_json: list, leaves: Sequence[Mapping[str, np.ndarray]]) -> str:
  """sha256 of the layouts (canonical JSON) and of every stored array's name, dtype, shape and
  bytes, in order."""
  h = hashlib.sha256(json.dumps(layouts_json, sort_keys=True).encode())
  for i, fields in enumerate(leaves):
    for k in sorted(fields):
      a = np.ascontiguousarray(fields[k])
      h.update(f"{i}/{k}:{a.dtype.name}{a.shape}".encode())
      h.update(a.tobytes())
  return h.hexdigest()


def save_compressed(path: str | os.PathLike, compressed: CompressedParams) -> None:
  """Saves with Orbax: the arrays (``StandardSave``) and the layouts (``JsonSave``).

  ``path`` must not exist. Zero-size arrays, which Orbax refuses, are not
  written; their shapes are in the JSON, with a sha256 of the layouts and arrays
  that :func:`load_compressed` verifies.
  """
  import orbax.checkpoint as ocp

  arrays = {str(i): {k: v for k, v in f.items() if v.size}
            for i, f in enumerate(compressed.leaves)}
  meta = {
      "layouts": [_layout_json(lay) for lay in compressed.layouts],
      "arrays": [{k: [list(v.shape), v.dtype.name] for k, v in f.items()}
                 for f in compressed.leaves],
  }
  meta["sha256"] = _digest(meta["layouts"], compressed.leaves)
  arrays = {k: v for k, v in arrays.items() if v}
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  checkpointer.save(os.fspath(os.path.abspath(path)), ocp.args.Composite(
      arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))


def load_compressed(path: str | os.PathLike, like=None) -> CompressedParams:
  """Loads what :func:`save_compressed` wrote.

  Args:
    path: the checkpoint directory.
    like: optionally a tree with the original structure (params, or
      ``jax.ShapeDtypeStruct`` s); its leaf paths must match. Without it,
      :func:`decompress` returns nested dicts.

  Raises:
    ValueError: naming ``path``, when the layout JSON is unreadable, the arrays or layouts
      do not match the stored sha256 (a damaged or edited checkpoint), or a stored array
      does not fit its layout (sizes, dtypes, N:M indices, the mask's kept count).
  """
  import orbax.checkpoint as ocp

  path = os.fspath(os.path.abspath(path))
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    meta = checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    specs = [{k: (tuple(s), np.dtype(d)) for k, (s, d) in f.items()} for f in meta["arrays"]]
  except (ValueError, TypeError, KeyError) as e:   # json.JSONDecodeError is a ValueError
    raise ValueError(f"{path}: the layout file (meta) is not what save_compressed writes "
                     f"({type(e).__name__}: {e}); the checkpoint is damaged or edited.") from e
  target = {str(i): {k: np.zeros(s, d) for k, (s, d) in f.items() if math.prod(s)}
            for i, f in enumerate(specs)}
  target = {k: v for k, v in target.items() if v}
  arrays = {}
  if target:
    arrays = checkpointer.restore(path, ocp.args.Composite(
        arrays=ocp.args.StandardRestore(target)))["arrays"]
  leaves = tuple(
      {k: np.asarray(arrays[str(i)][k]) if math.prod(s) else np.zeros(s, d)
       for k, (s, d) in f.items()} for i, f in enumerate(specs))
  if meta.get("sha256") != _digest(meta["layouts"], leaves):
    raise ValueError(f"{path}: the stored arrays or layouts do not match the checksum written "
                     "by save_compressed (sha256 of both): the checkpoint is damaged or edited.")
  layouts = tuple(_layout_from_json(d) for d in meta["layouts"])
  if len(layouts) != len(leaves):
    raise ValueError(f"{path}: {len(layouts)} layouts for {len(leaves)} stored leaves.")
  for fields, lay in zip(leaves, layouts, strict=True):
    check_stored(fields, lay, path)
  treedef = None
  if like is not None:
    paths = selection_lib.leaf_paths(like)
    if paths != [lay.path for lay in layouts]:
      raise ValueError(f"`like` has leaf paths {paths}, the checkpoint "
                       f"{[lay.path for lay in layouts]}.")
    treedef = jax.tree.structure(like)
  return CompressedParams(leaves, layouts, treedef)
