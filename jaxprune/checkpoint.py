"""Orbax checkpoints of a training run, with fallback past a damaged latest step.

A checkpoint is one Orbax step directory holding two items:

* ``state``: the arrays (params, the whole optimizer state: masks, master
  weights, STEP's phase, ...), saved with ``StandardSave`` and restored into
  the structure, dtypes and shardings of an abstract target;
* ``meta``: JSON (the config, the data position, host-side accumulators).

Orbax writes each step into a temporary directory and renames it when it is
complete, so a process killed mid-save leaves no step behind that looks
finished. A step that is listed but cannot be read (files truncated or
deleted after the fact) is moved aside to ``<workdir>/corrupt_checkpoints/``
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
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


def manager(workdir: str | pathlib.Path, *, keep: int) -> ocp.CheckpointManager:
  """A manager of ``<workdir>/checkpoints`` that keeps the last ``keep`` steps."""
  if keep < 1:
    raise ValueError(f"`keep` must be >= 1, got {keep}.")
  root = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(root, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as ``step``."""
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
                   check_meta: Callable[[dict], None] | None = None
                   ) -> tuple[int, Any, dict] | None:
  """The newest readable checkpoint as ``(step, state, meta)``, or ``None``.

  ``abstract_state`` gives the structure, shapes, dtypes and shardings to
  restore into (e.g. ``jax.eval_shape`` of the initial state with
  ``sharding`` set). ``check_meta`` is called on the metadata before any
  array is read; its errors (e.g. a config that does not match) propagate,
  so a valid checkpoint of another run is never mistaken for a damaged one.
  Unreadable steps are moved aside with a warning.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      if not isinstance(meta, dict):
        raise ValueError("checkpoint metadata is not a JSON object")
    except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable.
      _warn_and_move(mngr, step, e)
      continue
    if check_meta is not None:
      check_meta(meta)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
      return step, restored["state"], meta
    except Exception as e:  # noqa: BLE001
      _warn_and_move(mngr, step, e)
  return None


def _warn_and_move(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
  moved = _move_aside(mngr, step)
  logging.warning("checkpoint step %d is unreadable (%s: %s); moved it to %s and "
                  "trying the previous one.", step, type(error).__name__, error, moved)
