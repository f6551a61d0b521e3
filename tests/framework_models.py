"""Tiny models of every framework jaxprune wraps, each with a loss: the drop-in tests' fixtures.

Each ``build_*`` returns a :class:`Case`: the trainable params as a pytree,
``loss(params) -> scalar`` on a fixed batch, ``put(params)`` back into the
framework's model where it has one, and the expected grouping axis and
selection of every kernel, written out by hand from the framework's layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

try:
  import equinox as eqx
except ImportError:  # pragma: no cover - equinox is in the test extra.
  eqx = None

BATCH = 4


class Case(NamedTuple):
  """A model as a params pytree and a loss; ``axes``: path -> axis of each pruned kernel.

  ``dense``: kernels the default selection must leave alone (head, a conv that
  2:4 cannot tile). ``skipped_nm``: the layers skipped for m = 4.
  """

  name: str
  params: Any
  loss: Callable[[Any], jax.Array]
  axes: dict[str, int]
  dense: frozenset[str]
  skipped_nm: frozenset[str] = frozenset()


def _images(channels=1, size=6):
  x = jax.random.normal(jax.random.key(1), (BATCH, size, size, channels))
  y = jax.random.randint(jax.random.key(2), (BATCH,), 0, 3)
  return x, y


def _xent(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))         # Conv_0: (3, 3, 1, 8), I = 1: not tileable.
    x = nn.relu(nn.Conv(8, (3, 3))(x))         # Conv_1: (3, 3, 8, 8)
    x = x.mean((1, 2))
    x = nn.relu(nn.Dense(8)(x))                # Dense_0: (8, 8)
    return nn.Dense(3)(x)                      # Dense_1: (8, 3), the head


def linen_cnn() -> Case:
  x, y = _images()
  model = LinenCNN()
  params = model.init(jax.random.key(0), x)["params"]
  return Case("linen_cnn", params, lambda p: _xent(model.apply({"params": p}, x), y),
              {"Conv_1/kernel": 2, "Dense_0/kernel": 0},
              frozenset({"Conv_0/kernel", "Dense_1/kernel"}), frozenset({"Conv_0/kernel"}))


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
    self.linear1 = nnx.Linear(8, 8, rngs=rngs)
    self.linear2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x)))).mean((1, 2))
    return self.linear2(nnx.relu(self.linear1(x)))


def _nnx_case(name, model, loss_of_model, axes, dense, skipped=frozenset()) -> Case:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    return loss_of_model(nnx.merge(graphdef, p, rest))

  return Case(name, params, loss, axes, frozenset(dense), frozenset(skipped))


def nnx_cnn() -> Case:
  x, y = _images()
  return _nnx_case("nnx_cnn", NnxCNN(nnx.Rngs(0)), lambda m: _xent(m(x), y),
                   {"conv2/kernel": 2, "linear1/kernel": 0}, {"conv1/kernel", "linear2/kernel"},
                   {"conv1/kernel"})


class NnxAttention(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                       rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.attn(x).mean(1))


def nnx_attention() -> Case:
  x = jax.random.normal(jax.random.key(1), (BATCH, 4, 8))
  y = jax.random.randint(jax.random.key(2), (BATCH,), 0, 3)
  axes = {f"attn/{n}/kernel": 0 for n in ("query", "key", "value")}
  axes["attn/out/kernel"] = 1  # (heads, head_dim, out): along head_dim.
  return _nnx_case("nnx_attention", NnxAttention(nnx.Rngs(0)), lambda m: _xent(m(x), y), axes,
                   {"head/kernel"})


class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
    x = nn.DenseGeneral((2, 4))(x)             # (8, 2, 4) with bias (2, 4): in-first.
    return nn.Dense(3)(x.reshape(x.shape[0], x.shape[1], -1).mean(1))


def linen_attention() -> Case:
  x = jax.random.normal(jax.random.key(1), (BATCH, 4, 8))
  y = jax.random.randint(jax.random.key(2), (BATCH,), 0, 3)
  model = LinenAttention()
  params = model.init(jax.random.key(0), x)["params"]
  attn = "MultiHeadDotProductAttention_0"
  axes = {f"{attn}/{n}/kernel": 0 for n in ("query", "key", "value")}
  axes[f"{attn}/out/kernel"] = 1
  axes["DenseGeneral_0/kernel"] = 0
  return Case("linen_attention", params, lambda p: _xent(model.apply({"params": p}, x), y),
              axes, frozenset({"Dense_0/kernel"}))


def _eqx_case(name, model, loss_of_model, axes, dense, skipped=frozenset()) -> Case:
  params, static = eqx.partition(model, eqx.is_array)

  def loss(p):
    return loss_of_model(eqx.combine(p, static))

  return Case(name, params, loss, axes, frozenset(dense), frozenset(skipped))


if eqx is not None:

  class EqxCNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear

    def __init__(self, key):
      k = jax.random.split(key, 4)
      self.conv1 = eqx.nn.Conv2d(1, 8, 3, key=k[0])      # (8, 1, 3, 3): in = 1, not tileable
      self.conv2 = eqx.nn.Conv2d(8, 8, 3, key=k[1])      # (8, 8, 3, 3), bias (8, 1, 1)
      self.linear1 = eqx.nn.Linear(8, 8, key=k[2])       # (out, in)
      self.linear2 = eqx.nn.Linear(8, 3, key=k[3])       # the head

    def __call__(self, x):  # x: (1, H, W), one example
      x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x)))).mean((1, 2))
      return self.linear2(jax.nn.relu(self.linear1(x)))


def eqx_cnn() -> Case:
  x, y = _images()
  x = jnp.moveaxis(x, -1, 1)
  return _eqx_case("eqx_cnn", EqxCNN(jax.random.key(0)),
                   lambda m: _xent(jax.vmap(m)(x), y),
                   {"conv2/weight": 1, "linear1/weight": 1}, {"conv1/weight", "linear2/weight"},
                   {"conv1/weight"})


def eqx_mlp() -> Case:
  x = jax.random.normal(jax.random.key(1), (BATCH, 8))
  y = jax.random.randint(jax.random.key(2), (BATCH,), 0, 3)
  model = eqx.nn.MLP(8, 3, 8, 3, key=jax.random.key(0))   # layers/0..3, the last is the head
  return _eqx_case("eqx_mlp", model, lambda m: _xent(jax.vmap(m)(x), y),
                   {f"layers/{i}/weight": 1 for i in range(3)}, {"layers/3/weight"})


ALL = (linen_cnn, nnx_cnn, nnx_attention, linen_attention, eqx_cnn, eqx_mlp)
