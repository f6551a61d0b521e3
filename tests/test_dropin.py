"""The one-line wrap on real modules of every framework: defaults, views, compositions.

Each method wraps ``optax.adam`` with its defaults, trains three steps of a
tiny linen, NNX or Equinox model, and must satisfy its invariant on the axes
the framework's layout implies (written out by hand in ``framework_models``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jaxprune

try:
  from . import framework_models as fm
except ImportError:
  import framework_models as fm

eqx = pytest.importorskip("equinox")

STEPS = 3


@functools.cache
def case(name):
  return getattr(fm, name)()


def leaves_by_path(params):
  return dict(zip(jaxprune.leaf_paths(params), jax.tree.leaves(params), strict=True))


def train(tx, c, steps=STEPS):
  """The unchanged optax loop, with ``jaxprune.view`` for master-weight transforms."""
  params = c.params
  state = tx.init(params)
  if isinstance(tx, jaxprune.ViewTransformation):
    params = jaxprune.view(tx, params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(c.loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  return params, state, losses


def assert_nm_on_axes(c, params, n=2, m=4):
  """N:M along each pruned kernel's axis; every other kernel dense (no zero)."""
  by_path = leaves_by_path(params)
  for path, axis in c.axes.items():
    assert jaxprune.nm_valid(np.asarray(by_path[path]), n, m, axis), path
    # ... and not by accident along another axis: exactly n of m kept in every group.
    groups = np.moveaxis(np.asarray(by_path[path]) != 0, axis, -1).reshape(-1, m)
    assert (groups.sum(-1) == n).all(), path
  for path in c.dense:
    assert (np.asarray(by_path[path]) != 0).all(), path


def assert_unstructured(c, params, masks, sparsity):
  """Exactly ``round(s * size)`` pruned per kernel, each exactly 0; head and others dense."""
  by_path = leaves_by_path(params)
  masks = leaves_by_path(masks)
  assert {p for p, m in masks.items() if np.ndim(m)} == set(c.axes) | c.skipped_nm
  for path in set(c.axes) | c.skipped_nm:  # unstructured: the first conv is pruned too
    pruned = ~np.asarray(masks[path])
    assert int(pruned.sum()) == round(sparsity * pruned.size), path
    assert (np.asarray(by_path[path])[pruned] == 0).all(), path
  for path in c.dense - c.skipped_nm:
    assert (np.asarray(by_path[path]) != 0).all(), path


@pytest.mark.parametrize("name", [b.__name__ for b in fm.ALL])
def test_nm_pruning_defaults_on_every_framework(name):
  c = case(name)
  params, state, _ = train(jaxprune.nm_pruning(optax.adam(1e-2), 2, 4), c)
  assert_nm_on_axes(c, params)
  summary = jaxprune.sparsity_summary(params, nm=(2, 4), opt_state=state)
  assert summary.nm_ok is True
  assert {s.path for s in summary.skipped} == c.skipped_nm
  assert summary.violations == 0 and jaxprune.check(state, params).ok


@pytest.mark.parametrize("method, name", [
    ("sr_ste", "eqx_cnn"), ("ste", "linen_attention"), ("step_adam", "eqx_mlp"),
    pytest.param("quantization", "eqx_mlp", marks=pytest.mark.slow),  # 10 s; QAT has its own
])
def test_nm_methods_defaults(method, name):
  make = {
      "sr_ste": lambda: jaxprune.sr_ste(optax.adam(1e-2)),
      "ste": lambda: jaxprune.ste(optax.adam(1e-2), jaxprune.nm(2, 4)),
      "step_adam": lambda: jaxprune.step_adam(1e-2, t_max=1),  # switches at step 2
      "quantization": lambda: jaxprune.quantization(optax.adam(1e-2), "int8", nm=(2, 4)),
  }[method]
  c = case(name)
  params, state, _ = train(make(), c)
  assert_nm_on_axes(c, params)
  if method == "quantization":
    by_path = leaves_by_path(params)
    for path in c.axes:
      p = by_path[path]
      np.testing.assert_array_equal(jaxprune.quant.quantize(p, "int8"), p)


@pytest.mark.parametrize("method, name", [
    ("magnitude_pruning", "linen_attention"), ("rigl", "eqx_mlp"), ("set_pruning", "eqx_mlp"),
])
def test_unstructured_methods_defaults(method, name):
  make = {
      "magnitude_pruning": lambda: jaxprune.magnitude_pruning(optax.adam(1e-2), 0.5),
      "rigl": lambda: jaxprune.rigl(optax.adam(1e-2), 0.5, update_every=1, end_step=STEPS),
      "set_pruning": lambda: jaxprune.set_pruning(optax.adam(1e-2), 0.5, update_every=1,
                                                  end_step=STEPS),
  }[method]
  c = case(name)
  params, state, _ = train(make(), c)
  assert_unstructured(c, params, state.masks, 0.5)


# ----------------------------------------------------------------------------
# jaxprune.view in each framework's loop, and through optax wrappers.


def test_view_nnx_optimizer():
  model = fm.NnxAttention(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, jaxprune.sr_ste(optax.adam(1e-2)), wrt=nnx.Param)
  nnx.update(model, jaxprune.view(optimizer, nnx.state(model, nnx.Param)))
  # The first forward pass already sees 2:4 along (in, heads, head_dim)'s `in`.
  assert jaxprune.nm_valid(np.asarray(model.attn.query.kernel[...]), 2, 4, 0)
  assert jaxprune.nm_valid(np.asarray(model.attn.out.kernel[...]), 2, 4, 1)
  x = jax.random.normal(jax.random.key(1), (fm.BATCH, 4, 8))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  assert jaxprune.check(optimizer, nnx.state(model, nnx.Param)).ok
  assert jaxprune.nm_valid(np.asarray(model.attn.out.kernel[...]), 2, 4, 1)


def test_view_linen_train_state():
  c = case("linen_cnn")
  state = train_state.TrainState.create(apply_fn=fm.LinenCNN().apply, params=c.params,
                                        tx=jaxprune.sr_ste(optax.adam(1e-2)))
  state = state.replace(params=jaxprune.view(state, state.params))
  assert jaxprune.nm_valid(np.asarray(state.params["Conv_1"]["kernel"]), 2, 4, 2)
  assert (np.asarray(state.params["Conv_0"]["kernel"]) != 0).all()  # skipped


def test_view_equinox():
  c = case("eqx_mlp")
  tx = jaxprune.sr_ste(optax.adam(1e-2))
  tx.init(c.params)
  params = jaxprune.view(tx, c.params)
  assert jaxprune.nm_valid(np.asarray(params.layers[0].weight), 2, 4, 1)   # (out, in): in
  assert not jaxprune.nm_valid(np.asarray(params.layers[0].weight), 2, 4, 0)


def test_view_through_optax_wrappers():
  params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (8, 8))},
            "b": {"kernel": jnp.ones((8, 4))}}
  want = jaxprune.sr_ste(optax.adam(1e-2)).view(params)
  wrapped = {
      "chain": optax.chain(optax.clip_by_global_norm(1.0), jaxprune.sr_ste(optax.adam(1e-2))),
      "MultiSteps": optax.MultiSteps(jaxprune.sr_ste(optax.adam(1e-2)), 2),
      "MultiSteps.gradient_transformation": optax.MultiSteps(
          jaxprune.sr_ste(optax.adam(1e-2)), 2).gradient_transformation(),
      "inject_hyperparams": optax.inject_hyperparams(
          lambda learning_rate: jaxprune.sr_ste(optax.adam(learning_rate)))(learning_rate=1e-2),
      "quantization(sr_ste)": jaxprune.quantization(jaxprune.sr_ste(optax.adam(1e-2)), "int8"),
  }
  for name, tx in wrapped.items():
    got = jaxprune.view(tx, params)
    if name.startswith("quantization"):
      want_q = wrapped[name].view(params)
      jax.tree.map(np.testing.assert_array_equal, got, want_q)
    else:
      jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not hasattr(wrapped["MultiSteps"], "view")  # what users hit before jaxprune.view


def test_view_errors():
  params = {"w": jnp.ones((8, 8))}
  with pytest.raises(ValueError, match="holds no master-weight transform.*need no view"):
    jaxprune.view(jaxprune.nm_pruning(optax.adam(1e-2)), params)
  with pytest.raises(ValueError, match="holds no master-weight transform"):
    jaxprune.view(optax.adam(1e-2), params)
  tx = jaxprune.sr_ste(optax.adam(1e-2))
  with pytest.raises(ValueError, match="is an optimizer state; the view needs the transformation"):
    jaxprune.view(tx.init(params), params)


# ----------------------------------------------------------------------------
# Compositions that break the invariant are counted and explained.


@pytest.mark.parametrize("after", [optax.clip_by_global_norm(1e-3), optax.scale(0.5)])
def test_transform_after_the_pruner_is_counted(after):
  c = case("eqx_mlp")
  tx = optax.chain(jaxprune.nm_pruning(optax.adamw(1e-2), 2, 4), after)
  params, state, _ = train(tx, c)
  report = jaxprune.check(state, params)
  assert report.violations > 0 and report.pruned_nonzero > 0 and not report.ok
  assert "put the pruning transform last" in str(report)
  summary = jaxprune.sparsity_summary(params, nm=(2, 4), opt_state=state)
  assert summary.violations == report.violations and "violations" in summary.table()
  # The fix the message gives: the other transform inside, the pruner last.
  fixed = jaxprune.nm_pruning(optax.chain(after, optax.adamw(1e-2)), 2, 4)
  params, state, _ = train(fixed, c)
  assert jaxprune.check(state, params).ok
  assert_nm_on_axes(c, params)


def test_multisteps_counts_real_updates_outside_and_mini_steps_inside():
  params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
  schedule = jaxprune.polynomial_schedule(0.0, 0.8, begin_step=0, end_step=8, frequency=1)
  grads = {"w": jnp.ones((16, 16))}

  def sparsity_after(tx, steps):
    p, state = params, tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(steps):
      updates, state = update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return float((p["w"] == 0).mean())

  # Outside: the pruner's schedule advances once per real update (4 of 8 mini-steps).
  outside = optax.MultiSteps(jaxprune.magnitude_pruning(optax.sgd(1e-3), schedule), 2)
  assert sparsity_after(outside, 8) == pytest.approx(round(float(schedule(3)) * 256) / 256)
  # Inside: it counts mini-steps and reaches its target on time.
  inside = jaxprune.magnitude_pruning(optax.MultiSteps(optax.sgd(1e-3), 2), schedule)
  assert sparsity_after(inside, 9) == pytest.approx(round(0.8 * 256) / 256)


def test_schedule_free_eval_params_are_sparse():
  c = case("eqx_mlp")
  tx = jaxprune.magnitude_pruning(optax.contrib.schedule_free_adamw(1e-2, warmup_steps=1), 0.5)
  params, state, _ = train(tx, c)
  with pytest.raises((ValueError, AttributeError)):  # what optax gives on the wrapped state
    optax.contrib.schedule_free_eval_params(state, params)
  x = jaxprune.schedule_free_eval_params(state, params)
  inner = optax.contrib.schedule_free_eval_params(state.inner_state, params)
  for m, xi, want in zip(jax.tree.leaves(state.masks), jax.tree.leaves(x),
                         jax.tree.leaves(inner), strict=True):
    if np.ndim(m):
      m = np.asarray(m)
      assert (np.asarray(xi)[~m] == 0).all()
      assert (np.asarray(want)[~m] != 0).any()  # what the inner state alone would give
      np.testing.assert_array_equal(np.asarray(xi)[m], np.asarray(want)[m])
    else:
      np.testing.assert_array_equal(xi, want)
