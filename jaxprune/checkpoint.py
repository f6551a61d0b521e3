"""Orbax checkpoints of a training run, with fallback past a damaged latest step.

A checkpoint is one Orbax step directory holding two items:

* ``state``: the arrays (params, the whole optimizer state: masks, master
  weights, STEP's phase, ...), saved with ``StandardSave`` and restored into
  the structure, dtypes and shardings of an abstract target;
* ``meta``: JSON (the config, the data position, host-side accumulators) and
  a checksum of every array of ``state`` (:func:`checksums`).

Orbax writes each step into a temporary directory and renames it when it is
complete, so a process killed mid-save leaves no step behind that looks
finished. A step that is listed but cannot be read (files truncated or
deleted after the fact), whose metadata lacks a required key, or whose arrays
do not match the checksums saved with them (a flipped byte in a data file
that the storage layer reads without complaint) is moved aside to ``<workdir>/corrupt_checkpoints/``
(never deleted), a warning is logged, and the previous step is tried.

With several processes (``jax.distributed``), every process calls these
functions on the same directory, which all of them must see (a shared file
system): Orbax writes each shard once, from a process that holds it, and the
step's metadata from process 0; process 0 alone moves a damaged step aside,
and the others wait for it.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxprune import selection as selection_lib

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
CHECKSUM_KEY = "checksums"
# Odd multipliers of the two checksum lanes (the 32-bit golden ratio and a Murmur3 constant).
_LANE_A, _LANE_B = 0x9E3779B1, 0x85EBCA77


class IntegrityError(ValueError):
  """A checkpoint's arrays do not match the checksums saved with them."""


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as a flat uint32 array (8- and 16-bit values widened, 64-bit split)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = 8 * x.dtype.itemsize
  if bits == 64:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
  return unsigned.astype(jnp.uint32).reshape(-1)


def _checksum(x: jax.Array) -> jax.Array:
  """Two 32-bit lanes ``sum_i w_i * a_i`` and ``sum_i rotl(w_i, 13) * b_i`` (mod 2^32).

  ``a_i`` and ``b_i`` are odd, position-dependent multipliers, so any change of
  a single word changes both lanes (an odd number is invertible mod 2^32), and
  swapped words change them too. Integer sums wrap exactly whatever the order
  of the reduction: the same value on every backend, sharding and device count.
  """
  w = _words(x)
  i = jnp.arange(w.size, dtype=jnp.uint32)
  a = (i * jnp.uint32(_LANE_A)) | jnp.uint32(1)
  b = ((i ^ (i >> 16)) * jnp.uint32(_LANE_B)) | jnp.uint32(1)
  rot = (w << 13) | (w >> 19)
  return jnp.stack([jnp.sum(w * a, dtype=jnp.uint32), jnp.sum(rot * b, dtype=jnp.uint32)])


def checksums(state: Any) -> dict[str, str]:
  """``path -> 'dtype shape hex'`` for every array leaf of ``state``, computed on device.

  Only two 32-bit words per array cross to the host, so this works for
  arrays sharded over devices and hosts without gathering them.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  named = [(selection_lib.path_str(path), leaf) for path, leaf in flat
           if isinstance(leaf, jax.Array)]
  sums = jax.device_get(_all_checksums([leaf for _, leaf in named]))
  return {name: f"{leaf.dtype} {tuple(leaf.shape)} {int(s[0]):08x}{int(s[1]):08x}"
          for (name, leaf), s in zip(named, sums, strict=True)}


@jax.jit
def _all_checksums(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_checksum(x) for x in leaves]


def verify(state: Any, expected: dict[str, str]) -> None:
  """Raises :class:`IntegrityError` naming the first array whose checksum differs."""
  actual = checksums(state)
  missing = sorted(set(expected) ^ set(actual))
  if missing:
    raise IntegrityError(f"the checkpoint's arrays and checksums name different leaves: "
                         f"{missing[:5]}")
  for key, want in expected.items():
    if actual[key] != want:
      raise IntegrityError(f"array {key!r} does not match its checksum "
                           f"(saved {want}, read {actual[key]})")


def manager(workdir: str | pathlib.Path, *, keep: int) -> ocp.CheckpointManager:
  """A manager of ``<workdir>/checkpoints`` that keeps the last ``keep`` steps."""
  if keep < 1:
    raise ValueError(f"`keep` must be >= 1, got {keep}.")
  root = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(root, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON, plus the state's checksums)."""
  meta = {**meta, CHECKSUM_KEY: checksums(state)}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  root = pathlib.Path(str(mngr.directory))
  target = root.parent / CORRUPT_DIR / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:  # Every process finds the step unreadable; one moves it.
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(root / str(step)), str(target))
  if jax.process_count() > 1:  # No process lists the steps again before the move is done.
    multihost_utils.sync_global_devices(f"jaxprune_move_aside_{step}")
  mngr.reload()
  return target


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   check_meta: Callable[[dict], None] | None = None,
                   required_keys: tuple[str, ...] = ()) -> tuple[int, Any, dict] | None:
  """The newest readable checkpoint as ``(step, state, meta)``, or ``None``.

  ``abstract_state`` gives the structure, shapes, dtypes and shardings to
  restore into (e.g. ``jax.eval_shape`` of the initial state with
  ``sharding`` set). ``check_meta`` is called on the metadata before any
  array is read; its errors (e.g. a config that does not match) propagate,
  so a valid checkpoint of another run is never mistaken for a damaged one.
  Unreadable steps, steps whose metadata lacks one of ``required_keys`` or the
  checksums, and steps whose arrays do not match their checksums are moved
  aside with a warning.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict):
        raise ValueError("checkpoint metadata is not a JSON object")
      absent = [k for k in required_keys if k not in meta]
      if absent:
        raise ValueError(f"checkpoint metadata lacks {absent}")
    except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable.
      _warn_and_move(mngr, step, e)
      continue
    if check_meta is not None:
      check_meta(meta)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
      if CHECKSUM_KEY in meta:
        verify(restored["state"], meta[CHECKSUM_KEY])
      else:
        logging.warning("checkpoint step %d has no checksums (written by an older jaxprune): "
                        "its arrays are not verified.", step)
      return step, restored["state"], meta
    except Exception as e:  # noqa: BLE001
      _warn_and_move(mngr, step, e)
  return None


def _warn_and_move(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  moved = _move_aside(mngr, step)
  logging.warning("checkpoint step %d is unreadable (%s: %s); moved it to %s and "
                  "trying the previous one.", step, type(error).__name__, error, moved)
