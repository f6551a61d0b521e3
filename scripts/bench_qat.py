"""The cost of quantization-aware training's optimizer update against the inner optimizer's.

Times the jitted ``tx.update`` alone (no forward or backward pass) of
``jaxprune.quantization(optax.adamw(1e-3), fmt, nm=...)`` and of
``optax.adamw(1e-3)`` on the same params (two kernels, 0.93M weights), and
prints the median times and their ratio, with the backend and device named.

    python scripts/bench_qat.py                  # int4 + 2:4, axis -1 and 0
    python scripts/bench_qat.py --fmt mxfp4_e2m1 --nm 0 0 --rounds 11
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jaxprune

SHAPES = {"dense_1": (784, 1024), "dense_2": (1024, 128)}


def _median_ms(fn, args, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _params(dtype):
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {name: {"kernel": (0.05 * jax.random.normal(k, shape)).astype(dtype)}
          for (name, shape), k in zip(SHAPES.items(), keys, strict=True)}


def compiled_update(tx, params):
  """``(jitted tx.update, its arguments)``, compiled and run once."""
  view = getattr(tx, "view", None)
  params = view(params) if view is not None else params
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 1e-2 * jnp.ones_like(p), params)
  update = jax.jit(tx.update)
  jax.block_until_ready(update(grads, state, params))
  return update, (grads, state, params)


def interleaved_ms(updates, rounds: int, repeats: int) -> list[tuple[float, list[float]]]:
  """Per update, the median over rounds of its median time in a round (ms), and the per-round
  medians; the updates alternate within each round, so that a noisy machine slows all alike."""
  per_round = [[] for _ in updates]
  for _ in range(rounds):
    for times, (fn, args) in zip(per_round, updates, strict=True):
      times.append(_median_ms(fn, args, repeats))
  return [(statistics.median(t), t) for t in per_round]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fmt", default="int4")
  parser.add_argument("--nm", type=int, nargs=2, default=(2, 4), help="n m; 0 0 for none")
  parser.add_argument("--axes", type=int, nargs="+", default=(-1, 0))
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--repeats", type=int, default=15, help="updates timed per round")
  args = parser.parse_args()
  nm = tuple(args.nm) if args.nm[0] else None
  params = _params(jnp.dtype(args.dtype))
  size = sum(p.size for p in jax.tree.leaves(params))
  device = jax.devices()[0]
  print(f"backend {jax.default_backend()}, device {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}; {size:,} {args.dtype} weights in {len(SHAPES)} kernels; "
        f"median over {args.rounds} rounds of the median of {args.repeats} updates")
  names = ["adamw"] + [f"quantization({args.fmt!r}, nm={nm}, axis={axis})" for axis in args.axes]
  txs = [optax.adamw(1e-3)] + [jaxprune.quantization(optax.adamw(1e-3), args.fmt, nm=nm,
                                                     axis=axis) for axis in args.axes]
  results = interleaved_ms([compiled_update(tx, params) for tx in txs], args.rounds,
                           args.repeats)
  base, base_rounds = results[0]
  for name, (ms, rounds) in zip(names, results, strict=True):
    ratio = statistics.median(r / b for r, b in zip(rounds, base_rounds, strict=True))
    print(f"  {name:48s} update {ms:8.3f} ms   ratio to adamw {ratio:5.2f}x")

if __name__ == "__main__":
  main()
