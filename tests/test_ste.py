"""STE and SR-STE: closed forms, invariants every step, support recovery, composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxprune

try:
  from .nnx_models import Net, mse_step
except ImportError:
  from nnx_models import Net, mse_step


def capture_grads() -> optax.GradientTransformation:
  """An inner 'optimizer' that keeps the gradient it receives in its state, exactly."""
  return optax.GradientTransformation(
      lambda params: params,
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_sr_ste_gradient_reaching_the_master_is_exact():
  w = jax.random.normal(jax.random.key(0), (8, 4))
  x = jax.random.normal(jax.random.key(1), (8, 4))
  tx = jaxprune.sr_ste(capture_grads(), 2, 4, decay=0.3)
  state = tx.init({"w": w})
  params = tx.view({"w": w})
  e = jaxprune.nm_mask(jnp.abs(w), 2, 4, axis=0)
  np.testing.assert_array_equal(params["w"], jnp.where(e, w, 0.0))
  grads = jax.grad(lambda p: jnp.sum(p["w"] * x))(params)
  _, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(state.inner_state["w"], x + 0.3 * (1 - e) * w)


def test_sr_ste_master_update_closed_form_and_next_view():
  w = jax.random.normal(jax.random.key(2), (8, 6))
  x = jax.random.normal(jax.random.key(3), (8, 6))
  tx = jaxprune.sr_ste(optax.sgd(0.1), 2, 4, decay=0.5)
  state = tx.init({"w": w})
  params = tx.view({"w": w})
  grads = jax.grad(lambda p: jnp.sum(p["w"] * x))(params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  e = jaxprune.nm_mask(jnp.abs(w), 2, 4, axis=0)
  w1 = w - 0.1 * (x + 0.5 * (1 - e) * w)
  np.testing.assert_allclose(jaxprune.master_params(state)["w"], w1, rtol=1e-6)
  e1 = jaxprune.nm_mask(jnp.abs(jaxprune.master_params(state)["w"]), 2, 4, axis=0)
  # The params are exactly the next view: E(W1) * W1.
  np.testing.assert_array_equal(new["w"], jnp.where(e1, jaxprune.master_params(state)["w"], 0))


def test_view_keeps_exactly_n_even_for_zero_and_tied_groups():
  w = jnp.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # groups along axis 0
  tx = jaxprune.sr_ste(optax.sgd(0.0), 2, 4)
  state = tx.init({"w": w})
  params = tx.view({"w": w})
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
    # Tied column: exactly 2 of 4 survive (lower index first); zero column stays zero.
    np.testing.assert_array_equal(params["w"][:, 1], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(params["w"][:, 0], 0.0)


def least_squares_flips(decay, steps=300):
  d_in, d_out = 32, 16
  kt, kx, kw = jax.random.split(jax.random.key(0), 3)
  support = jaxprune.random_nm_mask(jax.random.key(5), (d_in, d_out), 2, 4, axis=0)
  w_true = jnp.where(support, jax.random.normal(kt, (d_in, d_out)), 0.0)
  x = jax.random.normal(kx, (256, d_in))
  y = x @ w_true
  tx = jaxprune.sr_ste(optax.sgd(0.05, momentum=0.9), 2, 4, decay=decay)
  params = {"w": 0.1 * jax.random.normal(kw, (d_in, d_out))}
  state = tx.init(params)
  params = tx.view(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  flips, previous = [], np.asarray(params["w"] != 0)
  for _ in range(steps):
    params, state = step(params, state)
    current = np.asarray(params["w"] != 0)
    flips.append(int((current != previous).sum()))
    previous = current
  recovered = bool((np.asarray(params["w"] != 0) == np.asarray(support)).all())
  return recovered, np.array(flips)


def test_sr_ste_recovers_support_and_flips_less_than_ste():
  sr_recovered, sr_flips = least_squares_flips(decay=0.02)
  _, ste_flips = least_squares_flips(decay=0.0)
  assert sr_recovered
  # Mask flips per step fall faster with the refining term.
  assert sr_flips[50:150].sum() < 0.7 * ste_flips[50:150].sum()
  assert sr_flips[150:].sum() < ste_flips[150:].sum()
  assert sr_flips[-50:].sum() == 0


def test_unstructured_ste_and_master_params():
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (10, 10)),
                      "bias": jnp.ones(10)}}
  tx = jaxprune.ste(optax.adam(1e-2), jaxprune.UNSTRUCTURED, sparsity=0.7)
  state = tx.init(params)
  params = tx.view(params)
  assert int((params["dense"]["kernel"] == 0).sum()) == 70
  x = jax.random.normal(jax.random.key(1), (4, 10))
  update = jax.jit(tx.update)
  for _ in range(5):
    grads = jax.grad(lambda p: jnp.sum((x @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2))(
        params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert int((params["dense"]["kernel"] == 0).sum()) == 70
  full = jaxprune.master_params(state, params)
  assert full["dense"]["bias"] is params["dense"]["bias"]
  assert int((full["dense"]["kernel"] == 0).sum()) == 0  # dense master


def test_nnx_optimizer_chain_and_checkpoint(tmp_path):
  model = Net(nnx.Rngs(0))
  # Both kernels pruned (the default would leave the head, b, dense).
  tx = jaxprune.sr_ste(optax.adamw(1e-2), 2, 4, select=jaxprune.select(head=None))
  nnx.update(model, tx.view(nnx.state(model, nnx.Param)))  # first forward sees the view
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), tx),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 8))
  y = jax.random.normal(jax.random.key(2), (32, 4))

  step = mse_step(x, y)

  losses = []
  for _ in range(20):
    losses.append(float(step(model, optimizer)))
    for kernel in (model.a.kernel[...], model.b.kernel[...]):
      groups = np.asarray(kernel != 0).reshape(-1, 4, kernel.shape[-1]).sum(1)
      assert (groups <= 2).all()
  assert losses[-1] < losses[0]
  state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState)))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make, match", [
    (lambda: jaxprune.sr_ste(optax.sgd(1.0), 3, 2), r"`n` must be in \[1, m\]"),
    (lambda: jaxprune.sr_ste(optax.sgd(1.0), 2, 4, decay=-1.0), r"`decay` must be >= 0"),
    (lambda: jaxprune.ste(optax.sgd(1.0), jaxprune.nm(2, 4), sparsity=0.5),
     "`sparsity` is set by `structure`"),
    (lambda: jaxprune.ste(optax.sgd(1.0), jaxprune.UNSTRUCTURED), "needs `sparsity`"),
    (lambda: jaxprune.ste(optax.sgd(1.0), jaxprune.UNSTRUCTURED, sparsity=1.0),
     r"`sparsity` must be in \[0, 1\)"),
    (lambda: jaxprune.sr_ste(optax.sgd, 2, 4),
     r"`inner` must be an optax.GradientTransformation, got the function sgd: call it"),
    (lambda: jaxprune.ste(optax.adam, jaxprune.nm(2, 4)), r"got the function adam: call it"),
    (lambda: jaxprune.master_weight_transform(
        "adam", select=None, structure=jaxprune.UNSTRUCTURED, sparsity=0.5,
        view_fn=lambda w, mask, step: w), r"`inner` must be .*, got 'adam'"),
])
def test_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_init_and_update_errors():
  tx = jaxprune.sr_ste(optax.sgd(1.0), 2, 4)
  with pytest.raises(ValueError, match=r"w \(6, 4\): m=4 does not divide size 6 of axis 0"):
    tx.init({"w": jnp.ones((6, 4))})
  state = tx.init({"w": jnp.ones((8, 4))})
  with pytest.raises(ValueError, match="does not have the tree structure"):
    tx.update({"v": jnp.ones((8, 4))}, state, {"v": jnp.ones((8, 4))})
  with pytest.raises(ValueError, match="expected exactly one jaxprune master-weight state"):
    jaxprune.master_params(optax.sgd(1.0).init({"w": jnp.ones(2)}))


# --------------------------------------------------------------------------- #
# The first step without `tx.view`, invariant violations, the engine's hooks.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("view_line", [True, False])
def test_first_update_is_sr_ste_with_and_without_the_view_line(view_line):
  """SR-STE's refining term at step 0 uses E(W_0) from the master, so the update is the
  method's either way; leaving the view line out is recorded as violations."""
  w = jax.random.normal(jax.random.key(0), (8, 4))
  x = jax.random.normal(jax.random.key(1), (8, 4))
  tx = jaxprune.sr_ste(capture_grads(), 2, 4, decay=0.3)
  state = tx.init({"w": w})
  params = tx.view({"w": w}) if view_line else {"w": w}
  e = jaxprune.nm_mask(jnp.abs(w), 2, 4, axis=0)
  updates, state = tx.update({"w": x}, state, params)
  np.testing.assert_array_equal(state.inner_state["w"], x + 0.3 * (1 - e) * w)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["w"], jnp.where(e, w, 0.0))   # On the view either way.
  # Without the view line the first forward pass saw the 16 pruned entries: recorded once.
  assert int(state.violations) == (0 if view_line else 16)
  _, state = tx.update({"w": x}, state, params)
  assert int(state.violations) == (0 if view_line else 16)


def test_violations_count_what_a_transform_after_it_changes():
  w = jax.random.normal(jax.random.key(2), (8, 8))
  x = jax.random.normal(jax.random.key(3), (8, 8))
  tx = optax.chain(jaxprune.sr_ste(optax.sgd(0.1), 2, 4), optax.scale(0.5))
  state = tx.init({"w": w})
  params = jaxprune.sr_ste(optax.sgd(0.1), 2, 4).view({"w": w})
  updates, state = tx.update({"w": x}, state, params)
  params = optax.apply_updates(params, updates)   # Halfway to the view: off it where it moved.
  unlanded = int(state[0].unlanded)
  w1 = jaxprune.master_params(state)["w"]
  v1 = jnp.where(jaxprune.nm_mask(jnp.abs(w1), 2, 4, axis=0), w1, 0.0)
  off = int(jnp.sum(params["w"] != v1))
  assert off > 16
  _, state = tx.update({"w": x}, state, params)
  assert int(state[0].violations) == off - unlanded


def test_an_update_that_cannot_land_exactly_is_not_a_violation():
  """p + (v - p) rounds away from v when the two are far apart; the state carries how many
  entries did, and the next check does not count them."""
  p0, v = np.float32(0.035735376), np.float32(0.005735752)   # From a real SR-STE step.
  assert np.float32(p0 + np.float32(v - p0)) != v
  tx = jaxprune.ste(optax.sgd(0.0), jaxprune.UNSTRUCTURED, sparsity=0.0)
  params = {"w": jnp.array([[p0, p0]])}
  state = tx.init(params)._replace(master={"w": jnp.array([[v, p0]])})
  zero = {"w": jnp.zeros((1, 2))}
  updates, state = tx.update(zero, state, params)   # The params were not the view: 1.
  params = optax.apply_updates(params, updates)
  assert (int(state.violations), int(state.unlanded)) == (1, 1)
  assert params["w"][0, 0] != v
  updates, state = tx.update(zero, state, params)
  params = optax.apply_updates(params, updates)
  assert (int(state.violations), int(state.unlanded)) == (1, 0)
  np.testing.assert_array_equal(params["w"], [[v, p0]])


def test_check_leaf_hook_sees_every_selected_leaf_at_init():
  calls = []
  tx = jaxprune.master_weight_transform(
      optax.sgd(0.1), select=jaxprune.select(head=None), structure=jaxprune.nm(2, 4),
      sparsity=0.5,
      view_fn=lambda w, mask, step: jnp.where(mask, w, 0.0),
      check_leaf=lambda leaf, dtype: calls.append((leaf.path, leaf.shape, leaf.axis, dtype)))
  params = {"a": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
            "b": {"kernel": jnp.ones((4, 8), jnp.bfloat16)}}
  tx.init(params)
  assert calls == [("a/kernel", (8, 4), 0, np.dtype("float32")),
                   ("b/kernel", (4, 8), 0, np.dtype(jnp.bfloat16))]

  def refuse(leaf, dtype):
    raise ValueError(f"{leaf.path}: not this one")

  tx = jaxprune.master_weight_transform(
      optax.sgd(0.1), select=None, structure=jaxprune.nm(2, 4), sparsity=0.5,
      view_fn=lambda w, mask, step: w, check_leaf=refuse)
  with pytest.raises(ValueError, match="a/kernel: not this one"):
    tx.init(params)


def test_a_grid_landing_refuses_bfloat16_params_naming_them():
  tx = jaxprune.master_weight_transform(
      optax.sgd(0.1), select=None, structure=jaxprune.UNSTRUCTURED, sparsity=0.5,
      view_fn=lambda w, mask, step: w, land_fn=lambda leaf, v, p: (v - p, jnp.int32(0)))
  with pytest.raises(ValueError, match=r"layer/kernel: .*master dtype float32, got bfloat16"):
    tx.init({"layer": {"kernel": jnp.ones((4, 4), jnp.bfloat16)}})
  state = tx.init({"layer": {"kernel": jnp.ones((4, 4))}})
  assert state.violations is None and int(state.corrections) == 0
