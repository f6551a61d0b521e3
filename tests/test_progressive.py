"""Progressive gradient flow (MDGF, SDGF): schedules by hand, exact views every step, loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxprune
from jaxprune.progressive import default_coef, gradient_flow, mask_decay, structure_frames

try:
  from .nnx_models import Net
except ImportError:
  from nnx_models import Net

# ----------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("schedule, expected", [
    ("sparsify", [(10, 7, 8), (30, 4, 8), (50, 2, 8), (70, 1, 8)]),
    ("fine", [(10, 8, 64), (30, 4, 32), (50, 2, 16), (70, 1, 8)]),
])
def test_structure_frames_known_answers(schedule, expected):
  assert structure_frames(1, 8, schedule, total_steps=100, dense_steps=10,
                          finetune_steps=10) == expected


def test_structure_frames_other_targets():
  # M/N not a power of two: halving stops above n, then n itself.
  assert structure_frames(3, 8, "sparsify", total_steps=100) == [
      (0, 7, 8), (33, 4, 8), (66, 3, 8)]
  assert structure_frames(2, 4, "sparsify", total_steps=10) == [(0, 3, 4), (5, 2, 4)]
  assert structure_frames(1, 16, "sparsify", total_steps=5) == [
      (0, 15, 16), (1, 8, 16), (2, 4, 16), (3, 2, 16), (4, 1, 16)]
  assert structure_frames(2, 4, "fine", total_steps=4) == [
      (0, 16, 32), (1, 8, 16), (2, 4, 8), (3, 2, 4)]


@pytest.mark.parametrize("coef", [1e-3, 0.05, 0.7])
def test_exp_decay_half_life(coef):
  np.testing.assert_allclose(mask_decay(math.log(2) / coef, "exp", coef), 0.5, rtol=1e-6)
  np.testing.assert_allclose(mask_decay(jnp.arange(4), "exp", coef),
                             np.exp(-coef * np.arange(4)), rtol=1e-6)


def test_linear_and_step_decay_formulas():
  t = jnp.arange(-2, 8)
  np.testing.assert_array_equal(mask_decay(t, "linear", 0.25),
                                [1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0])
  np.testing.assert_allclose(mask_decay(t, "linear", 0.1),
                             np.where(t < 0, 1.0, np.maximum(0.0, 1 - 0.1 * np.asarray(t))),
                             rtol=1e-6)
  # The unit step: dense before the window, binary from its first step.
  np.testing.assert_array_equal(mask_decay(t, "step"), np.where(t < 0, 1.0, 0.0))
  assert jax.jit(lambda s: mask_decay(s, "exp", 0.5))(jnp.int32(-3)) == 1.0


@pytest.mark.parametrize("window", [1, 7, 720, 437_850])
def test_default_coef_reaches_b_end_where_the_window_ends(window):
  c = default_coef("exp", window)
  assert c == pytest.approx(math.log(100) / window, rel=1e-15)
  np.testing.assert_allclose(mask_decay(window, "exp", c), 0.01, rtol=1e-5)
  assert float(mask_decay(window - 1, "exp", c)) > 0.01
  c = default_coef("linear", window)
  assert c == 1 / window
  assert float(mask_decay(window, "linear", c)) == 0.0
  assert float(mask_decay(window - 1, "linear", c)) == pytest.approx(1 / window, abs=1e-6)


def test_the_issue_numbers_of_a_fixed_rate():
  # The 800-step recipe's window is 720 steps: 8e-4 left b = 0.56 at the hard mask; the
  # authors' ViT-B rate, 1e-4 over 350 x 1,251 steps, is below 0.01 by 10.5% of training.
  assert float(mask_decay(720, "exp", 8e-4)) == pytest.approx(0.562, abs=1e-3)
  assert math.log(100) / 1e-4 / (350 * 1251) == pytest.approx(0.105, abs=1e-3)
  assert default_coef("exp", 720) == pytest.approx(6.396e-3, rel=1e-3)


def test_gradient_flow_default_coef_is_scaled_to_the_sparse_window():
  # 1:4 along axis 0 of one column; the window is [2, 7): L = 5, so the forward pass of
  # step s in it sees b = 0.01 ** ((s - 2) / 5); the fine-tune phase is hard.
  w = jnp.array([[4.0], [-1.0], [-3.0], [2.0]])
  e = np.array([[1], [0], [0], [0]], np.float32)
  tx = gradient_flow(optax.sgd(0.1), 1, 4, total_steps=10, dense_steps=2, finetune_steps=3,
                     select="w")
  state, params = tx.init({"w": w}), tx.view({"w": w})
  update = jax.jit(tx.update)
  for s in range(10):
    b = 1.0 if s < 2 else (0.01 ** ((s - 2) / 5) if s < 7 else 0.0)
    np.testing.assert_allclose(params["w"], np.asarray(w) * (e + b * (1 - e)), rtol=1e-6)
    updates, state = update({"w": jnp.zeros_like(w)}, state, params)
    params = optax.apply_updates(params, updates)
  assert 0.01 ** (4 / 5) > 0.02  # the last soft step is not yet hard


# ----------------------------------------------------------------------------
# Helpers.


def two_layer(seed=0, d=64):
  k = jax.random.split(jax.random.key(seed), 2)
  return {"a": {"kernel": jax.random.normal(k[0], (d, d)) / 8, "bias": jnp.full((d,), 0.1)},
          "b": {"kernel": jax.random.normal(k[1], (d, 4)) / 8}}


def two_layer_loss(params, x, y):
  h = jax.nn.relu(x @ params["a"]["kernel"] + params["a"]["bias"])
  return jnp.mean((h @ params["b"]["kernel"] - y) ** 2)


def data(seed=0, batch=32, d=64):
  x = jax.random.normal(jax.random.key(seed), (batch, d))
  return x, jnp.tanh(x[:, :4] - x[:, 4:8])


def run(tx, params, steps, check=None, d=64):
  """The plain optax loop; ``check(s, params, state)`` sees the params of forward pass ``s``."""
  x, y = data(d=d)
  state = tx.init(params)
  if hasattr(tx, "view"):
    params = jax.jit(tx.view)(params)  # eager N:M masks dispatch op by op: slow on CPU

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(two_layer_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  if check is not None:
    check(0, params, state)
  for s in range(1, steps + 1):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    if check is not None:
      check(s, params, state)
  return params, state, losses


def nm_keep(w, n, m):
  """NumPy oracle of the n:m mask of |w| along axis 0 (ties: the lower index is kept)."""
  groups = np.abs(np.asarray(w)).reshape(-1, m, np.shape(w)[-1])
  rank = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1)
  return (rank < n).reshape(np.shape(w))


def assert_hard_nm(kernel, master, n, m):
  """``kernel`` is exactly the n:m view of ``master`` along axis 0: pruned entries +0.0."""
  kernel, master = np.asarray(kernel), np.asarray(master)
  keep = nm_keep(master, n, m)
  assert ((kernel != 0).reshape(-1, m, kernel.shape[-1]).sum(1) <= n).all()
  assert (kernel[~keep] == 0.0).all() and not np.signbit(kernel[~keep]).any()
  np.testing.assert_allclose(kernel[keep], master[keep], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# MDGF: exact views and straight-through gradients.


def test_view_is_the_soft_mask_formula_exactly_then_hard():
  # 2:4 along axis 0; column 0 keeps 4 and -3, column 1 keeps -8 and 2.
  w = jnp.array([[4.0, 0.5], [-1.0, -8.0], [-3.0, 1.0], [2.0, 2.0]])
  e = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
  tx = gradient_flow(optax.sgd(0.1), 2, 4, total_steps=10, decay="linear", coef=0.25,
                     dense_steps=1, finetune_steps=3, select="w")
  # b per forward pass: dense, t = 0 (b = 1), 0.75, 0.5, 0.25, then binary.
  b = [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
  state = tx.init({"w": w})
  params = tx.view({"w": w})
  update = jax.jit(tx.update)
  for s in range(len(b)):
    np.testing.assert_array_equal(params["w"], np.asarray(w) * (e + b[s] * (1 - e)))
    updates, state = update({"w": jnp.zeros_like(w)}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(jaxprune.master_params(state)["w"], w)


def test_master_receives_the_plain_gradient():
  w = jax.random.normal(jax.random.key(0), (8, 4))
  x = jax.random.normal(jax.random.key(1), (8, 4))
  tx = gradient_flow(optax.sgd(0.125), 1, 4, total_steps=10, decay="linear", coef=0.25,
                     select="w")
  state = tx.init({"w": w})
  params = tx.view({"w": w})
  update = jax.jit(tx.update)
  for _ in range(2):  # to step 2, where b = 0.5
    updates, state = update({"w": jnp.zeros_like(w)}, state, params)
    params = optax.apply_updates(params, updates)
  e = jaxprune.nm_mask(jnp.abs(w), 1, 4, axis=0)
  np.testing.assert_array_equal(params["w"], jnp.where(e, w, 0.5 * w))
  grads = jax.grad(lambda p: jnp.sum(p["w"] * x))(params)
  updates, state = update(grads, state, params)
  params = optax.apply_updates(params, updates)
  # lr * x is exact (lr = 2**-3), so fused multiply-adds cannot change the result.
  w1 = np.asarray(w) - np.float32(0.125) * np.asarray(x)  # not scaled by the soft mask
  np.testing.assert_array_equal(jaxprune.master_params(state)["w"], w1)
  e1 = jaxprune.nm_mask(jnp.abs(w1), 1, 4, axis=0)
  np.testing.assert_allclose(params["w"], jnp.where(e1, w1, 0.25 * w1), rtol=1e-6, atol=1e-6)


def test_while_b_is_one_the_model_is_the_dense_model():
  params = two_layer(d=16)
  # Forward passes 0 and 1 are dense, pass 2 is t = 0 of the window (b = 1).
  tx = gradient_flow(optax.sgd(0.05), 1, 8, total_steps=20, dense_steps=2, coef=0.5)
  _, _, flow = run(tx, params, 4, d=16)
  _, _, dense = run(optax.sgd(0.05), params, 4, d=16)
  np.testing.assert_allclose(flow[:3], dense[:3], rtol=1e-6)
  assert abs(flow[3] - dense[3]) > 1e-4  # b = exp(-0.5) at pass 3


# ----------------------------------------------------------------------------
# Phases and SDGF frames, after every step of a real loop.


@pytest.mark.parametrize("structure_schedule, decay", [
    (None, "exp"), (None, "linear"), ("sparsify", None), ("fine", None), ("sparsify", "exp"),
])
def test_phases_and_frames_every_step(structure_schedule, decay):
  n, m, total, dense, finetune = 1, 8, 13, 2, 3
  # Both kernels go through the phases (the default would leave the head, b, dense).
  tx = gradient_flow(optax.adam(1e-2), n, m, total_steps=total, decay=decay, coef=0.3,
                     structure_schedule=structure_schedule, dense_steps=dense,
                     finetune_steps=finetune, select=jaxprune.select(head=None))
  frames = None if structure_schedule is None else structure_frames(
      n, m, structure_schedule, total_steps=total, dense_steps=dense, finetune_steps=finetune)
  seen = set()

  def check(s, params, state):
    master = jaxprune.master_params(state)
    for name in ("a", "b"):
      kernel, w = params[name]["kernel"], master[name]["kernel"]
      if s < dense:
        np.testing.assert_allclose(kernel, w, rtol=1e-6, atol=1e-6)
      elif s >= total - finetune:
        assert_hard_nm(kernel, w, n, m)
        seen.add("finetune")
      elif frames is not None and decay is None:
        _, a, b = [f for f in frames if f[0] <= s][-1]
        assert_hard_nm(kernel, w, a, b)
        seen.add((a, b))
      else:
        bs = float(mask_decay(s - dense, decay or "exp", 0.3))
        pattern = (n, m) if frames is None else [f for f in frames if f[0] <= s][-1][1:]
        w = np.asarray(w)
        np.testing.assert_allclose(kernel, np.where(nm_keep(w, *pattern), w, np.float32(bs) * w),
                                   rtol=1e-6, atol=1e-6)
    assert (np.asarray(params["a"]["bias"]) != 0).all()  # not selected: never pruned

  _, _, losses = run(tx, two_layer(), total + 3, check)
  assert "finetune" in seen
  if frames is not None and decay is None:
    assert seen >= {(a, b) for _, a, b in frames}
  assert losses[-1] < losses[0]


def test_state_round_trips_through_orbax(tmp_path):
  tx = gradient_flow(optax.adam(1e-2), 1, 8, total_steps=10, structure_schedule="sparsify",
                     dense_steps=1)
  _, state, _ = run(tx, two_layer(d=16), 2, d=16)
  plain = jax.tree.map(np.asarray, state)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", plain)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", plain)
  assert jax.tree.structure(restored) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


def test_nnx_optimizer_under_jax_jit():
  total, finetune = 16, 6
  model = Net(nnx.Rngs(0), din=16, hidden=32)
  tx = gradient_flow(optax.adamw(1e-2), 1, 8, total_steps=total, dense_steps=4,
                     finetune_steps=finetune, coef=0.5, select=jaxprune.select(head=None))
  nnx.update(model, jax.jit(tx.view)(nnx.state(model, nnx.Param)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  x = jax.random.normal(jax.random.key(1), (32, 16))
  y = jnp.tanh(x[:, :4])

  @jax.jit
  def step(state):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  losses = []
  for s in range(1, total + 3):
    state, loss = step(state)
    losses.append(float(loss))
    model, optimizer = nnx.merge(graphdef, state)
    if s >= total - finetune:
      master = jaxprune.master_params(optimizer.opt_state)
      assert_hard_nm(model.a.kernel[...], master["a"]["kernel"][...], 1, 8)
      assert_hard_nm(model.b.kernel[...], master["b"]["kernel"][...], 1, 8)
    assert (np.asarray(model.norm.scale[...]) != 0).all()
  assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------
# Bad input.


def make(**kwargs):
  settings = {"total_steps": 100} | kwargs
  return lambda: gradient_flow(optax.sgd(0.1), settings.pop("n", 1), settings.pop("m", 8),
                               **settings)


@pytest.mark.parametrize("build, match", [
    (make(coef=0.0), r"`coef` must be a finite number > 0, got 0.0"),
    (make(coef=-1e-3), r"`coef` must be a finite number > 0"),
    (make(coef=math.inf), r"`coef` must be a finite number > 0"),
    (make(decay="cosine"), r"`decay` must be one of \('exp', 'linear', 'step'\), got 'cosine'"),
    (make(structure_schedule="densify"),
     r"`structure_schedule` must be one of \('sparsify', 'fine'\) or None, got 'densify'"),
    (make(dense_steps=60, finetune_steps=40),
     r"`dense_steps` \+ `finetune_steps` must be < `total_steps`.*60 \+ 40 >= 100"),
    (make(total_steps=6, dense_steps=2, finetune_steps=2, structure_schedule="sparsify"),
     r"'sparsify' has 4 frames \(7:8, 4:8, 2:8, 1:8\) but the sparse window .*\[2, 4\) has "
     r"only 2 steps"),
    (make(dense_steps=-1), r"`dense_steps` must be >= 0, got -1"),
    (make(finetune_steps=-5), r"`finetune_steps` must be >= 0, got -5"),
    (make(total_steps=0), r"`total_steps` must be >= 1, got 0"),
    (make(dense_steps=2.5), r"`dense_steps` must be an integer"),
    (make(n=9), r"`n` must be in \[1, m\] = \[1, 8\], got n=9"),
    (make(n=0), r"`n` must be >= 1"),
    (lambda: gradient_flow(optax.adamw, 1, 8, total_steps=100),
     r"`inner` must be an optax.GradientTransformation, got the function adamw: call it"),
    (lambda: mask_decay(3, "cosine"), r"`decay` must be one of"),
    (lambda: mask_decay(3, "exp"), r"`coef` is needed by decay='exp'"),
    (lambda: default_coef("exp", 0), r"`window` must be >= 1, got 0"),
    (lambda: structure_frames(1, 8, "custom", total_steps=10), r"`structure_schedule` must be"),
])
def test_errors(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_group_sizes_are_checked_at_init():
  tx = gradient_flow(optax.sgd(0.1), 1, 4, total_steps=10, structure_schedule="fine")
  match = (r"'fine' uses the pattern 8:32, but its group size 32 does not divide the size 16 "
           r"of axis 0 of w \(shape \(16, 4\)\)")
  with pytest.raises(ValueError, match=match):
    tx.init({"w": jnp.ones((16, 4))})
  with pytest.raises(ValueError, match=match):
    tx.view({"w": jnp.ones((16, 4))})
  with pytest.raises(ValueError, match=r"w \(6, 4\): m=4 does not divide size 6 of axis 0"):
    gradient_flow(optax.sgd(0.1), 1, 4, total_steps=10).init({"w": jnp.ones((6, 4))})
  tx.init({"w": jnp.ones((32, 4))})  # 32, 16, 8 and 4 divide 32
