"""A compressed checkpoint that was edited or damaged raises on load, naming the file."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import jaxprune

PARAMS = {"a": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))},
          "b": {"kernel": jax.random.normal(jax.random.key(1), (16, 8))}}
SELECT = jaxprune.select(head=None)


def _saved(tmp_path, **kw):
  path = str(tmp_path / "ckpt")
  jaxprune.save_compressed(path, jaxprune.export_compressed(PARAMS, select=SELECT, **kw))
  return path


def _meta_file(path):
  return os.path.join(path, "meta", "metadata")   # Orbax's JsonSave file


def _edited(tmp_path, path, edit):
  copy = str(tmp_path / "edited")
  shutil.copytree(path, copy)
  meta = _meta_file(copy)
  with open(meta) as f:
    text = f.read()
  with open(meta, "w") as f:
    f.write(edit(text))
  return copy


def _set_layout(key, value):
  def edit(text):
    meta = json.loads(text)
    meta["layouts"][0][key] = value
    return json.dumps(meta)
  return edit


@pytest.mark.parametrize("kw,key,value", [
    ({"fmt": "int4", "nm": (2, 4)}, "shape", [8, 16]),      # same size: only a checksum sees it
    ({"fmt": "int4", "nm": (2, 4)}, "nm", [1, 4]),
    ({"nm": (2, 4)}, "axis", 1),
    ({"fmt": "int8", "sparsity": 0.5}, "sparsity", 0.25),
    ({"fmt": "int8", "sparsity": 0.5}, "fmt", "int4"),
])
def test_an_edited_layout_raises_naming_the_file(tmp_path, kw, key, value):
  path = _saved(tmp_path, **kw)
  loaded = jaxprune.decompress(jaxprune.load_compressed(path))
  np.testing.assert_array_equal(loaded["a"]["kernel"],
                                jaxprune.decompress(_stored(kw))["a"]["kernel"])
  edited = _edited(tmp_path, path, _set_layout(key, value))
  with pytest.raises(ValueError, match=r"do not match the checksum.*damaged or edited") as e:
    jaxprune.load_compressed(edited)
  assert edited in str(e.value)


def test_garbled_json_names_the_file(tmp_path):
  path = _saved(tmp_path, fmt="int4", nm=(2, 4))
  edited = _edited(tmp_path, path, lambda text: text[:-7])
  with pytest.raises(ValueError, match=r"layout file \(meta\) is not what save_compressed writes"
                     r" \(JSONDecodeError") as e:
    jaxprune.load_compressed(edited)
  assert edited in str(e.value)


def _stored(kw):
  return jaxprune.export_compressed(PARAMS, select=SELECT, **kw)


def _with_field(compressed, leaf, key, value):
  leaves = list(compressed.leaves)
  leaves[leaf] = {**leaves[leaf], key: value}
  return dataclasses.replace(compressed, leaves=tuple(leaves))


@pytest.mark.parametrize("kw,key,change,match", [
    # Two N:M positions per group of 4, 2 bits each: 0b01010101 is (1, 1) in two groups.
    ({"nm": (2, 4)}, "index", lambda a: np.full_like(a, 0b01010101),
     r"N:M indices are not 2 distinct positions below m=4"),
    ({"nm": (2, 4)}, "index", lambda a: a[:-1],
     r"'index' has shape \(15,\) and dtype uint8; its layout \(16, 8\) needs \(16,\)"),
    ({"fmt": "int8", "sparsity": 0.5}, "mask", lambda a: np.full_like(a, 0xFF),
     r"mask keeps 128 of 128 entries, with 64 stored values"),
    ({"fmt": "int8", "sparsity": 0.5}, "values", lambda a: a[:-1],
     r"mask keeps 64 of 128 entries, with 63 stored values"),
    ({"fmt": "int4", "nm": (2, 4)}, "scales", lambda a: a.astype(np.float64),
     r"'scales' has shape .* and dtype float64"),
    # NVFP4: an E4M3 NaN (0x7F) as a block scale; an infinite per-tensor scale.
    ({"fmt": "nvfp4", "nm": (2, 4)}, "scales", lambda a: np.full_like(a, 0x7F),
     r"NVFP4 scales are not what the format produces.*bytes in \[127, 127\]"),
    ({"fmt": "nvfp4"}, "tensor_scale", lambda a: np.full_like(a, np.inf),
     r"NVFP4 scales are not what the format produces: tensor scale inf"),
])
def test_stored_arrays_that_do_not_fit_their_layout_raise(tmp_path, kw, key, change, match):
  """Arrays saved as they are (so the checksum holds) are still checked against the layout."""
  compressed = _stored(kw)
  bad = _with_field(compressed, 0, key, change(np.asarray(compressed.leaves[0][key])))
  path = str(tmp_path / "bad")
  jaxprune.save_compressed(path, bad)
  with pytest.raises(ValueError, match=match):
    jaxprune.load_compressed(path)
