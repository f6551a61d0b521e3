"""Drop-in pruning transforms: invariants after every step of unchanged training loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import jaxprune

try:
  from .nnx_models import mse_step
except ImportError:
  from nnx_models import mse_step


class MLP(nnx.Module):
  """A small model with biases and a LayerNorm: leaves that must not be pruned."""

  def __init__(self, rngs: nnx.Rngs, width: int = 32):
    self.inp = nnx.Linear(16, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, 4, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.norm(self.inp(x)))
    return self.out(jax.nn.relu(self.hidden(x)))


def data(seed=0, batch=64):
  x = jax.random.normal(jax.random.key(seed), (batch, 16))
  w = jax.random.normal(jax.random.key(seed + 1), (16, 4))
  return x, jnp.tanh(x @ w)


def dict_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {
      "dense_0": {"kernel": jax.random.normal(k[0], (16, 32)), "bias": jnp.full((32,), 0.1)},
      "dense_1": {"kernel": jax.random.normal(k[1], (32, 4)), "bias": jnp.full((4,), 0.1)},
      "norm": {"scale": jnp.ones((32,))},
  }


def dict_loss(params, x, y):
  h = jax.nn.relu(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
  h = h * params["norm"]["scale"]
  return jnp.mean((h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"] - y) ** 2)


def run_optax_loop(tx, params, steps, check=None):
  """The unchanged optax loop; ``check(step, params, state)`` after every step."""
  x, y = data()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(dict_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for t in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    if check is not None:
      check(t, params, state)
  return params, state, losses


def assert_nm(kernel, n, m, axis=0):
  groups = np.moveaxis(np.asarray(kernel) != 0, axis, -1).reshape(-1, m)
  assert (groups.sum(-1) <= n).all()


def assert_masked_exactly_zero(params, masks):
  for p, mask in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
    if np.ndim(mask):
      assert (np.asarray(p)[~np.asarray(mask)] == 0.0).all()


# ----------------------------------------------------------------------------
# N:M (ASP).


def test_nm_pruning_plain_optax_loop_invariants():
  params = dict_params()

  def check(t, p, state):
    assert_nm(p["dense_0"]["kernel"], 2, 4, axis=0)
    mask = np.asarray(state.masks["dense_0"]["kernel"])
    assert (mask.reshape(-1, 4, mask.shape[-1]).sum(1) == 2).all()  # exactly n kept
    assert_masked_exactly_zero(p, state.masks)
    # Non-selected leaves: scalar True masks, values still moving. dense_1 is the output
    # head (the last layer), which the default selection leaves dense.
    assert state.masks["dense_0"]["bias"].shape == ()
    assert state.masks["dense_1"]["kernel"].shape == ()
    assert (np.asarray(p["dense_1"]["kernel"]) != 0).all()
    assert (np.asarray(p["dense_0"]["bias"]) != 0.1).any()

  _, state, losses = run_optax_loop(jaxprune.nm_pruning(optax.adam(1e-2), 2, 4), params, 30, check)
  assert state.masks["dense_0"]["kernel"].dtype == jnp.bool_
  assert losses[-1] < losses[0]


def test_nm_pruning_mask_from_magnitude_then_held():
  params = dict_params()
  tx = jaxprune.nm_pruning(optax.sgd(0.0), 2, 4, prune_step=0)  # lr 0: weights only masked
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  want = jaxprune.nm_mask(jnp.abs(params["dense_0"]["kernel"]), 2, 4, axis=0)
  np.testing.assert_array_equal(state.masks["dense_0"]["kernel"], want)
  np.testing.assert_array_equal(new["dense_0"]["kernel"], params["dense_0"]["kernel"] * want)


def test_nm_pruning_dense_until_prune_step_and_adam_cannot_revive():
  params = dict_params()
  masks_seen = []

  def check(t, p, state):
    kernel = np.asarray(p["dense_0"]["kernel"])
    if t < 5:
      assert (kernel != 0).all()
    else:
      assert_nm(kernel, 1, 4)
      masks_seen.append(np.asarray(state.masks["dense_0"]["kernel"]))

  # Large learning rate and momentum: pruned weights would move if moments leaked.
  run_optax_loop(jaxprune.nm_pruning(optax.adam(0.1, b1=0.99), 1, 4, prune_step=5), params, 20,
                 check)
  assert all((m == masks_seen[0]).all() for m in masks_seen)  # held after prune_step


def test_nm_pruning_nnx_optimizer_invariants():
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, jaxprune.nm_pruning(optax.adamw(1e-2), 2, 4), wrt=nnx.Param)
  x, y = data()

  step = mse_step(x, y)

  losses = []
  for _ in range(25):
    losses.append(float(step(model, optimizer)))
    for layer in (model.inp, model.hidden):
      assert_nm(layer.kernel[...], 2, 4, axis=0)
    assert (np.asarray(model.out.kernel[...]) != 0).all()  # the output head stays dense
    assert (np.asarray(model.inp.bias[...]) != 0).any()
    assert (np.asarray(model.norm.scale[...]) != 0).all()
  summary = jaxprune.sparsity_summary(nnx.state(model, nnx.Param), nm=(2, 4))
  assert summary.nm_ok
  assert losses[-1] < losses[0]


def test_nm_pruning_axis_and_overrides():
  params = {"a": {"kernel": jnp.arange(1.0, 65.0).reshape(8, 8)},
            "b": {"kernel": jnp.arange(1.0, 25.0).reshape(4, 6)}}
  # 'b' cannot be grouped by 4 along axis 1 (size 6): an override moves it to axis 0.
  # head=None: 'b', the last layer, is pruned too.
  select = jaxprune.select(head=None, overrides={"b": {"axis": 0}})
  tx = jaxprune.nm_pruning(optax.sgd(0.0), 2, 4, axis=1, select=select)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  assert_nm(new["a"]["kernel"], 2, 4, axis=1)
  assert_nm(new["b"]["kernel"], 2, 4, axis=0)
  assert not jaxprune.nm_valid(np.asarray(new["a"]["kernel"]), 2, 4, 0)


# ----------------------------------------------------------------------------
# Gradual magnitude pruning.


def test_gmp_follows_schedule_exactly_and_learns():
  params = dict_params()
  schedule = jaxprune.polynomial_schedule(0.0, 0.8, begin_step=5, end_step=45, frequency=5)
  applied = jaxprune.applied_sparsity(schedule, 60)
  history = []

  def check(t, p, state):
    assert_masked_exactly_zero(p, state.masks)
    for name in ("dense_0",):
      kernel = np.asarray(p[name]["kernel"])
      pruned = int((~np.asarray(state.masks[name]["kernel"])).sum())
      # The realised count is the schedule's value in force, rounded per layer.
      final_k = round(0.8 * kernel.size)
      want = round(float(np.float32(applied[t]) / np.float32(0.8)) * final_k)
      assert pruned == want, (t, name)
      history.append(pruned)
    assert (np.asarray(p["dense_0"]["bias"]) != 0).all()

  params, _, losses = run_optax_loop(
      jaxprune.magnitude_pruning(optax.adam(1e-2), schedule), params, 60, check)
  assert int((np.asarray(params["dense_0"]["kernel"]) == 0).sum()) == round(0.8 * 512)
  assert int((np.asarray(params["dense_1"]["kernel"]) == 0).sum()) == 0  # the head
  assert np.mean(losses[-5:]) < 0.5 * losses[0]


def test_gmp_keeps_the_largest_weights():
  params = {"w": {"kernel": jnp.array([[0.1, -3.0], [2.0, 0.5], [-0.2, 4.0]])}}
  tx = jaxprune.magnitude_pruning(optax.sgd(0.0), 0.5)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["w"]["kernel"], [[0.0, -3.0], [2.0, 0.0], [0.0, 4.0]])


def test_gmp_erk_and_overrides_hit_each_layer_target():
  params = {"wide": {"kernel": jnp.ones((64, 64)) + jnp.arange(4096.0).reshape(64, 64) * 1e-3},
            "narrow": {"kernel": jnp.ones((64, 8)) + jnp.arange(512.0).reshape(64, 8) * 1e-3},
            "fixed": {"kernel": jnp.ones((16, 16)) + jnp.arange(256.0).reshape(16, 16) * 1e-3}}
  select = jaxprune.select(distribution="erk", head=None,
                           overrides={"fixed": {"sparsity": 0.25}})
  schedule = jaxprune.polynomial_schedule(0.0, 0.7, 0, 10, frequency=2)
  tx = jaxprune.magnitude_pruning(optax.sgd(1e-3), schedule, select=select)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(11):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  targets = jaxprune.erk_sparsities({"wide": (64, 64), "narrow": (64, 8)}, 0.7)
  for name, target in [*targets.items(), ("fixed", 0.25)]:
    size = params[name]["kernel"].size
    assert int((params[name]["kernel"] == 0).sum()) == round(target * size), name
  assert targets["narrow"] < targets["wide"]


def test_global_scope_one_threshold():
  params = {"big": {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4) * 10},
            "small": {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)}}
  tx = jaxprune.magnitude_pruning(optax.sgd(0.0), 0.5, scope="global",
                                  select=jaxprune.select(head=None))
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = optax.apply_updates(params, updates)
  # One threshold over {1..16} and {10, 20, ..., 160}: the 16 smallest are
  # small's 1..15 and big's 10.
  assert int((new["small"]["kernel"] == 0).sum()) == 15
  assert int((new["big"]["kernel"] == 0).sum()) == 1
  assert int(sum((x == 0).sum() for x in jax.tree.leaves(new))) == 16


def test_inner_optimizer_sees_no_gradient_for_pruned_entries():
  params = dict_params()
  tx = jaxprune.magnitude_pruning(optax.adam(0.5), 0.9)  # pruned at the end of step 0
  first_mu = []

  def check(t, p, state):
    if t == 0:
      first_mu.append(np.asarray(state.inner_state[0].mu["dense_0"]["kernel"]))

  params, state, _ = run_optax_loop(tx, params, 15, check)
  pruned = ~np.asarray(state.masks["dense_0"]["kernel"])
  mu = np.asarray(state.inner_state[0].mu["dense_0"]["kernel"])
  # After step 0 the pruned entries' first moment only decays: no new gradient.
  np.testing.assert_allclose(mu[pruned], 0.9**14 * first_mu[0][pruned], rtol=1e-5)
  assert (np.asarray(params["dense_0"]["kernel"])[pruned] == 0).all()


# ----------------------------------------------------------------------------
# Composition with optax.


def test_inside_chain_and_multisteps():
  params = dict_params()
  chained = optax.chain(optax.clip_by_global_norm(1.0),
                        jaxprune.nm_pruning(optax.adam(1e-2), 2, 4))

  def check(t, p, state):
    assert_nm(p["dense_0"]["kernel"], 2, 4)

  run_optax_loop(chained, params, 5, check)
  # Pruning around MultiSteps: masks apply from the first mini-step.
  run_optax_loop(jaxprune.nm_pruning(optax.MultiSteps(optax.adam(1e-2), 3), 2, 4), params, 7,
                 check)
  # MultiSteps around pruning: the invariant holds after every real (k-th) step.
  outer = optax.MultiSteps(jaxprune.nm_pruning(optax.adam(1e-2), 2, 4), 3)

  def check_every_k(t, p, state):
    if (t + 1) % 3 == 0:
      assert_nm(p["dense_0"]["kernel"], 2, 4)

  run_optax_loop(outer, params, 9, check_every_k)


def test_inject_hyperparams_inner_and_outer():
  params = dict_params()
  inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
  tx = jaxprune.magnitude_pruning(inner, 0.5)
  state = tx.init(params)
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  x, y = data()
  grads = jax.grad(dict_loss)(params, x, y)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  # lr 0: kept weights unchanged, pruned ones exactly zero.
  kept = np.asarray(state.masks["dense_0"]["kernel"])
  np.testing.assert_array_equal(np.asarray(new["dense_0"]["kernel"])[kept],
                                np.asarray(params["dense_0"]["kernel"])[kept])
  # The sparsity itself as an injected hyperparameter (traced inside update).
  outer = optax.inject_hyperparams(jaxprune.magnitude_pruning)(
      inner=optax.adam(1e-2), sparsity=0.25)

  def check(t, p, state):
    assert int((np.asarray(p["dense_0"]["kernel"]) == 0).sum()) == round(0.25 * 512)

  run_optax_loop(outer, params, 3, check)


def test_masks_tree_maps_with_params_and_checkpoints(tmp_path):
  model = MLP(nnx.Rngs(1))
  params = nnx.state(model, nnx.Param)
  tx = jaxprune.magnitude_pruning(optax.adam(1e-3), 0.5)
  state = tx.init(params)
  masked = jax.tree.map(lambda p, m: p * m, params, state.masks)
  assert jax.tree.structure(masked) == jax.tree.structure(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  # The optimizer state, masks included, round-trips through Orbax.
  plain = {"opt_state": jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.State(
      {"s": state.masks})))}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", plain)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", plain)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("make, match", [
    (lambda: jaxprune.nm_pruning(optax.sgd(1.0), 5, 4), r"`n` must be in \[1, m\]"),
    (lambda: jaxprune.nm_pruning(optax.sgd(1.0), 0, 4), r"`n` must be >= 1"),
    (lambda: jaxprune.nm_pruning(optax.sgd(1.0), 2, 4, prune_step=-1),
     r"`prune_step` must be >= 0"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), 1.0), r"`sparsity` must be in \[0, 1\)"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), -0.2), r"`sparsity` must be in \[0, 1\)"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, scope="net"), r"`scope` must be"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, structure=jaxprune.nm(2, 4),
                                        scope="global"), r"`scope='global'` needs"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), 0.9, structure=jaxprune.nm(2, 4)),
     r"`sparsity` = 0.9 contradicts `structure` = 2:4"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, structure="2:4"),
     r"`structure` must be"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, scope="global",
                                        select=jaxprune.select(distribution="erk")),
     r"`distribution` must be 'uniform'"),
])
def test_construction_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("tx, params, match", [
    (jaxprune.nm_pruning(optax.sgd(1.0), 2, 4), {"w": jnp.ones((6, 8))},
     r"every selected layer is skipped.*'w \(6, 8\): m=4 does not divide size 6 of axis 0'"),
    (jaxprune.nm_pruning(optax.sgd(1.0), 2, 4, select="w"), {"w": jnp.ones((6, 8))},
     r"w: size 6 of axis 0 \(shape \(6, 8\)\) is not divisible by m=4"),
    (jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, select="attention"),
     {"w": jnp.ones((4, 4))}, r"`include` regex 'attention' matches no leaf"),
    (jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, select="w|step"),
     {"w": jnp.ones((4, 4)), "step": jnp.ones((4, 4), jnp.int32)},
     r"integer leaves cannot be pruned: step"),
    (jaxprune.magnitude_pruning(optax.sgd(1.0), lambda t: 0.5,
                                select=jaxprune.select(distribution="erk")),
     {"w": jnp.ones((4, 4))}, r"ERK and per-parameter sparsity overrides need"),
])
def test_init_errors(tx, params, match):
  with pytest.raises(ValueError, match=match):
    tx.init(params)


def test_update_with_a_different_tree_is_an_error():
  tx = jaxprune.nm_pruning(optax.sgd(1.0), 2, 4)
  params = {"w": jnp.ones((8, 4))}
  state = tx.init(params)
  other = {"w": jnp.ones((8, 4)), "extra": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="`updates` does not have the tree structure"):
    tx.update(other, state, other)
  with pytest.raises(ValueError, match=r"`updates` leaf 'w' has shape \(4, 4\) where `init`"):
    tx.update({"w": jnp.ones((4, 4))}, state, {"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match="`update` needs `params`"):
    tx.update(params, state)


def test_exact_counts_on_many_layers():
  # Per-layer rounding is exact at the end of the schedule for awkward sizes.
  shapes = [(7, 3), (13, 11), (5, 5), (33, 2)]
  params = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), s)}
            for i, s in enumerate(shapes)}
  schedule = jaxprune.polynomial_schedule(0.1, 0.55, 0, 6, frequency=3)
  tx = jaxprune.magnitude_pruning(optax.sgd(1e-2), schedule, select=jaxprune.select(head=None))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(7):
    updates, state = update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  for i, s in enumerate(shapes):
    assert int((params[f"l{i}"]["kernel"] == 0).sum()) == round(0.55 * math.prod(s))


# ----------------------------------------------------------------------------
# Non-finite weights, out-of-range sparsity, changed shapes: counted or refused.


def one_step(tx, params, grads=None, state=None):
  state = tx.init(params) if state is None else state
  grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads
  updates, state = jax.jit(tx.update)(grads, state, params)
  return optax.apply_updates(params, updates), state


def test_magnitude_pruning_with_nan_and_inf_weights():
  w = jnp.arange(1.0, 17.0).reshape(4, 4).at[0, 1].set(jnp.nan).at[2, 3].set(-jnp.inf)
  params = {"w": w, "head": jnp.ones((4, 2))}
  new, state = one_step(jaxprune.magnitude_pruning(optax.sgd(0.0), 0.5), params)
  pruned = ~np.asarray(state.masks["w"])
  # Non-finite scores rank as the largest: the 8 smallest finite weights (1..9 without the
  # NaN's 2) are pruned, each to exactly +0.0; the NaN and -inf are kept as they are.
  np.testing.assert_array_equal(np.flatnonzero(pruned), [0, 2, 3, 4, 5, 6, 7, 8])
  assert (np.asarray(new["w"])[pruned] == 0).all() and not np.signbit(new["w"][pruned]).any()
  assert np.isnan(new["w"][0, 1]) and new["w"][2, 3] == -np.inf
  assert jaxprune.check(state, new).ok
  # A NaN that appears at a pruned entry cannot be landed on 0 (NaN + u is NaN): counted.
  bad = {"w": new["w"].at[0, 0].set(jnp.nan), "head": new["head"]}
  later, state = one_step(jaxprune.magnitude_pruning(optax.sgd(0.0), 0.5), bad, state=state)
  report = jaxprune.check(state, later)
  assert report.violations == 1 and report.nonfinite_pruned == 1
  assert "NaN or inf" in str(report)
  assert (np.asarray(later["w"])[pruned][1:] == 0).all()  # the finite ones still land on 0


def test_nm_pruning_with_infinite_groups():
  # Groups along axis 0 (the input axis); column 0 is [inf, inf, inf, 1].
  w = jnp.array([[jnp.inf, 1.0], [jnp.inf, 4.0], [jnp.inf, 2.0], [1.0, 3.0]])
  params = {"w": w, "head": jnp.ones((2, 2))}
  tx = jaxprune.nm_pruning(optax.sgd(0.0), 2, 4)
  new, state = one_step(tx, params)
  kept = np.asarray(state.masks["w"])
  np.testing.assert_array_equal(kept, [[True, False], [True, True], [False, False],
                                       [False, True]])
  # The pruned finite weights land on exactly 0; the pruned inf cannot (inf - inf is NaN).
  assert new["w"][3, 0] == 0 and new["w"][0, 1] == 0 and new["w"][2, 1] == 0
  assert np.isnan(new["w"][2, 0])
  report = jaxprune.check(state, new)
  assert report.nonfinite_pruned == 1 and report.pruned_nonzero == 1 and not report.ok
  _, state = one_step(tx, new, state=state)
  assert int(state.violations) == 1


def test_traced_sparsity_out_of_range_is_clipped_and_counted():
  params = {"a": {"kernel": jnp.arange(1.0, 17.0).reshape(4, 4)},
            "b": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2)}}
  select = jaxprune.select(head=None)
  values = {"1.0": 1.0, "nan": jnp.nan}  # 1.5 and -0.5 clip the same ways (see inject below)
  for name, value in values.items():
    def schedule(step, v=value):
      return jnp.where(step >= 0, jnp.float32(v), 0.0)  # traced inside update

    tx = jaxprune.magnitude_pruning(optax.sgd(0.0), schedule, select=select)
    new, state = one_step(tx, params)
    assert int(state.clipped) == 1, name
    zeros = [int((x == 0).sum()) for x in jax.tree.leaves(new)]
    # >= 1 keeps one weight per layer; NaN and negative values prune nothing.
    assert zeros == ([15, 7] if name in ("1.5", "1.0") else [0, 0]), name
    assert "clipped" in str(jaxprune.check(state))


def test_inject_hyperparams_sparsity_out_of_range_is_clipped():
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  tx = optax.inject_hyperparams(jaxprune.magnitude_pruning)(inner=optax.sgd(0.0), sparsity=0.5)
  state = tx.init(params)
  state.hyperparams["sparsity"] = jnp.asarray(1.5)
  new, state = one_step(tx, params, state=state)
  assert int(jaxprune.check(state).clipped_steps) == 1
  assert int((new["w"] == 0).sum()) == 15


def test_python_schedule_value_out_of_range_raises():
  tx = jaxprune.magnitude_pruning(optax.sgd(0.0), lambda step: 1.5)
  with pytest.raises(ValueError, match=r"returned 1.5.*`sparsity` must be in \[0, 1\)"):
    tx.init({"w": jnp.ones((4, 4))})


def test_unselected_leaf_that_changes_shape():
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones((8,))}
  tx = jaxprune.magnitude_pruning(optax.adam(1e-2), 0.5)
  state = tx.init(params)
  other = {"w": jnp.ones((8, 4)), "b": jnp.ones((1,))}
  with pytest.raises(ValueError, match=r"`params` leaf 'b' has shape \(1,\).*\(8,\)"):
    jax.jit(tx.update)(other, state, other)


@pytest.mark.parametrize("make, match", [
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), "0.5"), r"`sparsity` must be a number"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), None), r"`sparsity` must be a number"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), [0.5]), r"`sparsity` must be a number"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), np.array([0.5, 0.5])),
     r"`sparsity` must be a number"),
    (lambda: jaxprune.saliency_pruning(optax.sgd(1.0), True), r"`sparsity` must be a number"),
    (lambda: jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, select=123),
     r"`select` must be None, a jaxprune.select"),
    (lambda: jaxprune.select(123), r"`include` must be a regex"),
    (lambda: jaxprune.magnitude_pruning(optax.adam, 0.5), r"`inner`.*got the function.*call it"),
    (lambda: jaxprune.nm_pruning(optax.adamw), r"call it to build the optimizer, e.g. `adamw"),
    (lambda: jaxprune.random_pruning(42, 0.5), r"`inner` must be an optax.GradientTrans"),
])
def test_bad_input_names_the_parameter(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bool_leaf_named_bool():
  tx = jaxprune.magnitude_pruning(optax.sgd(1.0), 0.5, select="w|flag")
  with pytest.raises(ValueError, match="bool leaves cannot be pruned: flag"):
    tx.init({"w": jnp.ones((4, 4)), "flag": jnp.ones((4, 4), bool)})


def test_summary_axis_argument_checks_the_axis_pruned_along():
  params = {"a": jax.random.normal(jax.random.key(0), (4, 8)),
            "b": jax.random.normal(jax.random.key(1), (4, 8))}
  tx = jaxprune.nm_pruning(optax.sgd(0.0), 2, 4, axis=1, select=jaxprune.select(head=None))
  new, state = one_step(tx, params)
  assert jaxprune.sparsity_summary(new, nm=(2, 4), axis=1).nm_ok is True
  assert jaxprune.sparsity_summary(new, nm=(2, 4), opt_state=state).nm_ok is False  # axis 0


def test_global_normalized_scope_with_a_nan_layer():
  # One NaN in `a` must not make all of `a` rank above `b` (which would prune all of `b`).
  a = jnp.arange(1.0, 17.0).reshape(4, 4).at[0, 0].set(jnp.nan)
  b = jnp.arange(1.0, 17.0).reshape(4, 4)
  params = {"a": a, "b": b}
  tx = jaxprune.magnitude_pruning(optax.sgd(0.0), 0.5, scope="global", normalize=True,
                                  select=jaxprune.select(head=None))
  new, state = one_step(tx, params)
  # Finite norms: |a| = sqrt(1495) < |b| = sqrt(1496), so a's k scores just above b's k. The
  # 16 smallest are b's 1, then b's and a's 2..8, then b's 9: 9 from b, 7 from a, NaN kept.
  assert int((new["b"] == 0).sum()) == 9 and int((new["a"] == 0).sum()) == 7
  assert np.isnan(new["a"][0, 0])
  assert jaxprune.check(state, new).ok
