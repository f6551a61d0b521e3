"""jaxprune.oneshot.prune: sequential calibration on NNX and linen models, selection, OWL, the
report, errors; keep_masks. Small models, a few calibration batches."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import oneshot_reference as ref
import optax
import pytest
from flax import nnx

import jaxprune
from jaxprune import oneshot, quant
from jaxprune.models import Transformer
from jaxprune.oneshot import finetune as finetune_lib

HIGHEST = jax.lax.Precision.HIGHEST


class MLP(nnx.Module):
  def __init__(self, rngs, sizes=(32, 32, 32, 32)):   # one kernel shape: one compilation
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:], strict=True)])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers):
        x = jax.nn.gelu(x)
    return x


class LinenMLP(nn.Module):
  sizes: tuple = (32, 32, 32)

  @nn.compact
  def __call__(self, x):
    for i, size in enumerate(self.sizes):
      x = nn.Dense(size, name=f"layers_{i}")(x)
      if i + 1 < len(self.sizes):
        x = jax.nn.gelu(x)
    return x


def _leaf(params, path):
  return dict(zip(jaxprune.leaf_paths(params), jax.tree.leaves(params), strict=True))[path]


def _batches(seed=0, n=3, shape=(4, 8, 32)):
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.2, 3.0, shape[-1]).astype(np.float32)
  return [rng.standard_normal(shape).astype(np.float32) * scale for _ in range(n)]


def _hessian(xs):
  x = jnp.concatenate([a.reshape(-1, a.shape[-1]) for a in xs]).astype(jnp.float32)
  return 2 * jnp.matmul(x.T, x, precision=HIGHEST)


def _manual_sequential(kernels, biases, batches, prune_layer):
  """The papers' procedure written out: each layer's inputs through the already-pruned ones."""
  xs, out = list(batches), []
  for i, (k, b) in enumerate(zip(kernels, biases, strict=True)):
    k = prune_layer(k, _hessian(xs))
    out.append(k)
    xs = [jnp.matmul(x, k, precision=HIGHEST) + b for x in xs]
    if i + 1 < len(kernels):
      xs = [jax.nn.gelu(x) for x in xs]
  return out


@pytest.mark.parametrize("kwargs,layer", [
    ({"method": "sparsegpt", "nm": (2, 4)},
     lambda k, h: oneshot.sparsegpt(k, h, nm=(2, 4)).kernel),
    ({"method": "wanda", "sparsity": 0.5},
     lambda k, h: oneshot.wanda(k, jnp.sqrt(jnp.diagonal(h) / 2), sparsity=0.5).kernel),
    ({"method": None, "quantize": "int4", "group_size": 8},
     lambda k, h: oneshot.gptq(k, h, "int4", group_size=8)),
])
def test_nnx_prune_is_sequential(kwargs, layer):
  model = MLP(nnx.Rngs(0))
  kernels = [lay.kernel[...] for lay in model.layers]
  biases = [lay.bias[...] for lay in model.layers]
  batches = _batches()
  want = _manual_sequential(kernels, biases, batches, layer)
  result = oneshot.prune(model, batches, select=r"kernel", **kwargs)
  for i, w in enumerate(want):
    got = model.layers[i].kernel[...]
    np.testing.assert_array_equal(got == 0, w == 0)
    np.testing.assert_allclose(got, w, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.params["layers"][i]["kernel"][...], got)
  assert [r.path for r in result.report.layers] == [f"layers/{i}/kernel" for i in range(3)]
  assert all(r.tokens == 3 * 4 * 8 for r in result.report.layers)


def test_wanda_on_a_model_matches_the_reference():
  """locuslab/wanda's layer wrapper and pruning rule, on the first layer's captured inputs."""
  model = MLP(nnx.Rngs(1))
  w = np.asarray(model.layers[0].kernel[...])
  batches = _batches(1)
  result = oneshot.prune(model, batches, method="wanda", sparsity=0.5, select="layers/0/kernel")
  pruned = ref.prune_wanda_layer(w.T, ref.wanda_scaler_row(batches), 0.5)
  np.testing.assert_array_equal(result.masks["layers/0/kernel"], ~pruned.T)


def test_hessian_is_the_reference_running_mean_times_samples():
  model = MLP(nnx.Rngs(2))
  batches = _batches(2)
  h_ref, nsamples = np.zeros((32, 32), np.float32), 0
  for b in batches:
    h_ref, nsamples = ref.add_batch(h_ref, nsamples, b)
  np.testing.assert_allclose(_hessian(batches), h_ref * nsamples, rtol=2e-5, atol=1e-3)
  # prune's error uses the same H: tr(dW^T H dW) / tr(W^T H W).
  w = model.layers[0].kernel[...]
  result = oneshot.prune(model, batches, method="magnitude", sparsity=0.5, select="layers/0/kernel")
  d = model.layers[0].kernel[...] - w
  h = h_ref * nsamples
  want = np.trace(d.T @ h @ d) / np.trace(w.T @ h @ w)
  assert result.report.layers[0].error == pytest.approx(float(want), rel=1e-4)


def test_linen_model_gives_the_nnx_result():
  nnx_model = MLP(nnx.Rngs(3))
  module = LinenMLP()
  variables = {"params": {f"layers_{i}": {"kernel": lay.kernel[...], "bias": lay.bias[...]}
                          for i, lay in enumerate(nnx_model.layers)}}
  batches = _batches(3)
  a = oneshot.prune(nnx_model, batches, method="sparsegpt", sparsity=0.5)
  b = oneshot.prune(module, batches, method="sparsegpt", sparsity=0.5, variables=variables)
  for i, lay in enumerate(nnx_model.layers):
    np.testing.assert_array_equal(b.params["params"][f"layers_{i}"]["kernel"], lay.kernel[...])
  # The default selection leaves the output head (layers_2) dense, in both APIs.
  assert [r.path for r in b.report.layers] == [f"params/layers_{i}/kernel" for i in range(2)]
  assert [r.path for r in a.report.layers] == [f"layers/{i}/kernel" for i in range(2)]
  assert a.report.layers[0].error == pytest.approx(b.report.layers[0].error, rel=1e-6)


def test_transformer_order_selection_and_summary():
  model = Transformer(vocab_size=64, context=8, width=16, depth=2, heads=2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 64, (4, 8)).astype(np.int32) for _ in range(2)]
  result = oneshot.prune(model, batches, method="sparsegpt", nm=(2, 4))
  names = ["attention/query", "attention/key", "attention/value", "attention/output", "mlp/up",
           "mlp/down"]
  assert [r.path for r in result.report.layers] == [
      f"layers/{i}/{n}/kernel" for i in range(2) for n in names]
  # Query, key and value read one input: one Hessian (one stage) for the three.
  rows = result.report.layers
  assert rows[0].calibration_seconds == rows[1].calibration_seconds == rows[2].calibration_seconds
  assert rows[3].calibration_seconds != rows[2].calibration_seconds
  summary = jaxprune.sparsity_summary(nnx.state(model, nnx.Param), nm=(2, 4))
  assert summary.nm_ok and summary.prunable_sparsity == 0.5
  assert set(result.masks) == {r.path for r in rows}
  # The pruning transforms accept the params, and keep_masks holds the one-shot masks.
  tx = finetune_lib.keep_masks(optax.adam(1e-2), result.masks)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  assert jaxprune.sparsity_summary(params, nm=(2, 4)).nm_ok
  kernel = params["layers"][0]["mlp"]["up"]["kernel"][...]
  np.testing.assert_array_equal(kernel != 0, result.masks["layers/0/mlp/up/kernel"])


def test_select_and_distribution_as_the_transforms():
  model = Transformer(vocab_size=64, context=8, width=16, depth=1, heads=2, rngs=nnx.Rngs(1))
  batches = [np.random.default_rng(1).integers(0, 64, (4, 8)).astype(np.int32)]
  params = nnx.state(model, nnx.Param)
  select = jaxprune.select(r"(mlp/(up|down)|attention/value)/kernel", distribution="erk",
                           overrides={"value": {"sparsity": 0.25}})
  specs = {s.path: s.sparsity for s in jaxprune.resolve(select, params, 0.6) if s is not None}
  result = oneshot.prune(model, batches, method="magnitude", sparsity=0.6, select=select)
  assert {r.path for r in result.report.layers} == set(specs)
  for r in result.report.layers:
    kernel = np.asarray(_leaf(nnx.state(model, nnx.Param), r.path))
    assert np.sum(kernel == 0) == round(specs[r.path] * kernel.size), r.path
  # The same selection in magnitude_pruning picks the same leaves.
  tx = jaxprune.magnitude_pruning(optax.sgd(0.1), 0.6, select=select)
  masks = tx.init(params).masks
  picked = {p for p, m in zip(jaxprune.leaf_paths(params), jax.tree.leaves(masks), strict=True)
            if np.ndim(m)}
  assert picked == set(specs)


@pytest.mark.slow
def test_owl_on_a_model_matches_the_reference():
  """Per-block sparsities from the outlier ratios of the unpruned model's Wanda scores, as
  luuyin/OWL computes them (check_outlier_mean over a block's layers, then the adjustment)."""
  model = Transformer(vocab_size=64, context=8, width=16, depth=2, heads=2, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(2)
  batches = [rng.integers(0, 64, (4, 8)).astype(np.int32) for _ in range(2)]
  names = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_modules(model)}
  inputs = {}
  with oneshot.layers.intercept(
      lambda m, call: inputs.setdefault(names[id(m)], []).append(np.asarray(call.inputs))):
    for b in batches:
      model(b)
  ratios = []
  for i in range(2):
    metric = []
    for name in ("attention/query", "attention/key", "attention/value", "attention/output",
                 "mlp/up", "mlp/down"):
      path = f"layers/{i}/{name}"
      w = np.asarray(_leaf(nnx.state(model, nnx.Param), path + "/kernel"))
      scaler_row = ref.wanda_scaler_row(inputs[path])
      metric.append((np.abs(w.T) * np.sqrt(scaler_row)[None]).ravel())
    ratios.append(ref.check_outlier_mean(np.concatenate(metric), 5.0))
  want = ref.owl_layer_sparsities(ratios, 0.6, 0.1)
  result = oneshot.prune(model, batches, method="wanda", sparsity=0.6, distribution="owl",
                         owl_lambda=0.1)
  for r in result.report.layers:
    block = int(r.path.split("/")[1])
    assert r.target == f"wanda {want[block]:.1%}", r.path
    k = r.shape[0]   # Wanda prunes round(s * in) of every output column.
    assert r.sparsity == pytest.approx(round(want[block] * k) / k)
  assert np.argmin(want) == np.argmax(ratios)


def test_einsum_and_linear_general_layers():
  class Heads(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Einsum("btd,dhk->bthk", (16, 2, 8), rngs=rngs)
      self.per_head = nnx.Einsum("bthk,hkj->bthj", (2, 8, 4), rngs=rngs)
      self.out = nnx.LinearGeneral((2, 4), 16, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
      return self.out(self.per_head(jax.nn.relu(self.proj(x))))

  model = Heads(nnx.Rngs(4))
  batches = _batches(4, n=2, shape=(4, 8, 16))   # (the layers' own shapes)
  k_proj, k_head = model.proj.kernel[...], model.per_head.kernel[...]
  result = oneshot.prune(model, batches, method="sparsegpt", sparsity=0.5, select="kernel")
  # proj: in = d (16), out = h*k; one Hessian of the inputs.
  want = oneshot.sparsegpt(k_proj.reshape(16, 16), _hessian(batches), sparsity=0.5).kernel
  np.testing.assert_allclose(model.proj.kernel[...].reshape(16, 16), want, rtol=0, atol=1e-5)
  # per_head: a batch axis h: one Hessian per head, of that head's inputs.
  hidden = [jax.nn.relu(jnp.einsum("btd,dhk->bthk", x, model.proj.kernel[...],
                                   precision=HIGHEST)) for x in batches]   # (no bias)
  for h in range(2):
    want = oneshot.sparsegpt(k_head[h], _hessian([x[:, :, h] for x in hidden]),
                             sparsity=0.5).kernel
    np.testing.assert_allclose(model.per_head.kernel[...][h], want, rtol=0, atol=1e-5)
  assert [r.path for r in result.report.layers] == ["proj/kernel", "per_head/kernel",
                                                    "out/kernel"]
  assert np.mean(np.asarray(model.out.kernel[...]) == 0) == 0.5


@pytest.mark.slow
def test_quantized_model_is_exactly_representable():
  model = MLP(nnx.Rngs(5))
  batches = _batches(5)
  head = model.layers[-1].kernel[...]
  oneshot.prune(model, batches, method=None, quantize="mxfp4_e2m1")
  for lay in model.layers[:-1]:
    k = lay.kernel[...]
    np.testing.assert_array_equal(quant.quantize(k, "mxfp4_e2m1", axis=0), k)
  np.testing.assert_array_equal(model.layers[-1].kernel[...], head)   # the head stays as it is
  model = MLP(nnx.Rngs(5))
  result = oneshot.prune(model, batches, method="sparsegpt", nm=(2, 4), quantize="int4")
  for lay in model.layers[:-1]:
    k = lay.kernel[...]
    np.testing.assert_array_equal(quant.quantize(k, "int4", axis=0, granularity="channel"), k)
  assert jaxprune.sparsity_summary(result.params, nm=(2, 4)).nm_ok


def test_few_tokens_warn_rank_deficient_with_the_damping():
  model = MLP(nnx.Rngs(6))
  batches = [np.random.default_rng(6).standard_normal((1, 4, 32)).astype(np.float32)]
  with pytest.warns(oneshot.CalibrationWarning, match=r"4 calibration tokens for 32 inputs.*"
                    r"rank-deficient.*lambda = damp \* mean\(diag H\) = 0.01"):
    result = oneshot.prune(model, batches, method="sparsegpt", sparsity=0.5)
  assert all(np.isfinite(np.asarray(lay.kernel[...])).all() for lay in model.layers)
  assert result.report.layers[0].tokens == 4
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    oneshot.prune(MLP(nnx.Rngs(6)), _batches(), method="magnitude", sparsity=0.5)


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "magnitude", "sparsity": 0.5, "select": "nothing_matches"},
     "`include` regex 'nothing_matches' matches no leaf"),
    ({"method": "magnitude", "sparsity": 0.5, "select": jaxprune.select(prune_embeddings=True)},
     r"\['embed/embedding'.*not the kernel"),
    ({"method": "sparsegpt"}, "needs `sparsity`"),
    ({"method": "sparsegpt", "sparsity": 1.2}, r"`sparsity` must be in \[0, 1\)"),
    ({"method": "sparsegpt", "sparsity": 0.5, "nm": (2, 4)}, "either `sparsity` or `nm`"),
    ({"method": "obs", "sparsity": 0.5}, "`method` must be one of"),
    ({"method": None}, "nothing to do"),
    ({"method": "wanda", "sparsity": 0.5, "quantize": "int4"}, "GPTQ would refill"),
    ({"method": "sparsegpt", "nm": (2, 4), "distribution": "owl"}, "distribution='owl'"),
    ({"method": "sparsegpt", "sparsity": 0.5, "damp": 0}, "`damp` must be"),
    ({"method": "sparsegpt", "nm": (2, 4), "blocksize": 6}, "`blocksize` = 6 must be a multiple"),
    ({"method": "sparsegpt", "nm": (2, 4), "select": jaxprune.select(
        overrides={"mlp/up": {"axis": 1}})}, "N:M axis 1 .* is not an input"),
    ({"method": "wanda", "sparsity": 0.5, "variables": {}}, "`variables` is for linen"),
    ({"method": "sparsegpt", "sparsity": 0.5, "batches": None}, "needs calibration `batches`"),
])
def test_bad_input(kwargs, match):
  model = Transformer(vocab_size=64, context=8, width=16, depth=1, heads=2, rngs=nnx.Rngs(0))
  batches = kwargs.pop("batches", [np.zeros((4, 8), np.int32)])
  with pytest.raises(ValueError, match=match):
    oneshot.prune(model, batches, **kwargs)


def test_keep_masks_errors():
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"names \['v'\]"):
    finetune_lib.keep_masks(optax.sgd(1.0), {"v": jnp.ones((4, 4), bool)}).init(params)
  with pytest.raises(ValueError, match="has shape"):
    finetune_lib.keep_masks(optax.sgd(1.0), {"w": jnp.ones((4,), bool)}).init(params)
