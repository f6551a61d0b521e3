"""Tests for jaxprune.models.transformer: sizes, causality, RoPE, selection paths, training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune
from jaxprune.models import Transformer, apply_rotary, count_params, param_count

TINY = dict(context=16, width=32, depth=2, heads=4)


def tiny(positions="learned", seed=0, **overrides):
  return Transformer(**{**TINY, **overrides}, positions=positions, rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, tokens):
  # Jitted: eager op-by-op dispatch compiles every primitive and is much slower on CPU.
  return model(tokens)


def random_tokens(seed, batch, time):
  return jax.random.randint(jax.random.key(seed), (batch, time), 0, 256, jnp.int32)


# --------------------------------------------------------------------------- #
# Parameter counts and sizes.
# --------------------------------------------------------------------------- #


def test_param_count_of_the_default_config_by_hand():
  block = (4 * (128 * 128 + 128)        # query, key, value, output
           + (128 * 512 + 512) + (512 * 128 + 128)  # up, down
           + 4 * 128)                   # two LayerNorms
  assert block == 198_272
  expected = 256 * 128 + 128 * 128 + 2 * block + 2 * 128 + (128 * 256 + 256)
  assert param_count() == expected == 478_976
  assert param_count(positions="rotary") == expected - 128 * 128


@pytest.mark.parametrize("config", [
    dict(),
    dict(positions="rotary"),
    dict(vocab_size=100, context=8, width=24, depth=3, heads=3, mlp_ratio=2),
    dict(vocab_size=50, context=32, width=16, depth=1, heads=2, mlp_ratio=1, positions="rotary"),
])
def test_param_count_equals_the_real_count(config):
  # eval_shape builds the real module tree with abstract arrays: same shapes, no compute.
  model = nnx.eval_shape(lambda: Transformer(**config, rngs=nnx.Rngs(0)))
  assert count_params(model) == param_count(**config)
  assert count_params(nnx.state(model, nnx.Param)) == param_count(**config)


def test_count_params_of_a_concrete_model():
  model = tiny()
  assert count_params(model) == count_params(nnx.state(model, nnx.Param)) == param_count(**TINY)
  assert count_params({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}) == 16


def test_sizes_from_50k_to_20m_are_reachable():
  small = dict(context=64, width=48, depth=1, heads=2)
  large = dict(context=256, width=512, depth=6, heads=8)
  assert 40_000 <= param_count(**small) <= 60_000
  assert 18_000_000 <= param_count(**large) <= 22_000_000
  # The large model only abstractly: shapes, no allocation.
  abstract = nnx.eval_shape(lambda: Transformer(**large, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == param_count(**large)


def test_initialisation_is_gpt2_style():
  state = nnx.state(tiny(), nnx.Param)
  params = dict(zip(jaxprune.leaf_paths(state), jax.tree.leaves(state), strict=True))
  residual_std = 0.02 / math.sqrt(2 * TINY["depth"])
  for path, leaf in params.items():
    assert leaf.dtype == jnp.float32, path
    if path.endswith("bias"):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=path)
    elif path.endswith("scale"):
      np.testing.assert_array_equal(leaf, 1.0, err_msg=path)
    else:
      residual = path.endswith(("attention/output/kernel", "mlp/down/kernel"))
      std = residual_std if residual else 0.02
      assert abs(float(jnp.std(leaf)) / std - 1.0) < 0.1, (path, float(jnp.std(leaf)))


# --------------------------------------------------------------------------- #
# Forward pass.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_output_shape_and_dtype(positions):
  logits = forward(tiny(positions), random_tokens(0, 3, 5))
  assert logits.shape == (3, 5, 256)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_changing_token_t_leaves_earlier_logits_unchanged(positions):
  model, t = tiny(positions), 7
  tokens = random_tokens(1, 2, 16)
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % 256)
  before, after = forward(model, tokens), forward(model, changed)
  np.testing.assert_allclose(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
  # ...and the change does reach position t and later ones.
  assert float(jnp.abs(after[:, t:] - before[:, t:]).max(axis=(0, 2)).min()) > 1e-5


def test_too_long_input_raises_also_under_jit():
  model = tiny()
  with pytest.raises(ValueError, match="longer than `context`=16"):
    model(jnp.zeros((1, 17), jnp.int32))
  assert forward(model, jnp.zeros((2, 16), jnp.int32)).shape == (2, 16, 256)  # Exactly fits.
  with pytest.raises(ValueError, match="longer than `context`"):
    forward(model, jnp.zeros((2, 17), jnp.int32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=0), "`vocab_size` must be >= 1"),
    (dict(context=0), "`context` must be >= 1"),
    (dict(width=0), "`width` must be >= 1"),
    (dict(width=32.0), "`width` must be an integer"),
    (dict(depth=0), "`depth` must be >= 1"),
    (dict(heads=0), "`heads` must be >= 1"),
    (dict(mlp_ratio=-1), "`mlp_ratio` must be >= 1"),
    (dict(width=30, heads=4), "`width` must be a multiple of `heads`"),
    (dict(width=12, heads=4, positions="rotary"), "even head dimension"),
    (dict(positions="sinusoidal"), r"`positions` must be one of \('learned', 'rotary'\)"),
])
def test_bad_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Transformer(**kwargs, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=message):
    param_count(**kwargs)


def test_odd_head_dimension_is_fine_with_learned_positions():
  model = nnx.eval_shape(lambda: Transformer(width=12, heads=4, rngs=nnx.Rngs(0)))
  assert count_params(model) == param_count(width=12, heads=4)


# --------------------------------------------------------------------------- #
# Rotary positions.
# --------------------------------------------------------------------------- #


def test_rotary_rotates_channel_c_with_channel_c_plus_half():
  # head_dim 4: theta = (1, 10000^(-1/2)); channel 0 pairs with channel 2 (rotate-half).
  x = jnp.array([[[1.0, 0.0, 0.0, 0.0]]])  # [time=1, heads=1, head_dim=4]
  np.testing.assert_allclose(apply_rotary(x, jnp.array([1]))[0, 0],
                             [math.cos(1.0), 0.0, math.sin(1.0), 0.0], atol=1e-6)
  x = jnp.array([[[0.0, 1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(apply_rotary(x, jnp.array([3]))[0, 0],
                             [0.0, math.cos(0.03), 0.0, math.sin(0.03)], atol=1e-6)
  np.testing.assert_array_equal(apply_rotary(x, jnp.array([0])), x)  # Position 0: identity.


def test_rotary_scores_depend_only_on_the_position_difference():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 16))  # Each [time, heads, head_dim].

  def score(i, j):
    return float(jnp.vdot(apply_rotary(q, jnp.array([i])), apply_rotary(k, jnp.array([j]))))

  for i, j, shift in [(0, 3, 5), (7, 2, 11), (4, 4, 40), (1, 9, 100)]:
    assert score(i + shift, j + shift) == pytest.approx(score(i, j), abs=1e-4)
  assert abs(score(0, 3) - score(0, 4)) > 1e-3  # ...but they do depend on the difference.
  assert abs(score(0, 3) - score(3, 0)) > 1e-3  # ...and on its sign.


# --------------------------------------------------------------------------- #
# Selection and training.
# --------------------------------------------------------------------------- #


def selected_paths(selection, params):
  return {s.path for s in jaxprune.resolve(selection, params, 0.5) if s is not None}


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_default_selection_prunes_exactly_attention_and_mlp_kernels(positions):
  params = nnx.state(tiny(positions), nnx.Param)
  kernels = {f"layers/{i}/{name}/kernel" for i in range(TINY["depth"]) for name in
             ["attention/query", "attention/key", "attention/value", "attention/output",
              "mlp/up", "mlp/down"]}
  assert selected_paths(jaxprune.select(), params) == kernels
  embeddings = {"embed/embedding", "head/kernel"}
  if positions == "learned":
    embeddings.add("pos_embed/embedding")
  assert embeddings <= set(jaxprune.leaf_paths(params))
  assert selected_paths(jaxprune.select(prune_embeddings=True), params) == kernels | embeddings


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_adam_on_a_repeated_byte_pattern_decreases_the_loss(positions):
  graphdef, params = nnx.split(tiny(positions))
  data = jnp.asarray(np.frombuffer(b"jaxprune " * 2, np.uint8)[:17].astype(np.int32))[None]
  inputs, targets = data[:, :-1], data[:, 1:]
  tx = optax.adam(1e-2)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(25):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(math.log(256), abs=0.1)  # Small init: near-uniform logits.
  assert losses[-1] < 0.1 * losses[0], losses
