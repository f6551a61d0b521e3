"""bfloat16 (and float16) params: every transform keeps its invariant exactly.

The straight-through family (STE, SR-STE, gradient flow) keeps float32 master
weights and lands the params on exactly the bfloat16 cast of the float32 view;
the pruning transforms (GMP, ASP N:M, random, SET, RigL) keep exact masks,
exact counts and pruned entries exactly 0 in the params' own dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune import models

LOW = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
SHAPES = {"a": {"kernel": (16, 8), "bias": (8,)}, "b": {"kernel": (8, 4), "bias": (4,)}}
KERNELS = (("a", "kernel"), ("b", "kernel"))


def _params(seed: int, dtype):
  keys = iter(jax.random.split(jax.random.key(seed), 4))
  return jax.tree.map(lambda shape: (0.1 * jax.random.normal(next(keys), shape)).astype(dtype),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _loss(params, x, y):
  h = jnp.tanh(x @ params["a"]["kernel"].astype(jnp.float32) + params["a"]["bias"])
  return jnp.mean((h @ params["b"]["kernel"].astype(jnp.float32) + params["b"]["bias"] - y) ** 2)


def _data(seed: int):
  kx, ky = jax.random.split(jax.random.key(seed + 100))
  return jax.random.normal(kx, (32, 16)), jax.random.normal(ky, (32, 4))


def _bits(x):
  return np.asarray(jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")))


# Both kernels are pruned: the default selection would leave the output head ``b`` dense.
BOTH = jaxprune.select(head=None)

ENGINE = {
    "ste_2of4": lambda inner: jaxprune.ste(inner, jaxprune.nm(2, 4), select=BOTH),
    "ste_unstructured": lambda inner: jaxprune.ste(inner, jaxprune.UNSTRUCTURED, sparsity=0.5,
                                                   select=BOTH),
    "sr_ste": lambda inner: jaxprune.sr_ste(inner, 2, 4, decay=0.05, select=BOTH),
    "gradient_flow": lambda inner: jaxprune.gradient_flow(inner, 2, 4, total_steps=10,
                                                          decay="step", select=BOTH),
}


def _masked_view(name, w):
  """The float32 view of the master ``w`` (every method here is hard-masked from step 0)."""
  if name == "ste_unstructured":
    mask = jaxprune.magnitude_mask(jnp.abs(w), 0.5)
  else:
    mask = jaxprune.nm_mask(jnp.abs(w), 2, 4, axis=0)
  return jnp.where(mask, w, 0.0)


@functools.cache
def _engine(name: str, dtype_name: str):
  # The biases (not selected) get Adam in their own dtype: in float16 the default eps = 1e-8
  # is 0 and g^2 underflows, so 0 / 0 would make them NaN; 1e-3 is representable.
  tx = ENGINE[name](optax.adam(3e-2, eps=1e-3))

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, step


@pytest.mark.parametrize("dtype_name", sorted(LOW))
@pytest.mark.parametrize("name", sorted(ENGINE))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_master_weights_are_float32_and_params_the_exact_cast_view(name, dtype_name, seed):
  dtype = LOW[dtype_name]
  tx, step = _engine(name, dtype_name)
  params = _params(seed, dtype)
  state = tx.init(params)
  masters = jaxprune.master_params(state)
  moments = state.inner_state[0].mu
  for path in KERNELS:
    assert masters[path[0]][path[1]].dtype == jnp.float32            # master
    assert moments[path[0]][path[1]].dtype == jnp.float32            # Adam on the master
  np.testing.assert_array_equal(masters["a"]["kernel"], params["a"]["kernel"].astype(jnp.float32))
  params = tx.view(params)
  x, y = _data(seed)
  for _ in range(4):
    params, state = step(params, state, x, y)
    w = jaxprune.master_params(state)
    for path in KERNELS:
      p, master = params[path[0]][path[1]], w[path[0]][path[1]]
      assert p.dtype == dtype and master.dtype == jnp.float32
      view = _masked_view(name, master)
      # Kept entries are exactly the cast view, pruned entries exactly +0.0.
      np.testing.assert_array_equal(_bits(p), _bits(view.astype(dtype)))
      np.testing.assert_array_equal(_bits(p)[np.asarray(view == 0)], 0)
      if name != "ste_unstructured":
        groups = np.asarray(p != 0).reshape(-1, 4, p.shape[-1]).sum(1)
        assert (groups <= 2).all()
      else:
        assert int(jnp.sum(view == 0)) >= p.size // 2
    for path in (("a", "bias"), ("b", "bias")):   # Not selected: the params' own dtype.
      assert params[path[0]][path[1]].dtype == dtype
    assert int(state.violations) == 0


PRUNERS = {
    "magnitude": lambda inner: jaxprune.magnitude_pruning(inner, 0.75, select=BOTH),
    "nm_asp": lambda inner: jaxprune.nm_pruning(inner, 2, 4, select=BOTH),
    "random": lambda inner: jaxprune.random_pruning(inner, 0.75, seed=3, select=BOTH),
    "set": lambda inner: jaxprune.set_pruning(inner, 0.75, update_every=2, end_step=8, seed=1,
                                              select=BOTH),
    "rigl": lambda inner: jaxprune.rigl(inner, 0.75, update_every=2, end_step=8, seed=1,
                                        select=BOTH),
}


def _masks(state):
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, jaxprune.PruningState))
           if isinstance(s, jaxprune.PruningState)]
  assert len(found) == 1
  return found[0].masks


@functools.cache
def _pruner(name: str):
  tx = PRUNERS[name](optax.adam(3e-2))

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, step


@pytest.mark.parametrize("name", sorted(PRUNERS))
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_pruning_transforms_keep_exact_masks_in_bfloat16(name, seed):
  tx, step = _pruner(name)
  params = _params(seed, jnp.bfloat16)
  state = tx.init(params)
  x, y = _data(seed)
  for _ in range(6):   # SET and RigL move connections at steps 2 and 4.
    params, state = step(params, state, x, y)
    masks = _masks(state)
    for path in KERNELS:
      p, mask = params[path[0]][path[1]], np.asarray(masks[path[0]][path[1]])
      assert p.dtype == jnp.bfloat16
      np.testing.assert_array_equal(_bits(p)[~mask], 0)              # pruned: exactly +0.0
      if name == "nm_asp":
        assert (mask.reshape(-1, 4, p.shape[-1]).sum(1) == 2).all()   # exactly 2:4
      else:
        assert int((~mask).sum()) == round(0.75 * p.size)              # exact count per layer
    assert params["a"]["bias"].dtype == jnp.bfloat16


def test_bf16_transformer_computes_in_bfloat16_with_float32_logits_and_params():
  from flax import nnx

  model = models.Transformer(context=16, width=32, depth=1, heads=2, dtype="bfloat16",
                                      rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  logits = model(tokens)
  assert logits.dtype == jnp.float32
  f32 = models.Transformer(context=16, width=32, depth=1, heads=2, rngs=nnx.Rngs(0))
  reference = f32(tokens)
  # Same parameters, bfloat16 matmuls: close to, but not bit-equal with, float32.
  error = float(jnp.max(jnp.abs(logits - reference)))
  assert 0 < error < 0.05 * float(jnp.max(jnp.abs(reference)))
  stored = models.Transformer(context=16, width=32, depth=1, heads=2,
                                       dtype="bfloat16", param_dtype="bfloat16",
                                       rngs=nnx.Rngs(0))
  leaves = jax.tree.leaves(nnx.state(stored, nnx.Param))
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert stored(tokens).dtype == jnp.float32


@pytest.mark.parametrize("field, value", [("dtype", "bf16"), ("param_dtype", "int8")])
def test_unknown_dtype_names_the_argument_and_the_valid_names(field, value):
  from flax import nnx

  with pytest.raises(ValueError, match=rf"`{field}` must be one of \('float32', 'bfloat16'"):
    models.Transformer(context=8, width=8, depth=1, heads=2, rngs=nnx.Rngs(0),
                                **{field: value})


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["dense", "sr_ste_2of4"])
def test_tiny_bf16_run_ends_within_half_a_percent_of_float32(tmp_path, recipe):
  """bfloat16 compute (float32 params) against float32, same tiny run on CPU."""
  from jaxprune import train

  losses = {}
  for preset in ("tiny", "tiny+bf16"):
    config = train.load_recipe(recipe, preset)
    config.compilation_cache = "off"
    report = train.train(config, tmp_path / preset)
    assert report["config"]["model"]["dtype"] == ("bfloat16" if "bf16" in preset else "float32")
    losses[preset] = report["eval_loss"]
  assert losses["tiny+bf16"] != losses["tiny"]               # It did compute in bfloat16...
  assert math.isclose(losses["tiny+bf16"], losses["tiny"], rel_tol=0.005)   # ...within 0.5%.
