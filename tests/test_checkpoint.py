"""Checkpoint integrity: per-array checksums, fallback past damaged or incomplete steps."""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxprune import checkpoint


def _state(scale: float = 1.0):
  return {"w": jnp.arange(4096, dtype=jnp.float32) / 7 * scale,
          "h": jnp.ones((8, 8), jnp.bfloat16) * scale,
          "mask": jnp.arange(64) % 3 == 0,
          "step": jnp.asarray(int(scale), jnp.int32)}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _two_steps(workdir):
  mngr = checkpoint.manager(workdir, keep=2)
  checkpoint.save(mngr, 1, _state(1.0), {"config": {}, "accumulators": {}})
  checkpoint.save(mngr, 2, _state(2.0), {"config": {}, "accumulators": {}})
  return mngr


def _largest_data_file(workdir, step) -> pathlib.Path:
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
           if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def test_checksum_changes_with_any_single_word_and_not_with_sharding():
  x = jnp.arange(1000, dtype=jnp.float32)
  base = checkpoint.checksums({"x": x})["x"]
  for i in (0, 1, 499, 999):
    for delta in (1, 2**31, 0x5A5A):
      bits = np.asarray(x).view(np.uint32).copy()
      bits[i] ^= np.uint32(delta)
      changed = checkpoint.checksums({"x": jnp.asarray(bits.view(np.float32))})["x"]
      assert changed != base
  # Swapping two entries changes it too (the multipliers depend on the position).
  swapped = x.at[3].set(x[4]).at[4].set(x[3])
  assert checkpoint.checksums({"x": swapped})["x"] != base
  # Dtype and shape are part of the record.
  assert checkpoint.checksums({"x": x.reshape(10, 100)})["x"] != base


def test_flipped_bytes_fall_back_to_the_previous_step(tmp_path, caplog):
  _two_steps(tmp_path)
  data = _largest_data_file(tmp_path, 2)
  raw = bytearray(data.read_bytes())
  for pos in range(64, len(raw), max(len(raw) // 8, 1)):
    raw[pos] ^= 0x5A
  data.write_bytes(bytes(raw))
  mngr = checkpoint.manager(tmp_path, keep=2)
  with caplog.at_level(logging.WARNING):
    step, state, _ = checkpoint.restore_latest(mngr, _abstract(_state()))
  assert step == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state, _state(1.0))
  assert "step 2 is unreadable" in caplog.text
  assert len(list((tmp_path / checkpoint.CORRUPT_DIR).iterdir())) == 1


def test_every_single_byte_flip_is_caught_or_unreadable(tmp_path):
  """No flipped byte of the data file ever restores a state that differs from the saved one."""
  _two_steps(tmp_path)
  data = _largest_data_file(tmp_path, 2)
  original = data.read_bytes()
  caught = 0
  for pos in range(0, len(original), max(len(original) // 12, 1)):
    raw = bytearray(original)
    raw[pos] ^= 0x01
    data.write_bytes(bytes(raw))
    mngr = checkpoint.manager(tmp_path, keep=2)
    try:
      step, state, _ = checkpoint.restore_latest(mngr, _abstract(_state()))
    finally:
      # Put step 2 back for the next position (restore_latest moved it aside).
      for moved in (tmp_path / checkpoint.CORRUPT_DIR).glob("2.*"):
        moved.rename(tmp_path / "checkpoints" / "2")
        caught += 1
      data.write_bytes(original)
    expected = _state(2.0) if step == 2 else _state(1.0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state, expected)
  assert caught >= 1


@pytest.mark.parametrize("drop", ["config", "accumulators"])
def test_metadata_without_a_required_key_is_moved_aside(tmp_path, drop):
  mngr = checkpoint.manager(tmp_path, keep=3)
  checkpoint.save(mngr, 1, _state(1.0), {"config": {}, "accumulators": {}})
  meta = {"config": {}, "accumulators": {}}
  del meta[drop]
  checkpoint.save(mngr, 2, _state(2.0), meta)
  step, _, _ = checkpoint.restore_latest(mngr, _abstract(_state()),
                                         required_keys=("config", "accumulators"))
  assert step == 1
  assert [p.name.split(".")[0] for p in (tmp_path / checkpoint.CORRUPT_DIR).iterdir()] == ["2"]


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
  """A checkpoint written before checksums existed (no key) is used, and the log says so."""
  mngr = checkpoint.manager(tmp_path, keep=2)
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(1.0)),
                                       meta=ocp.args.JsonSave({})), force=True)
  mngr.wait_until_finished()
  with caplog.at_level(logging.WARNING):
    step, state, meta = checkpoint.restore_latest(checkpoint.manager(tmp_path, keep=2),
                                                  _abstract(_state()))
  assert step == 1 and checkpoint.CHECKSUM_KEY not in meta
  assert "has no checksums" in caplog.text
  # An empty or partial record is not "no record": it names different leaves.
  with pytest.raises(checkpoint.IntegrityError, match="different leaves"):
    checkpoint.verify(state, {})
