"""STEP: AutoSwitch in closed form, AdamW before, frozen-v closed form after, N:M every step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxprune
from jaxprune import step as step_lib

try:
  from .nnx_models import Net, mse_step
except ImportError:
  from nnx_models import Net, mse_step


#: Every kernel, the output head included (the default selection leaves the head dense); the
#: tests that use it are about both layers of a two-layer model.
BOTH = jaxprune.select(head=None)


def normal(seed, *shape):
  """NumPy random data: JAX's RNG would compile a kernel per shape (seconds per test)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def dict_params(seed=0):
  return {
      "dense_0": {"kernel": normal(seed, 16, 32), "bias": jnp.full((32,), 0.1, jnp.float32)},
      "dense_1": {"kernel": normal(seed + 1, 32, 4), "bias": jnp.full((4,), 0.1, jnp.float32)},
      "norm": {"scale": jnp.ones((32,), jnp.float32)},
  }


def dict_loss(params, x, y):
  h = jax.nn.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
  h = h * params["norm"]["scale"]
  return jnp.mean((h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"] - y) ** 2)


def data(seed=0, batch=64):
  x, w = normal(seed + 2, batch, 16), normal(seed + 3, 16, 4)
  return x, jnp.asarray(np.tanh(np.asarray(x) @ np.asarray(w)))


def is_nm(x, n=2, m=4, axis=0):
  return jaxprune.nm_valid(np.asarray(x), n, m, axis)


def nm_view(w, n=2, m=4):
  """NumPy oracle of E(W) * W along axis 0: the n largest |w| of each group, lower index on ties."""
  w = np.asarray(w)
  groups = np.abs(w).reshape(w.shape[0] // m, m, -1)
  order = np.argsort(-groups, axis=1, kind="stable")
  keep = np.zeros(groups.shape, bool)
  np.put_along_axis(keep, order[:, :n], True, axis=1)
  return np.where(keep.reshape(w.shape), w, 0.0)


def expected_switch(mean_g2, b2, switch_eps, t_min, t_max):
  """The switch step for a constant gradient, from Z_t = (1 - b2) b2^(t-1) mean(g^2)."""
  window = int(1 / (1 - b2))
  ts = np.arange(1, t_max + 2)
  z = (1 - b2) * b2 ** (ts - 1.0) * mean_g2
  z_mean = np.array([z[max(0, t - window):t].mean() for t in ts])
  fire = ((z_mean < switch_eps) & (ts > t_min)) | (ts > t_max)
  t_s = int(ts[np.argmax(fire)])
  return t_s, z_mean


def constant_run(tx, params, grads, steps):
  """The plain optax loop with a fixed gradient; returns (params, state) after each step."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, state))
  return history


def test_autoswitch_fires_at_the_closed_form_step():
  params = dict_params()
  rng = np.random.default_rng(7)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 2.0, p.shape), jnp.float32), params)
  b2, switch_eps, t_min, t_max = 0.8, 2e-3, 3, 40
  selected = [grads["dense_0"]["kernel"], grads["dense_1"]["kernel"]]  # with head=None below
  mean_g2 = sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in selected) / sum(
      g.size for g in selected)
  t_s, z_mean = expected_switch(mean_g2, b2, switch_eps, t_min, t_max)
  assert t_min + 1 < t_s <= t_max  # switched on Z, not forced
  # Not a float32 coin toss: the window mean crosses the threshold with room to spare.
  assert z_mean[t_s - 2] > 1.01 * switch_eps > 1.02 * z_mean[t_s - 1]
  tx = step_lib.step_adam(1e-3, b2=b2, switch_eps=switch_eps, t_min=t_min, t_max=t_max,
                          select=BOTH)
  history = constant_run(tx, params, grads, t_s + 2)
  for t, (_, state) in enumerate(history, start=1):
    switched, switch_step = step_lib.step_phase(state)
    assert bool(switched) == (t >= t_s), t
    assert int(switch_step) == (t_s if t >= t_s else 0)
  # Z_t itself, from the ring buffer.
  window = int(1 / (1 - b2))
  z = np.asarray(history[t_s - 1][1].inner_state.z_window)
  ts = np.arange(t_s - window + 1, t_s + 1)
  np.testing.assert_allclose(z[(ts - 1) % window], (1 - b2) * b2 ** (ts - 1.0) * mean_g2,
                             rtol=1e-5)


def test_t_min_holds_back_the_switch():
  params = {"w": jnp.ones((8, 4))}
  grads = {"w": jnp.full((8, 4), 1e-3)}  # Z is tiny from the first step on
  tx = step_lib.step_adam(1e-3, b2=0.9, switch_eps=1.0, t_min=6, t_max=100)
  history = constant_run(tx, params, grads, 8)
  assert [int(step_lib.step_phase(s)[1]) for _, s in history] == [0] * 6 + [7, 7]


def test_switch_eps_zero_switches_at_t_max_plus_one():
  params = {"w": normal(0, 8, 4)}
  grads = {"w": jnp.zeros((8, 4))}  # Z = 0 exactly, and still 0 < 0 never holds
  tx = step_lib.step_adam(1e-3, switch_eps=0.0, t_min=0, t_max=7)
  history = constant_run(tx, params, grads, 10)
  assert [bool(step_lib.step_phase(s)[0]) for _, s in history] == [False] * 7 + [True] * 3
  assert int(step_lib.step_phase(history[-1][1])[1]) == 8


def test_defaults_window_t_min_and_t_max():
  tx = step_lib.step_adam(1e-3, b2=0.99)
  state = tx.init({"w": jnp.ones((4, 4))})
  window = int(1 / (1 - 0.99))
  assert state.inner_state.z_window.shape == (window,)
  # switch_eps = 0 makes the default t_max = 10 * window visible.
  tx = step_lib.step_adam(1e-3, b2=0.75, switch_eps=0.0)
  history = constant_run(tx, {"w": jnp.ones((4, 4))}, {"w": jnp.ones((4, 4))}, 42)
  assert int(step_lib.step_phase(history[-1][1])[1]) == 10 * 4 + 1


def test_before_the_switch_updates_are_adamw():
  params = dict_params()
  x, y = data()
  kw = dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
  lr = optax.linear_schedule(1e-2, 1e-3, 10)
  tx = step_lib.step_adam(lr, switch_eps=0.0, t_max=10, **kw)
  ref = optax.adamw(lr, **kw)
  state, ref_state = tx.init(params), ref.init(params)
  assert tx.view(params) is params  # the precondition phase is dense

  @jax.jit
  def both(params, state, ref_state):
    grads = jax.grad(dict_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = ref.update(grads, ref_state, params)
    return updates, ref_updates, state, ref_state

  for _ in range(10):
    updates, ref_updates, state, ref_state = both(params, state, ref_state)
    for u, r in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
      np.testing.assert_allclose(u, r, rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, updates)
  assert not bool(step_lib.step_phase(state)[0])
  # The master mirrors the params during the dense phase (up to an FMA's rounding).
  master = jaxprune.master_params(state, params)
  for a, b in zip(jax.tree.leaves(master), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_after_the_switch_frozen_v_closed_form_by_hand():
  # b1 = 0: mu_hat = g. A constant gradient g for t_s = 2 steps gives
  # v* = (1 - b2^2) g^2, so the bias-corrected v*_hat = g^2 and the phase-2
  # step with gradient 3g is exactly lr * (3g / (|g| + eps) + wd * W).
  w0 = np.array([[1.0, -4.0], [-2.0, 3.0], [3.0, 2.0], [0.5, -1.0]], np.float32)
  g = np.array([[0.5, -1.0], [2.0, 0.25], [-1.0, 1.0], [0.125, 4.0]], np.float32)
  lr, wd, b2, eps = 0.01, 0.5, 0.5, 1e-8
  tx = step_lib.step_adam(lr, b1=0.0, b2=b2, eps=eps, weight_decay=wd, switch_eps=0.0,
                          t_min=0, t_max=1)
  state = tx.init({"w": w0})
  params = {"w": w0}
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, state = update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
  assert int(step_lib.step_phase(state)[1]) == 2
  v_star = np.asarray(state.inner_state.nu["w"])
  np.testing.assert_allclose(v_star, (1 - b2**2) * g**2, rtol=1e-6)
  w2 = np.asarray(jaxprune.master_params(state)["w"])
  updates, state = update({"w": 3 * g}, state, params)
  params = optax.apply_updates(params, updates)
  w3 = np.asarray(jaxprune.master_params(state)["w"])
  expected = w2 - lr * (3 * g / (np.abs(g) + eps) + wd * w2)
  np.testing.assert_allclose(w3, expected, rtol=1e-6)
  np.testing.assert_array_equal(state.inner_state.nu["w"], v_star)
  np.testing.assert_array_equal(params["w"], nm_view(w3))


def numpy_step(w, grads, lr, b1, b2, eps, weight_decay, t_s):
  """STEP in float64 for one selected leaf given all its gradients (t = 1, 2, ...)."""
  mu, nu = np.zeros_like(w), np.zeros_like(w)
  v_star = None
  for t, g in enumerate(grads, start=1):
    mu = b1 * mu + (1 - b1) * g
    if v_star is None:
      nu = b2 * nu + (1 - b2) * g**2
      denom = np.sqrt(nu / (1 - b2**t)) + eps
      if t == t_s:
        v_star = nu
    else:
      denom = np.sqrt(v_star / (1 - b2**t_s)) + eps
    w = w - lr(t - 1) * (mu / (1 - b1**t) / denom + weight_decay * w)
  return w, v_star


def test_after_the_switch_matches_a_float64_reference():
  w0 = np.asarray(normal(3, 8, 6), np.float64)
  grads = np.asarray(normal(4, 12, 8, 6), np.float64)
  lr = optax.cosine_decay_schedule(0.05, 12)
  kw = dict(b1=0.9, b2=0.9, eps=1e-6, weight_decay=0.05)
  tx = step_lib.step_adam(lr, switch_eps=0.0, t_min=0, t_max=4, **kw)
  state = tx.init({"w": jnp.asarray(w0, jnp.float32)})
  params = {"w": jnp.asarray(w0, jnp.float32)}
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
  lrs = 0.025 * (1 + np.cos(np.pi * np.arange(12) / 12))  # the cosine schedule
  w_ref, v_star = numpy_step(w0, grads, lambda c: lrs[c], t_s=5, **kw)
  np.testing.assert_allclose(state.inner_state.nu["w"], v_star, rtol=1e-5)
  master = np.asarray(jaxprune.master_params(state)["w"])
  np.testing.assert_allclose(master, w_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(params["w"], nm_view(master))


def test_plain_optax_loop_nm_every_step_frozen_v_and_adamw_biases():
  params = dict_params()
  x, y = data()
  kw = dict(b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-3)
  tx = step_lib.step_adam(1e-2, switch_eps=0.0, t_min=0, t_max=5, select=BOTH, **kw)
  bias_ref = optax.adamw(1e-2, **kw)  # on the unselected leaves alone
  unselected = lambda tree: {"b0": tree["dense_0"]["bias"], "b1": tree["dense_1"]["bias"],  # noqa: E731
                             "s": tree["norm"]["scale"]}
  state, ref_state = tx.init(params), bias_ref.init(unselected(params))

  @jax.jit
  def train_step(params, state, ref_state):
    loss, grads = jax.value_and_grad(dict_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = bias_ref.update(unselected(grads), ref_state, unselected(params))
    return optax.apply_updates(params, updates), state, ref_state, updates, ref_updates, loss

  losses, v_star = [], None
  for t in range(1, 41):
    params, state, ref_state, updates, ref_updates, loss = train_step(params, state, ref_state)
    losses.append(float(loss))
    for u, r in zip(jax.tree.leaves(unselected(updates)), jax.tree.leaves(ref_updates),
                    strict=True):
      np.testing.assert_allclose(u, r, rtol=1e-5, atol=1e-9)
    kernels = (params["dense_0"]["kernel"], params["dense_1"]["kernel"])
    nu = state.inner_state.nu
    if t < 6:
      assert not any(is_nm(k) for k in kernels)
      continue
    assert all(is_nm(k) for k in kernels), t
    frozen = (nu["dense_0"]["kernel"], nu["dense_1"]["kernel"])
    if v_star is None:
      v_star = [np.asarray(v) for v in frozen]
    for v, v0 in zip(frozen, v_star, strict=True):
      np.testing.assert_array_equal(v, v0)  # bitwise, every step
  assert not np.array_equal(nu["dense_0"]["bias"], 0)
  np.testing.assert_allclose(nu["dense_0"]["bias"], ref_state[0].nu["b0"], rtol=1e-5)
  assert losses[-1] < losses[5]


def test_nnx_optimizer_and_orbax_round_trip(tmp_path):
  model = Net(nnx.Rngs(0))
  tx = step_lib.step_adam(1e-2, switch_eps=0.0, t_min=0, t_max=8, select=BOTH)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = normal(1, 32, 8), normal(2, 32, 4)

  train_step = mse_step(x, y)

  losses = []
  for t in range(1, 25):
    losses.append(float(train_step(model, optimizer)))
    switched, switch_step = step_lib.step_phase(optimizer.opt_state)
    assert bool(switched) == (t >= 9)
    kernels = (model.a.kernel[...], model.b.kernel[...])
    assert all(is_nm(k) for k in kernels) == (t >= 9)
  assert int(switch_step) == 9
  assert losses[-1] < losses[0]
  master = jaxprune.master_params(nnx.as_pure(optimizer.opt_state))
  assert master["a"]["kernel"].shape == (8, 16) and not is_nm(master["a"]["kernel"])

  # The raw state (NamedTuples of arrays) through Orbax.
  state = jax.tree.map(np.asarray, nnx.as_pure(optimizer.opt_state))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "step", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "step", state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(a, b)
  assert bool(step_lib.step_phase(restored)[0]) and int(step_lib.step_phase(restored)[1]) == 9


def test_axis_select_and_chain():
  params = {"k": normal(0, 6, 8), "skip": jnp.ones((4, 4))}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   step_lib.step_adam(0.1, 1, 4, switch_eps=0.0, t_min=0, t_max=0, axis=1,
                                      select="k"))
  history = constant_run(tx, params, jax.tree.map(jnp.ones_like, params), 3)
  params, state = history[-1]
  assert is_nm(params["k"], 1, 4, axis=1) and not is_nm(params["k"], 1, 4, axis=0)
  assert not is_nm(params["skip"], 1, 4)  # not selected: plain AdamW
  assert int(step_lib.step_phase(state)[1]) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(b2=1.0), r"`b2` must be a float in \(0, 1\), got 1.0"),
    (dict(b2=0.0), r"`b2` must be a float in \(0, 1\), got 0.0"),
    (dict(b1=1.0), r"`b1` must be in \[0, 1\), got 1.0"),
    (dict(b1=-0.1), r"`b1` must be in \[0, 1\), got -0.1"),
    (dict(switch_eps=-1e-9), r"`switch_eps` must be >= 0, got -1e-09"),
    (dict(t_min=5, t_max=4), r"`t_min` must be <= `t_max` = 4, got t_min=5"),
    (dict(t_min=-1), r"`t_min` must be >= 0, got -1"),
    (dict(t_max=-1), r"`t_max` must be >= 0, got -1"),
    (dict(t_min=1.5), r"`t_min` must be an integer"),
    (dict(n=3, m=2), r"`n` must be in \[1, m\]"),
    (dict(n=0), r"`n` must be >= 1"),
    (dict(preconditioner="adamw_step"),
     r"`preconditioner` must be one of \('corrected', 'reference'\), got 'adamw_step'"),
    (dict(zero_v="floor"), r"`zero_v` must be one of \('adam', 'freeze'\), got 'floor'"),
    (dict(total_steps=1), r"`total_steps` must be >= 2, got 1"),
    (dict(total_steps=100, t_max=99),
     r"`t_max` = 99 forces the switch at step 100, not before the end of `total_steps` = 100: "
     r"STEP would never learn a mask; use t_max < 99"),
])
def test_construction_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    step_lib.step_adam(1e-3, **kwargs)


def test_init_update_and_phase_errors():
  tx = step_lib.step_adam(1e-3)
  with pytest.raises(ValueError, match=r"w \(6, 4\): m=4 does not divide size 6 of axis 0"):
    tx.init({"w": jnp.ones((6, 4))})
  state = tx.init({"w": jnp.ones((8, 4))})
  with pytest.raises(ValueError, match="`update` needs `params`"):
    tx.update({"w": jnp.ones((8, 4))}, state)
  with pytest.raises(ValueError, match="does not have the tree structure"):
    tx.update({"v": jnp.ones((8, 4))}, state, {"v": jnp.ones((8, 4))})
  with pytest.raises(ValueError, match="expected exactly one jaxprune master-weight state"):
    step_lib.step_phase(optax.adam(1.0).init({"w": jnp.ones(2)}))
  ste_state = jaxprune.sr_ste(optax.sgd(1.0)).init({"w": jnp.ones((8, 4))})
  with pytest.raises(ValueError, match="not STEP's"):
    step_lib.step_phase(ste_state)


# ----------------------------------------------------------------------------
# preconditioner='reference': AdamW_STEP's frozen denominator sqrt(v*) + eps**0.75.


def test_reference_preconditioner_closed_form_by_hand():
  # As above (b1 = 0, constant g for t_s = 2 steps: v* = (1 - b2^2) g^2), but without the bias
  # correction: the step with gradient 3g is lr * 3g / (sqrt(1 - b2^2) |g| + eps^(3/4)), larger
  # than the corrected one by 1 / sqrt(1 - b2^2) = 1.155 at b2 = 0.5.
  w0 = np.array([[1.0, -4.0], [-2.0, 3.0], [3.0, 2.0], [0.5, -1.0]], np.float32)
  g = np.array([[0.5, -1.0], [2.0, 0.25], [-1.0, 1.0], [0.125, 4.0]], np.float32)
  lr, b2, eps = 0.01, 0.5, 1e-8
  results = {}
  for preconditioner in ("corrected", "reference"):
    tx = step_lib.step_adam(lr, b1=0.0, b2=b2, eps=eps, switch_eps=0.0, t_min=0, t_max=1,
                            preconditioner=preconditioner)
    history = constant_run(tx, {"w": w0}, {"w": g}, 2)
    params, state = history[-1]
    w2 = np.asarray(jaxprune.master_params(state)["w"])
    updates, state = jax.jit(tx.update)({"w": 3 * g}, state, params)
    results[preconditioner] = (w2, np.asarray(jaxprune.master_params(state)["w"]))
  w2, w3 = results["reference"]
  denom = np.sqrt(1 - b2**2) * np.abs(g.astype(np.float64)) + eps**0.75
  np.testing.assert_allclose(w3, w2 - lr * 3 * g / denom, rtol=1e-6)
  step_ref, step_corr = w2 - w3, np.subtract(*results["corrected"])
  np.testing.assert_allclose(step_ref / step_corr, 1 / np.sqrt(1 - b2**2), rtol=1e-5)


class AdamWStepPort:
  """A float64 port of the public PyTorch ``AdamW_STEP.step`` (amsgrad=False, option=1).

  Selected parameters (the reference's ``p.mask`` attribute) take part in AutoSwitch and
  get the frozen ``preconditioned_variance`` after it; the others are plain AdamW. The
  weight decay is applied first, ``p *= 1 - lr * wd``, then ``p -= lr / bc1 * m / denom``.
  """

  def __init__(self, shapes, selected, *, betas, eps, weight_decay, clipping):
    self.b1, self.b2 = betas
    self.eps, self.wd = eps, weight_decay
    self.selected = selected
    self.t_omega = int(1 / (1 - self.b2))
    self.t_min, self.t_max = clipping
    self.mask, self.window, self.t = "dense", [], 0
    self.state = [dict(step=0, m=np.zeros(s), v=np.zeros(s), v_last=np.zeros(s), pv=None)
                  for s in shapes]

  def step(self, params, grads, lr):
    change = []
    self.t += 1
    out = []
    for p, g, st, sel in zip(params, grads, self.state, self.selected, strict=True):
      p = p * (1 - lr * self.wd)
      if sel and self.mask == "dense":
        st["v_last"] = st["v"].copy()
      st["step"] += 1
      bc1, bc2 = 1 - self.b1 ** st["step"], 1 - self.b2 ** st["step"]
      st["m"] = self.b1 * st["m"] + (1 - self.b1) * g
      st["v"] = self.b2 * st["v"] + (1 - self.b2) * g * g
      if sel and self.mask == "dense":
        change.append(st["v"] - st["v_last"])
      if sel and self.mask == "sparse":
        denom = np.sqrt(st["pv"]) + np.sqrt(self.eps) * np.sqrt(np.sqrt(self.eps))
      else:
        denom = np.sqrt(st["v"]) / np.sqrt(bc2) + self.eps
      out.append(p - lr / bc1 * st["m"] / denom)
    if self.mask == "dense":
      self.window.append(np.mean(np.abs(np.concatenate([c.ravel() for c in change]))))
      self.window = self.window[-self.t_omega:]
      average_z = np.mean(self.window)
      if self.t > self.t_max or (average_z < self.eps and self.t > self.t_min):
        self.mask = "sparse"
        for st, sel in zip(self.state, self.selected, strict=True):
          if sel:
            st["pv"] = st["v"].copy()
    return out


def linear_grads(w, b, x, y):
  """Gradients of mean((x w + b - y)^2) in float64 (the model sees w: the view if sparse)."""
  r = 2 * (x @ w + b - y) / y.size
  return x.T @ r, r.sum(0)


@pytest.mark.parametrize("preconditioner", ["reference", "corrected"])
def test_reference_preconditioner_matches_a_port_of_adamw_step(preconditioner):
  x, y = np.asarray(normal(0, 32, 8), np.float64), np.asarray(normal(1, 32, 6), np.float64)
  w0, b0 = np.asarray(normal(2, 8, 6), np.float64) / 3, np.zeros(6)
  lr = optax.cosine_decay_schedule(0.02, 40)
  kw = dict(b1=0.9, b2=0.9, eps=1e-8, weight_decay=0.05)
  tx = step_lib.step_adam(lr, t_min=3, t_max=8, switch_eps=kw["eps"], zero_v="freeze",
                          preconditioner=preconditioner, **kw)
  port = AdamWStepPort([w0.shape, b0.shape], [True, False], betas=(kw["b1"], kw["b2"]),
                       eps=kw["eps"], weight_decay=kw["weight_decay"], clipping=(3, 8))
  params = {"b": jnp.asarray(b0, jnp.float32), "w": jnp.asarray(w0, jnp.float32)}
  state, update = tx.init(params), jax.jit(tx.update)
  w, b = w0, b0
  for t in range(40):
    view = nm_view(w) if port.mask == "sparse" else w  # the reference model's forward
    gw, gb = linear_grads(view, b, x, y)
    w, b = port.step([w, b], [gw, gb], float(lr(t)))
    gw, gb = linear_grads(np.asarray(params["w"], np.float64), np.asarray(params["b"]), x, y)
    updates, state = update({"b": jnp.asarray(gb, jnp.float32), "w": jnp.asarray(gw, jnp.float32)},
                            state, params)
    params = optax.apply_updates(params, updates)
  assert int(step_lib.step_phase(state)[1]) == 9 and port.mask == "sparse"
  master = np.asarray(jaxprune.master_params(state)["w"], np.float64)
  if preconditioner == "reference":  # the same trajectory, to float32 rounding
    np.testing.assert_allclose(master, w, rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(params["b"], b, rtol=2e-4, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(params["w"]) != 0, nm_view(w) != 0)
  else:  # steps smaller by sqrt(1 - 0.9^9) = 0.78 for 31 steps: a visibly different model
    assert np.max(np.abs(master - w)) > 1e-2


# ----------------------------------------------------------------------------
# Entries whose v is 0 at the switch (dead ReLU units that pruning revives).


def dead_unit_problem():
  """An MLP whose hidden units 0-3 are dead under AdamW and come alive at the switch.

  Inputs 2 and 3 are constant 10s, inputs 0-1 and 4-7 are |N(0, 1)|. Units 0-3 weigh the
  inputs (2, 2, -1.5, -1.5, ...) per group of 4: the pre-activation 2 (x0 + x1) - 30 + ... < 0
  kills them (their weights get exactly zero gradient, so v stays exactly 0), while the 2:4
  mask keeps the two +2 of each group and prunes the -1.5: alive after the switch.
  """
  rng = np.random.default_rng(3)
  x = np.abs(rng.standard_normal((64, 8))).astype(np.float32)
  x[:, 2:4] = 10.0
  w1 = (0.3 * rng.standard_normal((8, 16))).astype(np.float32)
  w1[:, :4] = np.array([2, 2, -1.5, -1.5, 0.1, 0.1, -0.05, -0.05], np.float32)[:, None]
  params = {"w1": jnp.asarray(w1), "b1": jnp.zeros(16),
            "w2": jnp.asarray(0.3 * rng.standard_normal((16, 4)), jnp.float32)}
  y = jnp.asarray(np.tanh(x[:, :4] - x[:, 4:]) / 2)

  def loss(p):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y) ** 2)

  assert (np.asarray(x @ w1)[:, :4] < 0).all()  # dead at the start
  return params, loss


def train(tx, params, loss, steps):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  return params, state, losses


def test_dead_relu_units_step_trains_wherever_adamw_trains():
  params, loss = dead_unit_problem()
  kw = dict(b1=0.9, b2=0.9, eps=1e-8)
  _, _, adamw = train(optax.adamw(1e-2, **kw), params, loss, 80)
  assert adamw[-1] < 0.5 * adamw[0]  # AdamW trains (units 0-3 stay dead, v = 0 there)

  tx = step_lib.step_adam(1e-2, switch_eps=0.0, t_min=0, t_max=20, select=BOTH, **kw)
  params_step, state, losses = train(tx, params, loss, 80)
  nu = state.inner_state.nu
  assert (np.asarray(nu["w1"])[:, :4] > 0).all()  # revived: their v kept Adam's update
  adam_v = state.inner_state.adam_v
  assert np.asarray(adam_v["w1"])[:, :4].all() and np.asarray(adam_v["w2"])[:4].all()
  # Whole units: a dead unit's column of w1 and row of w2 (the random units die too).
  dead = np.asarray(adam_v["w1"])[0]
  assert (np.asarray(adam_v["w1"]) == dead).all() and dead.sum() < 16
  np.testing.assert_array_equal(np.asarray(adam_v["w2"]), np.repeat(dead[:, None], 4, 1))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
  master = jaxprune.master_params(state)
  assert max(float(jnp.max(jnp.abs(master[k]))) for k in ("w1", "w2")) < 5.0
  fraction = dead.sum() / 16
  assert f"{fraction:.2%} of the selected entries had v = 0" in step_lib.step_status(state)

  # Frozen like the paper (and AdamW_STEP, at eps**0.75): the revived units' steps are
  # lr * m / eps, and the weights explode within a few steps of the switch.
  for preconditioner in PRECONDITIONERS:
    tx = step_lib.step_adam(1e-2, switch_eps=0.0, t_min=0, t_max=20, zero_v="freeze",
                            preconditioner=preconditioner, select=BOTH, **kw)
    _, state, _ = train(tx, params, loss, 25)
    master = jaxprune.master_params(state)
    assert float(jnp.max(jnp.abs(master["w2"]))) > 1e3, preconditioner


PRECONDITIONERS = step_lib.PRECONDITIONERS


# ----------------------------------------------------------------------------
# t_max and the run length; the status line.


def test_total_steps_sets_t_max_and_short_runs_switch():
  params, grads = {"w": normal(0, 8, 4)}, {"w": normal(1, 8, 4)}
  assert step_lib.default_t_max(0.999, None) == 9990  # T_w = int(1 / (1 - 0.999)) = 999
  assert step_lib.default_t_max(0.999, 800) == 200
  assert step_lib.default_t_max(0.9, 10_000) == 100
  assert step_lib.default_t_max(0.999, 3) == 1
  # Defaults, 30 steps: never switches, and the status says so.
  history = constant_run(step_lib.step_adam(1e-2), params, grads, 30)
  status = step_lib.step_status(history[-1][1])
  assert status.startswith("STEP has not switched (t=30, t_max=9990: forced at t=9991; "), status
  assert status.endswith("the model is still dense.")
  # total_steps=40: t_max = 10, t_min = min(T_w, t_max) = 10; Z stays above switch_eps=0.
  tx = step_lib.step_adam(1e-2, total_steps=40, switch_eps=0.0)
  history = constant_run(tx, params, grads, 30)
  assert [bool(step_lib.step_phase(s)[0]) for _, s in history].index(True) == 10
  assert step_lib.step_status(history[-1][1]) == (
      "STEP switched at t=11 (forced: t > t_max=10); N:M masks learned for 19 steps under "
      "frozen v.")
  # AutoSwitch (Z below a large threshold from t_min on).
  tx = step_lib.step_adam(1e-2, b2=0.9, switch_eps=1.0, t_min=3, t_max=50)
  history = constant_run(tx, params, grads, 6)
  assert step_lib.step_status(history[-1][1]).startswith("STEP switched at t=4 (AutoSwitch); ")


# ----------------------------------------------------------------------------
# bfloat16 params: float32 master weights and moments; the invariant in bfloat16.


def test_bfloat16_params_keep_float32_master_and_moments():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), dict_params())
  x, y = data()
  tx = step_lib.step_adam(1e-2, b2=0.9, switch_eps=0.0, t_min=0, t_max=6, select=BOTH)
  state = tx.init(params)
  inner = state.inner_state
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((inner.mu, inner.nu)))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.master))

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(dict_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, updates

  def bf16_ulp(x):
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 2.0**-126))) - 7)

  losses = []
  for t in range(1, 21):
    old = params
    params, state, loss, updates = step(params, state)
    losses.append(float(loss))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves((params, updates)))
    master = state.master
    for name in ("dense_0", "dense_1"):
      p, w = np.asarray(params[name]["kernel"], np.float32), np.asarray(master[name]["kernel"])
      p_old = np.asarray(old[name]["kernel"], np.float32)
      assert w.dtype == np.float32
      # The params are the master (its view) rounded to bf16: exactly where old and new value
      # are within a factor of 2 (Sterbenz), else up to the rounding of p + (v - p) in bf16.
      expected = w if t < 7 else nm_view(w)
      rounded = np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32)
      assert (np.abs(p - rounded) <= bf16_ulp(np.maximum(np.abs(p_old), np.abs(rounded)))).all()
      assert np.mean(p == rounded) > 0.95  # entries that cross or near 0 round twice
      if t >= 7:  # the invariant, exactly: N:M, and pruned entries +0.0
        assert is_nm(p) and (p[nm_view(w) == 0] == 0).all()
        assert not np.signbit(p[nm_view(w) == 0]).any()
  assert losses[-1] < losses[0]
  # The master accumulates steps below bfloat16's resolution: it is not the params.
  w = np.asarray(state.master["dense_0"]["kernel"])
  assert not np.array_equal(w, np.asarray(jnp.asarray(w).astype(jnp.bfloat16), np.float32))
