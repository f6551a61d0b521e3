"""Tests for jaxprune.selection: paths, selection rules, overrides, ERK."""

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import selection as sel
from jaxprune.selection import LeafSpec


def f32(*shape):
  return np.zeros(shape, np.float32)


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(16, 8, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 16, rngs=rngs)


def nnx_params():
  return nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)


def linen_params():
  return {"params": {
      "Embed_0": {"embedding": f32(16, 8)},
      "Dense_0": {"kernel": f32(8, 8), "bias": f32(8)},
      "Conv_0": {"kernel": f32(3, 3, 8, 4), "bias": f32(4)},
      "LayerNorm_0": {"scale": f32(4), "bias": f32(4)},
      "lm_head": {"kernel": f32(4, 16)},
  }}


def specs_by_path(specs):
  return {s.path: s for s in specs if s is not None}


# --------------------------------------------------------------------------- #
# Paths.
# --------------------------------------------------------------------------- #


class Pair(NamedTuple):
  w: np.ndarray
  b: np.ndarray


def test_paths_dict_list_namedtuple():
  tree = {"a": [f32(2), (f32(1), f32(3))], "p": Pair(f32(2, 2), f32(2))}
  assert sel.leaf_paths(tree) == ["a/0", "a/1/0", "a/1/1", "p/w", "p/b"]


def test_paths_linen():
  assert sel.leaf_paths(linen_params()) == [
      "params/Conv_0/bias", "params/Conv_0/kernel", "params/Dense_0/bias",
      "params/Dense_0/kernel", "params/Embed_0/embedding", "params/LayerNorm_0/bias",
      "params/LayerNorm_0/scale", "params/lm_head/kernel",
  ]


def test_paths_nnx_state_drop_value():
  state = nnx_params()
  paths = sel.leaf_paths(state)
  assert paths == [
      "blocks/0/bias", "blocks/0/kernel", "blocks/1/bias", "blocks/1/kernel",
      "embed/embedding", "head/bias", "head/kernel", "norm/bias", "norm/scale",
  ]
  assert len(paths) == len(jax.tree_util.tree_leaves(state))


def test_path_str_keys():
  tu = jax.tree_util
  key_path = (tu.DictKey("blocks"), tu.DictKey(0), tu.DictKey("kernel"), tu.GetAttrKey("value"))
  assert sel.path_str(key_path) == "blocks/0/kernel"
  assert sel.path_str((tu.GetAttrKey("w"), tu.GetAttrKey("raw_value"))) == "w"
  # Only a trailing `.value` is dropped; a dict key named 'value' is a name.
  assert sel.path_str((tu.DictKey("value"), tu.SequenceKey(2))) == "value/2"
  assert sel.path_str(()) == ""


# --------------------------------------------------------------------------- #
# Selection rules.
# --------------------------------------------------------------------------- #


def test_default_selects_kernels_only_nnx():
  specs = sel.resolve(sel.select(), nnx_params(), 0.5)
  assert list(specs_by_path(specs)) == ["blocks/0/kernel", "blocks/1/kernel"]
  assert all(s.sparsity == 0.5 and s.axis == 0 for s in specs if s)


def test_default_selects_kernels_only_linen():
  specs = specs_by_path(sel.resolve(sel.select(), linen_params(), 0.5))
  assert specs == {
      "params/Conv_0/kernel": LeafSpec("params/Conv_0/kernel", 0.5, 2),  # HWIO: I axis.
      "params/Dense_0/kernel": LeafSpec("params/Dense_0/kernel", 0.5, 0),
  }


def test_prune_embeddings_adds_embedding_and_head():
  specs = specs_by_path(sel.resolve(sel.select(prune_embeddings=True), nnx_params(), 0.5))
  assert set(specs) == {"blocks/0/kernel", "blocks/1/kernel", "embed/embedding", "head/kernel"}
  specs = specs_by_path(sel.resolve(sel.select(prune_embeddings=True), linen_params(), 0.5))
  assert "params/Embed_0/embedding" in specs and "params/lm_head/kernel" in specs


@pytest.mark.parametrize("path", [
    "embed/embedding", "params/Embed_0/embedding", "pos_embed", "vit/pos_embedding",
    "lm_head/kernel", "head/kernel", "params/head/kernel", "model/Head_0/kernel",
    "unembed/kernel", "logits/kernel", "transformer/wte", "transformer/wpe",
])
def test_default_exclude_matches(path):
  assert re.search(sel.DEFAULT_EXCLUDE, path)


@pytest.mark.parametrize("path", [
    "blocks/0/kernel", "attn/heads/kernel", "multi_head_attention/query/kernel",
    "params/Dense_0/kernel", "ahead/kernel", "mlp/fc1/kernel",
])
def test_default_exclude_does_not_match(path):
  assert not re.search(sel.DEFAULT_EXCLUDE, path)


def test_include_exclude():
  params = linen_params()
  specs = specs_by_path(sel.resolve(sel.select("Dense|head"), params, 0.5))
  # Explicit include replaces the default rule: the bias and the head are selected.
  assert set(specs) == {"params/Dense_0/kernel", "params/Dense_0/bias", "params/lm_head/kernel"}
  assert specs["params/Dense_0/bias"].axis == 0
  specs = specs_by_path(sel.resolve(sel.select(["Dense", "Conv"], exclude="bias"), params, 0.5))
  assert set(specs) == {"params/Dense_0/kernel", "params/Conv_0/kernel"}
  specs = specs_by_path(sel.resolve(sel.select(exclude="Conv"), params, 0.5))
  assert set(specs) == {"params/Dense_0/kernel"}


def test_overrides_sparsity_axis_and_first_match():
  selection = sel.select(overrides={
      "Conv_0": {"sparsity": 0.25, "axis": -1},
      "kernel": {"sparsity": 0.75},  # Also matches Conv_0/kernel, but comes second.
  })
  specs = specs_by_path(sel.resolve(selection, linen_params(), 0.5))
  assert specs["params/Conv_0/kernel"] == LeafSpec("params/Conv_0/kernel", 0.25, 3)
  assert specs["params/Dense_0/kernel"] == LeafSpec("params/Dense_0/kernel", 0.75, 0)


def test_override_zero_keeps_dense_and_skips_nm_check():
  # Conv_0's input axis has 8 channels; with m=16 it would fail unless kept dense.
  selection = sel.select(overrides={"Conv_0": {"sparsity": 0.0}})
  specs = sel.resolve(selection, linen_params(), 0.5, m=8)
  paths = sel.leaf_paths(linen_params())
  assert specs[paths.index("params/Conv_0/kernel")] is None
  assert specs[paths.index("params/Dense_0/kernel")] == LeafSpec(
      "params/Dense_0/kernel", 0.5, 0)


def test_resolve_shape_dtype_struct_and_order():
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), linen_params())
  specs = sel.resolve(sel.select(), params, 0.9, m=4)
  assert len(specs) == len(jax.tree_util.tree_leaves(params))
  assert [s.path if s else None for s in specs] == [
      None, "params/Conv_0/kernel", None, "params/Dense_0/kernel", None, None, None, None]


def test_selection_hashable_and_equal():
  a = sel.select("kernel", overrides={"x": {"axis": 1}})
  b = sel.select(["kernel"], overrides={"x": {"axis": 1}})
  assert a == b and hash(a) == hash(b)


def test_bfloat16_selected():
  params = {"w": jnp.zeros((4, 4), jnp.bfloat16)}
  assert sel.resolve(sel.select(), params, 0.5) == [LeafSpec("w", 0.5, 0)]


# --------------------------------------------------------------------------- #
# Errors.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kwargs, match", [
    ({"include": "("}, r"`include` regex '\('"),
    ({"include": ["ok", "[a-"]}, r"`include` regex '\[a-'"),
    ({"exclude": "(?P<"}, r"`exclude` regex"),
    ({"overrides": {"(": {"sparsity": 0.5}}}, r"`overrides` regex '\('"),
    ({"distribution": "erdos"}, r"`distribution` must be one of \('uniform', 'erk'\)"),
    ({"overrides": {"k": {"sparse": 0.5}}}, r"overrides\['k'\].*unknown keys \['sparse'\]"),
    ({"overrides": {"k": {"sparsity": 1.0}}}, r"overrides\['k'\]\['sparsity'\].*\[0, 1\)"),
    ({"overrides": {"k": {"sparsity": -0.1}}}, r"overrides\['k'\]\['sparsity'\]"),
    ({"overrides": {"k": {"axis": 0.5}}}, r"overrides\['k'\]\['axis'\].*integer"),
    ({"overrides": {"k": 0.5}}, r"overrides\['k'\].*must be a dict"),
])
def test_construction_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sel.select(**kwargs)


def test_include_matches_nothing_lists_paths():
  with pytest.raises(ValueError, match=r"`include` regex 'nope' matches no leaf.*Dense_0"):
    sel.resolve(sel.select(["Dense", "nope"]), linen_params(), 0.5)


def test_include_error_truncates_long_listing():
  params = {f"layer{i}": f32(2, 2) for i in range(100)}
  with pytest.raises(ValueError, match=r"\.\.\. \(80 more\)") as e:
    sel.resolve(sel.select("nope"), params, 0.5)
  assert len(str(e.value)) < 600


def test_override_matches_no_selected_leaf():
  # 'bias' exists, but is not selected by the default rule.
  with pytest.raises(ValueError, match=r"`overrides` regex 'bias' matches no selected leaf"):
    sel.resolve(sel.select(overrides={"bias": {"sparsity": 0.1}}), linen_params(), 0.5)


def test_integer_leaf_error():
  params = {"w": f32(4, 4), "step": np.zeros((4, 4), np.int32), "flag": np.zeros(3, bool)}
  with pytest.raises(ValueError, match="integer leaves cannot be pruned: step"):
    sel.resolve(sel.select("w|step"), params, 0.5)
  with pytest.raises(ValueError, match="bool leaves cannot be pruned: flag"):
    sel.resolve(sel.select("flag"), params, 0.5)
  # The default rule skips them silently.
  assert specs_by_path(sel.resolve(sel.select(), params, 0.5)).keys() == {"w"}


def test_axis_out_of_range():
  with pytest.raises(ValueError, match=r"`axis` 2 is out of range for params/Dense_0/kernel"):
    sel.resolve(sel.select(overrides={"Dense": {"axis": 2}}), linen_params(), 0.5)
  with pytest.raises(ValueError, match=r"`axis` -5 is out of range for params/Conv_0/kernel"):
    sel.resolve(sel.select(overrides={"Conv": {"axis": -5}}), linen_params(), 0.5)


def test_axis_not_divisible_by_m():
  with pytest.raises(ValueError, match=r"params/Conv_0/kernel: size 8 of axis 2.*m=16"):
    sel.resolve(sel.select("Conv_0/kernel"), linen_params(), 0.5, m=16)
  with pytest.raises(ValueError, match=r"`m` must be >= 1"):
    sel.resolve(sel.select(), linen_params(), 0.5, m=0)


@pytest.mark.parametrize("sparsity", [1.0, -0.01, 1.5])
def test_sparsity_out_of_range(sparsity):
  with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
    sel.resolve(sel.select(), linen_params(), sparsity)


def test_selects_nothing():
  with pytest.raises(ValueError, match="selects no leaf"):
    sel.resolve(sel.select(), {"b": f32(4), "head": {"kernel": f32(4, 4)}}, 0.5)
  with pytest.raises(ValueError, match="selects no leaf"):
    sel.resolve(sel.select("kernel", exclude="Dense|Conv|head"), linen_params(), 0.5)


def test_scalar_leaf_error():
  with pytest.raises(ValueError, match="scalar leaves cannot be pruned: s"):
    sel.resolve(sel.select("s"), {"s": np.float32(1.0)}, 0.5)


# --------------------------------------------------------------------------- #
# ERK.
# --------------------------------------------------------------------------- #


def test_erk_hand_computed():
  # a: raw (4+4)/16 = 1/2, b: raw (2+8)/16 = 5/8, 16 weights each.
  # eps * (16/2 + 16*5/8) = 0.5 * 32  =>  eps = 16/18 = 8/9.
  # densities: a 4/9, b 5/9.
  out = sel.erk_sparsities({"a": (4, 4), "b": (2, 8)}, 0.5)
  assert out == pytest.approx({"a": 5 / 9, "b": 4 / 9})


def test_erk_power_scale_zero_is_uniform():
  out = sel.erk_sparsities({"a": (4, 4), "b": (2, 8), "c": (3, 3, 8, 16)}, 0.8, power_scale=0.0)
  assert out == pytest.approx({"a": 0.8, "b": 0.8, "c": 0.8})


def test_erk_over_allocation_made_dense():
  # Without the fix, b would get density eps * 1 = 249.5.
  shapes = {"a": (1000, 1000), "b": (2, 2)}
  out = sel.erk_sparsities(shapes, 0.5)
  assert out["b"] == 0.0
  # The other layer compensates for b's 4 - 2 extra weights: 500002 - 4 = 499998 left.
  assert out["a"] == pytest.approx(1 - 499_998 / 1_000_000, abs=1e-12)
  nnz = sum((1 - out[n]) * math.prod(s) for n, s in shapes.items())
  assert nnz == pytest.approx(0.5 * 1_000_004)


def test_erk_cascade_of_dense_layers():
  shapes = {"big": (512, 512), "mid": (16, 16), "small": (4, 4), "tiny": (2, 2)}
  out = sel.erk_sparsities(shapes, 0.9)
  total = sum(math.prod(s) for s in shapes.values())
  nnz = sum((1 - out[n]) * math.prod(s) for n, s in shapes.items())
  assert nnz == pytest.approx(0.1 * total)
  assert out["tiny"] == 0.0 and out["small"] == 0.0
  assert all(0.0 <= s < 1.0 for s in out.values())


def test_erk_zero_sparsity_all_dense():
  assert sel.erk_sparsities({"a": (8, 8), "b": (3, 5)}, 0.0) == {"a": 0.0, "b": 0.0}


def test_erk_fixed_counts_against_budget():
  # 100 fixed dense weights come out of the global budget of 0.5 * 10100 = 5050.
  out = sel.erk_sparsities({"a": (10, 10), "b": (100, 100)}, 0.5, fixed={"a": 0.0})
  assert out["a"] == 0.0
  assert out["b"] == pytest.approx(1 - 4950 / 10000)


def test_erk_fixed_errors():
  with pytest.raises(ValueError, match="`fixed` layers hold more non-zeros"):
    sel.erk_sparsities({"a": (100, 100), "b": (10, 10)}, 0.9, fixed={"a": 0.0})
  with pytest.raises(ValueError, match="`fixed` layers are too sparse"):
    sel.erk_sparsities({"a": (100, 100), "b": (10, 10)}, 0.1, fixed={"a": 0.99})
  with pytest.raises(ValueError, match=r"`fixed` names \['c'\]"):
    sel.erk_sparsities({"a": (10, 10)}, 0.5, fixed={"c": 0.5})
  with pytest.raises(ValueError, match=r"`fixed\['a'\]` must be in \[0, 1\)"):
    sel.erk_sparsities({"a": (10, 10), "b": (3, 3)}, 0.5, fixed={"a": 1.0})
  with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
    sel.erk_sparsities({"a": (10, 10)}, 1.0)
  # All layers fixed: nothing to distribute, no budget to meet.
  assert sel.erk_sparsities({"a": (10, 10)}, 0.5, fixed={"a": 0.1}) == {"a": 0.1}


def test_resolve_erk_with_override():
  params = {"a": f32(64, 64), "b": f32(32, 64), "c": f32(16, 16)}
  shapes = {"a": (64, 64), "b": (32, 64), "c": (16, 16)}
  # head=None: 'c', the last layer, would otherwise be left dense as the output head.
  out = specs_by_path(sel.resolve(sel.select(distribution="erk", head=None), params, 0.5))
  assert {k: v.sparsity for k, v in out.items()} == pytest.approx(
      sel.erk_sparsities(shapes, 0.5))
  # As rigl: an overridden leaf keeps its target and is outside the ERK budget,
  # which the other leaves share.
  selection = sel.select(distribution="erk", head=None, overrides={"c": {"sparsity": 0.25}})
  out = sel.resolve(selection, params, 0.5)
  expected = sel.erk_sparsities({"a": (64, 64), "b": (32, 64)}, 0.5)
  assert [s.sparsity for s in out[:2]] == pytest.approx([expected["a"], expected["b"]])
  assert out[2].sparsity == 0.25
  shapes = [(64, 64), (32, 64)]
  nnz = sum((1 - s.sparsity) * math.prod(shp) for s, shp in zip(out[:2], shapes, strict=True))
  assert nnz == pytest.approx(0.5 * (64 * 64 + 32 * 64))


@st.composite
def erk_cases(draw):
  n = draw(st.integers(1, 6))
  shapes = {
      f"l{i}": tuple(draw(st.lists(st.integers(1, 64), min_size=1, max_size=4)))
      for i in range(n)
  }
  sparsity = draw(st.floats(0.0, 0.99))
  power_scale = draw(st.sampled_from([0.0, 0.5, 1.0]))
  return shapes, sparsity, power_scale


@settings(max_examples=200, deadline=None)
@given(erk_cases())
def test_erk_property(case):
  shapes, sparsity, power_scale = case
  out = sel.erk_sparsities(shapes, sparsity, power_scale=power_scale)
  assert set(out) == set(shapes)
  assert all(0.0 <= s < 1.0 for s in out.values())
  sizes = {n: math.prod(s) for n, s in shapes.items()}
  target = (1 - sparsity) * sum(sizes.values())
  exact = sum((1 - out[n]) * sizes[n] for n in shapes)
  assert exact == pytest.approx(target, rel=1e-9, abs=1e-6)
  rounded = sum(round((1 - out[n]) * sizes[n]) for n in shapes)
  assert abs(rounded - target) <= len(shapes)
  # Layers not made dense keep ERK's ratios: density / raw is one constant eps.
  eps = [(1 - out[n]) / (sum(shapes[n]) / sizes[n]) ** power_scale
         for n in shapes if out[n] > 0]
  assert np.allclose(eps, eps[0]) if eps else True


@settings(max_examples=100, deadline=None)
@given(erk_cases(), st.floats(0.0, 0.99))
def test_erk_property_with_fixed(case, fixed_sparsity):
  shapes, sparsity, power_scale = case
  fixed = {"l0": fixed_sparsity}
  try:
    out = sel.erk_sparsities(shapes, sparsity, power_scale=power_scale, fixed=fixed)
  except ValueError as e:
    assert "`fixed` layers" in str(e)
    return
  assert out["l0"] == fixed_sparsity
  assert all(0.0 <= s < 1.0 for s in out.values())
  sizes = {n: math.prod(s) for n, s in shapes.items()}
  if len(shapes) > 1:  # With free layers the global budget is met exactly.
    exact = sum((1 - out[n]) * sizes[n] for n in shapes)
    assert exact == pytest.approx((1 - sparsity) * sum(sizes.values()), rel=1e-6, abs=1e-6)
