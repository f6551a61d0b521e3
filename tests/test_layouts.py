"""Default selection and grouping axes that follow the layer: jaxprune.layouts via select/resolve.

Every expected axis below is written out by hand from the framework's kernel
layout (Flax ``(in, out)``, ``HWIO``, attention ``(in, heads, head_dim)`` and
``(heads, head_dim, out)``, Equinox ``(out, in)`` and ``(out, in, kh, kw)``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune import layouts
from jaxprune import selection as sel

try:
  from . import framework_models as fm
except ImportError:
  import framework_models as fm

eqx = pytest.importorskip("equinox")


@functools.cache
def case(name):
  return getattr(fm, name)()


CASES = [b.__name__ for b in fm.ALL]


def f32(*shape):
  return np.ones(shape, np.float32)


def planned(selection, params, **kwargs):
  plan, skipped = sel.plan_leaves(selection, params, **kwargs)
  return {p.path: p.axis for p in plan if p is not None}, {s.path for s in skipped}


@pytest.mark.parametrize("name", CASES)
def test_defaults_follow_the_layer(name):
  c = case(name)
  # N:M (m = 4): every kernel on its reduction axis; biases (Equinox conv (8, 1, 1), attention
  # (heads, head_dim)), the head and the 1-input-channel conv are not pruned.
  axes, skipped = planned(sel.select(), c.params, m=4)
  assert axes == c.axes
  assert skipped == c.skipped_nm
  assert c.dense - c.skipped_nm == set(layouts.head_paths(layouts.describe(c.params)))
  # Unstructured: nothing to tile, so the first conv is pruned too.
  axes, skipped = planned(sel.select(), c.params)
  assert set(axes) == set(c.axes) | c.skipped_nm and not skipped


@pytest.mark.parametrize("name", CASES)
def test_same_plan_inside_jit_and_after_apply_updates(name):
  # jit and tree_map rebuild dicts with sorted keys; the plan reads paths only.
  c = case(name)
  moved = jax.tree.map(lambda x: x + 0, c.params)
  assert planned(sel.select(), moved, m=4) == planned(sel.select(), c.params, m=4)
  seen = []
  jax.jit(lambda p: seen.append(planned(sel.select(), p, m=4)))(c.params)
  assert seen == [planned(sel.select(), c.params, m=4)]


def test_kinds_whatever_the_rank():
  params = {
      "conv": {"weight": f32(8, 4, 3, 3), "bias": f32(8, 1, 1)},
      "attn": {"query": {"kernel": f32(8, 2, 4), "bias": f32(2, 4)},
               "in_proj_bias": f32(3, 8)},
      "ln_f": {"scale": f32(8), "weight": f32(8, 8)},  # a 2-D leaf inside a norm
      "tok": {"embedding": f32(16, 8)},
      "wpe": f32(16, 8),
      "hk": {"w": f32(8, 8), "b": f32(2, 8)},  # Haiku names
  }
  kinds = {i.path: i.kind for i in layouts.describe(params)}
  assert kinds == {
      "attn/in_proj_bias": "bias", "attn/query/bias": "bias", "attn/query/kernel": "kernel",
      "conv/bias": "bias", "conv/weight": "kernel", "hk/b": "bias", "hk/w": "kernel",
      "ln_f/scale": "norm", "ln_f/weight": "norm", "tok/embedding": "embedding",
      "wpe": "embedding"}


@pytest.mark.parametrize("params, path, axis", [
    # Bias-free kernels: by module name.
    ({"Conv_0": {"kernel": f32(3, 3, 8, 4)}, "d": {"kernel": f32(4, 4)}}, "Conv_0/kernel", 2),
    ({"attn": {"query": {"kernel": f32(8, 2, 4)}, "out": {"kernel": f32(2, 4, 8)}}},
     "attn/out/kernel", 1),
    ({"attn": {"query": {"kernel": f32(8, 2, 4)}, "out": {"kernel": f32(2, 4, 8)}}},
     "attn/query/kernel", 0),
    # DenseGeneral over two input axes: its bias (out,) tells the outputs.
    ({"DenseGeneral_0": {"kernel": f32(2, 4, 8), "bias": f32(8)}, "d": {"kernel": f32(8, 8)}},
     "DenseGeneral_0/kernel", 1),
    # In-first Einsum 'btd,dnh->btnh' with its (n, h) bias.
    ({"q_einsum": {"kernel": f32(8, 2, 4), "bias": f32(2, 4)}, "d": {"kernel": f32(8, 8)}},
     "q_einsum/kernel", 0),
])
def test_layout_rules(params, path, axis):
  axes, _ = planned(sel.select(head=None), params)
  assert axes[path] == axis


def test_unknown_layout_raises_at_init_and_asks_for_axis():
  params = {"proj": {"kernel": f32(2, 4, 8)}, "d": {"kernel": f32(8, 8)}}
  tx = jaxprune.nm_pruning(optax.sgd(0.1), 2, 4, select=jaxprune.select(head=None))
  with pytest.raises(ValueError, match=r"proj/kernel with shape \(2, 4, 8\).*`axis=`.*"
                                       r"overrides=\{'proj/kernel': \{'axis': a\}\}"):
    tx.init(params)
  # Given either way, it resolves.
  assert planned(sel.select(head=None, overrides={"proj": {"axis": 1}}), params)[0] == {
      "proj/kernel": 1, "d/kernel": 0}
  assert planned(sel.select(head=None), params, axis=1)[0] == {"proj/kernel": 1, "d/kernel": 1}


@pytest.mark.parametrize("spec, axis", [
    ("btd,dnh->btnh", 0), ("btnh,nhd->btd", 1), ("bd,hd->bh", 1), ("...d,df->...f", 0),
])
def test_einsum_axis(spec, axis):
  assert jaxprune.einsum_axis(spec) == axis


@pytest.mark.parametrize("spec, match", [("bd->b", "must be an einsum string"),
                                         ("bd,hk->bhk", "no kernel axis is summed over")])
def test_einsum_axis_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    jaxprune.einsum_axis(spec)


# ----------------------------------------------------------------------------
# The output head.


@pytest.mark.parametrize("paths, head", [
    (["params/Dense_2/kernel", "params/Dense_10/kernel", "params/Dense_9/kernel"],
     "params/Dense_10/kernel"),                       # numbers compared as numbers
    (["conv1/kernel", "conv2/kernel", "linear1/kernel", "linear2/kernel"], "linear2/kernel"),
    ([f"layers/{i}/weight" for i in range(10)], "layers/9/weight"),
    # Tied embeddings: the last kernels sit in repeated blocks; no head.
    ([f"layers/{i}/{n}/kernel" for i in range(2) for n in ("up", "down")], None),
    # Blocks, then a single-kernel projection: the projection.
    (["blocks/0/a/kernel", "blocks/0/b/kernel", "proj/kernel"], "proj/kernel"),
    (["a/kernel", "lm_head/kernel", "z/kernel"], "lm_head/kernel"),     # by name
    (["only/kernel"], None),                                             # one kernel: pruned
])
def test_head_rule(paths, head):
  params = {}
  for path in paths:
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = f32(4, 4)
  assert layouts.head_paths(layouts.describe(params)) == ([head] if head else [])


def test_head_argument():
  params = {"a": {"kernel": f32(4, 4)}, "b": {"kernel": f32(4, 4)}, "c": {"kernel": f32(4, 4)}}
  assert set(planned(sel.select(), params)[0]) == {"a/kernel", "b/kernel"}
  assert set(planned(sel.select(head="^a/"), params)[0]) == {"b/kernel", "c/kernel"}
  assert set(planned(sel.select(head=None), params)[0]) == {"a/kernel", "b/kernel", "c/kernel"}
  assert set(planned(sel.select(prune_embeddings=True), params)[0]) == {
      "a/kernel", "b/kernel", "c/kernel"}
  with pytest.raises(ValueError, match=r"`head` regex 'nope' matches no leaf"):
    sel.plan_leaves(sel.select(head="nope"), params)


# ----------------------------------------------------------------------------
# Skipped layers and bad input.


def test_skipped_layers_warned_in_one_line_and_explicit_select_raises():
  c = case("linen_cnn")
  for tx in (jaxprune.nm_pruning(optax.sgd(0.1), 2, 4), jaxprune.sr_ste(optax.sgd(0.1)),
             jaxprune.quantization(optax.sgd(0.1), "int8", nm=(2, 4))):
    with pytest.warns(jaxprune.pruning.SkippedLayerWarning) as record:
      tx.init(c.params)
    lines = {str(w.message) for w in record}
    assert len(lines) == 1
    assert "Conv_0/kernel (3, 3, 1, 8)" in lines.pop()
  with pytest.raises(ValueError, match=r"Conv_0/kernel: size 1 of axis 2.*not divisible by m=4"):
    jaxprune.nm_pruning(optax.sgd(0.1), 2, 4, select="Conv_0").init(c.params)
  with pytest.raises(ValueError, match=r"Conv_0/kernel: size 1 of axis 2"):
    sel.plan_leaves(sel.select(overrides={"Conv_0": {"axis": 2}}), c.params, m=4)


def test_select_matching_only_skipped_layers_raises():
  c = case("linen_cnn")
  with pytest.raises(ValueError, match=r"every selected layer is skipped.*Conv_0/kernel"):
    jaxprune.nm_pruning(optax.sgd(0.1), 2, 4,
                        select=jaxprune.select(exclude="Conv_1|Dense")).init(c.params)


def test_axis_that_does_not_exist():
  params = {"w": f32(8, 8)}
  with pytest.raises(ValueError, match=r"`axis` 2 is out of range for w with shape \(8, 8\)"):
    jaxprune.nm_pruning(optax.sgd(0.1), 2, 4, axis=2).init(params)


def test_equinox_model_without_filter():
  model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))  # holds its activation functions
  with pytest.raises(ValueError, match=r"`params` has leaves that are not arrays: "
                                       r"\['activation', 'final_activation'\].*eqx.filter"):
    jaxprune.magnitude_pruning(optax.sgd(0.1), 0.5).init(model)
  state = jaxprune.magnitude_pruning(optax.sgd(0.1), 0.5).init(eqx.filter(model, eqx.is_array))
  assert state.masks.layers[0].weight.shape == (8, 4)


def test_zero_size_kernel_is_left_alone():
  params = {"w": jnp.ones((8, 8)), "empty": jnp.ones((0, 8)), "head": jnp.ones((8, 2))}
  tx = jaxprune.magnitude_pruning(optax.sgd(0.1), 0.5)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  new = optax.apply_updates(params, updates)
  assert state.masks["empty"].shape == () and new["empty"].shape == (0, 8)
  assert int((new["w"] == 0).sum()) == 32
  # RigL too (it divided by the size at init).
  state = jaxprune.rigl(optax.sgd(0.1), 0.5, end_step=10).init(params)
  assert state.masks["empty"].shape == () and int((~state.masks["w"]).sum()) == 32
