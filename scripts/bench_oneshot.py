r"""Speed of the one-shot layer methods against the input dimension (a square (in, in) kernel).

    python scripts/bench_oneshot.py                      # in = 256, 1024, 4096
    python scripts/bench_oneshot.py --sizes 256,1024 --repeats 5

For each size: SparseGPT at 50% and 2:4, GPTQ int4 (per channel) and MXFP4, Wanda at 50%, on
a random kernel and the Hessian of 2 * in random correlated tokens. Prints the backend and
device, the compile time (first call) and the medians of ``--repeats`` timed calls (seconds,
``block_until_ready``): wall time, and process CPU time (all threads; steadier than wall
time on a shared machine). SparseGPT and GPTQ do ``O(in^2 out)`` work in a sequential loop over
the ``in`` rows, so time grows about cubically with ``in`` for square kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import oneshot


def _problem(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * n, n), dtype=np.float32)
  x = x @ (rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n))
  h = jnp.asarray(2 * x.T @ x)
  return jnp.asarray(rng.standard_normal((n, n), dtype=np.float32)), h


def _time(fn, repeats: int) -> tuple[float, float, float]:
  """First call (compiles), then the medians of wall and process CPU time of timed calls."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return first, statistics.median(wall), statistics.median(cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="256,1024,4096", help="Comma-separated input sizes.")
  parser.add_argument("--repeats", type=int, default=3, help="Timed calls after the first.")
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"backend {jax.default_backend()}, device {device.device_kind} "
        f"({jax.device_count()} device(s)), jax {jax.__version__}")
  print(f"{'in = out':>8}  {'method':<18} {'first call s':>12} {'median s':>10} {'cpu s':>8}")
  for n in (int(s) for s in args.sizes.split(",")):
    w, h = _problem(n)
    norm = jnp.sqrt(jnp.diagonal(h) / 2)
    methods = {
        "sparsegpt 50%": lambda w=w, h=h: oneshot.sparsegpt(w, h, sparsity=0.5).kernel,
        "sparsegpt 2:4": lambda w=w, h=h: oneshot.sparsegpt(w, h, nm=(2, 4)).kernel,
        "gptq int4": lambda w=w, h=h: oneshot.gptq(w, h, "int4"),
        "gptq mxfp4": lambda w=w, h=h: oneshot.gptq(w, h, "mxfp4_e2m1"),
        "wanda 50%": lambda w=w, n=norm: oneshot.wanda(w, n, sparsity=0.5).kernel,
    }
    for name, fn in methods.items():
      first, median, cpu = _time(fn, args.repeats)
      print(f"{n:>8}  {name:<18} {first:>12.3f} {median:>10.4f} {cpu:>8.4f}", flush=True)


if __name__ == "__main__":
  main()
