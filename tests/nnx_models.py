"""Small Flax NNX models and an MSE train step shared by the transforms' NNX tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Net(nnx.Module):
  """Linear -> LayerNorm -> ReLU -> Linear: two kernels, plus biases and a norm scale that a
  default selection must leave alone (as it leaves ``b``, the output head, dense)."""

  def __init__(self, rngs: nnx.Rngs, din: int = 8, hidden: int = 16, dout: int = 4):
    self.a = nnx.Linear(din, hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.b = nnx.Linear(hidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.b(jax.nn.relu(self.norm(self.a(x))))


def mse_step(x: jax.Array, y: jax.Array):
  """A jitted ``(model, optimizer) -> loss`` step of ``nnx.Optimizer`` on the MSE to ``y``."""

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  return step
