"""Demo: make a Flax NNX training loop 2:4-sparse by changing one line.

Trains a small MLP on a synthetic teacher-student regression task twice,
dense and with ``jaxprune.nm_pruning`` (2:4 along each kernel's input axis),
then prints the losses and the per-layer sparsity report. Runs in well under
a minute on a laptop CPU.

    python scripts/demo.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxprune


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, width: int = 256):
    self.inp = nnx.Linear(64, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, 16, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.norm(self.inp(x)))
    return self.out(jax.nn.gelu(self.hidden(x)))


def teacher_data(key, n: int):
  """Inputs drawn from ``key``; targets from one fixed random two-layer teacher."""
  k1, k2 = jax.random.split(jax.random.key(42))
  w1 = jax.random.normal(k1, (64, 128)) / 8.0
  w2 = jax.random.normal(k2, (128, 16)) / 11.3
  x = jax.random.normal(key, (n, 64))
  return x, jnp.tanh(x @ w1) @ w2


def train(tx: optax.GradientTransformation, steps: int, batch: int = 128):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x_train, y_train = teacher_data(jax.random.key(1), 8192)
  x_val, y_val = teacher_data(jax.random.key(2), 2048)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  start = time.perf_counter()
  for step in range(steps):
    i = (step * batch) % x_train.shape[0]
    train_step(model, optimizer, x_train[i:i + batch], y_train[i:i + batch])
  val_loss = float(jnp.mean((model(x_val) - y_val) ** 2))
  return model, val_loss, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()

  adamw = optax.adamw(3e-3, weight_decay=1e-4)
  _, dense_loss, dense_time = train(adamw, args.steps)
  # The one-line change: wrap the optimizer.
  model, sparse_loss, sparse_time = train(jaxprune.nm_pruning(adamw, n=2, m=4), args.steps)

  _, y_val = teacher_data(jax.random.key(2), 2048)
  print(f"predicting zero   validation MSE {float(jnp.mean(y_val**2)):.4f}")
  print(f"dense  AdamW      validation MSE {dense_loss:.4f}  ({dense_time:.1f} s)")
  print(f"2:4    nm_pruning validation MSE {sparse_loss:.4f}  ({sparse_time:.1f} s)\n")
  summary = jaxprune.sparsity_summary(nnx.state(model, nnx.Param), nm=(2, 4))
  print(summary.table())
  if not summary.nm_ok:
    raise SystemExit("2:4 invariant violated")


if __name__ == "__main__":
  main()
