"""Benchmarks: mask cost in elementwise passes, and train-step overhead of the wrappers.

Run: ``python scripts/bench.py`` (add ``--quick`` for a smoke run). Prints

1. mask times as multiples of one jitted elementwise pass ``jnp.abs(x) * 2``
   over the same tensors (2:4 on a 4096x4096 matrix; 80% unstructured and
   global over four 1024x1024 tensors; a full sort, what sort-based pruners
   pay, for reference);
2. the mean train-step time of each wrapper vs plain ``optax.adam`` on a
   stack of four 1024x1024 Dense layers (batch 64, 200 steps, mask updates
   every 10 steps towards 80% sparsity);
3. tokens/s of every recipe's train step at its default size (the byte-level
   transformer of ``recipes/``) relative to the dense recipe, in the method's
   sparse phase: GMP inside its ramp (masks every 10 steps), ASP after its
   one-shot mask, STEP after its switch, SET and RigL with connectivity
   updates every 10 steps (the recipes: every 50). Run from the repository root;
4. the optimizer update alone of quantization-aware training (``jaxprune.quantization``
   around ``optax.adamw``) as a multiple of ``adamw``'s update on the same two kernels
   (0.93M weights; see ``scripts/bench_qat.py``), for int4 + 2:4 and the other format
   families.
"""

from __future__ import annotations

import argparse
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxprune
from jaxprune import select_k, train


def device_line() -> str:
  """Backend, device and versions, printed with every table."""
  d = jax.devices()[0]
  return (f"{jax.default_backend()} / {d.platform} ({d.device_kind}) x{jax.local_device_count()}, "
          f"jax {jax.__version__}")


STATISTIC = "median"  # or "min" (--min): the least disturbed run, on a shared machine.


def median_time(fn, *args, repeats: int = 20, budget_s: float = 5.0) -> float:
  """Median (or, with ``--min``, minimum) wall time of ``fn(*args)`` over ``repeats`` runs.

  Compiled first. Stops early, after at least 3 runs, once ``budget_s``
  seconds are spent (a sort on a CPU takes seconds).
  """
  jax.block_until_ready(fn(*args))
  times = []
  spent = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
    spent += times[-1]
    if len(times) >= 3 and spent > budget_s:
      break
  return min(times) if STATISTIC == "min" else sorted(times)[len(times) // 2]


_NOT_KERNELS = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all",
                "partition-id", "replica-id"}


def kernel_count(jitted, *args) -> int:
  """About how many kernels one call launches: the instructions of the compiled entry
  computation, less the free ones, looking into calls (GPU command buffers) and the
  largest branch of a conditional."""
  computations, name = {}, None
  for line in jitted.lower(*args).compile().as_text().splitlines():
    head = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head and "=" not in line.split("{")[0]:
      name = "ENTRY" if head.group(1) else head.group(2)
      computations[name] = []
    elif name and re.match(r"\s+(ROOT )?%?[\w.\-]+ = ", line):
      computations[name].append(line)

  def count(comp: str) -> int:
    total = 0
    for line in computations.get(comp, []):
      op = re.search(r"= (?:\([^=]*\)|\S+) ([\w\-]+)\(", line)
      op = op.group(1) if op else ""
      callees = re.findall(r"(?:to_apply|branch_computations|body|true_computation|"
                           r"false_computation)=\{?%?([\w.\-, %]+)\}?", line)
      names = [c.strip(" %") for group in callees for c in group.split(",")]
      if op in ("call", "while", "conditional"):
        total += (op != "call") + max((count(c) for c in names), default=0)
      elif op not in _NOT_KERNELS:
        total += 1
    return total
  return count("ENTRY")


def bench_masks(repeats: int, methods: list[str]) -> None:
  print(f"\n== masks on {device_line()}")
  print(f"   {STATISTIC} time, and in elementwise passes (jnp.abs(x) * 2) over the same tensors")
  x = jax.random.normal(jax.random.key(0), (4096, 4096))
  one_pass = median_time(jax.jit(lambda x: jnp.abs(x) * 2), x, repeats=repeats)
  nm = median_time(jax.jit(lambda x: jaxprune.nm_mask(jnp.abs(x), 2, 4, axis=0)), x,
                   repeats=repeats)
  print(f"elementwise pass 4096x4096       {one_pass * 1e3:9.2f} ms")
  print(f"nm_mask 2:4 axis 0 4096x4096     {nm * 1e3:9.2f} ms  = {nm / one_pass:6.2f} passes")

  xs = [jax.random.normal(jax.random.key(i), (1024, 1024)) for i in range(4)]
  ties = [jnp.round(x * 2) for x in xs]  # ~10 distinct scores: many exact ties at the threshold
  one_pass = median_time(jax.jit(lambda xs: [jnp.abs(x) * 2 for x in xs]), xs, repeats=repeats)
  print(f"elementwise pass 4 x 1024x1024   {one_pass * 1e3:9.2f} ms")
  print("unstructured 80% of 4 x 1024x1024, one row per exact method (all give the same masks):")
  print(f"{'method':<22}{'per layer':>22}{'global':>22}{'per layer, tied':>22}"
        f"{'kernels (layer, global)':>26}")

  def cell(seconds):
    return f"{seconds * 1e3:9.2f} ms {seconds / one_pass:6.2f} p"

  default = select_k.default_method()
  for method in [*methods, None]:
    name = f"default = {default}" if method is None else method
    layer = jax.jit(lambda xs, m=method: [
        jaxprune.magnitude_mask(jnp.abs(x), 0.8, method=m) for x in xs])
    glob = jax.jit(lambda xs, m=method: jaxprune.global_magnitude_masks(
        [jnp.abs(x) for x in xs], 0.8, method=m))
    times = [median_time(f, a, repeats=repeats) for f, a in
             [(layer, xs), (glob, xs), (layer, ties)]]
    kernels = f"~{kernel_count(layer, xs)}, ~{kernel_count(glob, xs)}"
    print(f"{name:<22}" + "".join(f"{cell(t):>22}" for t in times) + f"{kernels:>26}")
  full_sort = median_time(jax.jit(lambda xs: [jnp.argsort(jnp.abs(x).ravel()) for x in xs]), xs,
                          repeats=max(3, repeats // 4))
  print(f"{'full argsort (ref.)':<22}{cell(full_sort):>22}")
  bench_mask_components(xs, repeats, cell)


def bench_mask_components(xs, repeats: int, cell) -> None:
  """The building blocks of the methods, on the same four tensors, to explain their rows."""
  print("building blocks (each on all four tensors):")
  keys = lambda xs: [select_k.compare_key(jnp.abs(x)) for x in xs]  # noqa: E731
  scores = lambda xs: [jnp.abs(x) for x in xs]  # noqa: E731
  pivots = jnp.sort(select_k.compare_key(xs[0].reshape(-1)[:15]))
  rank = jnp.int32(int(0.8 * xs[0].size))
  parts = {
      "count 15 pivots <, <=": lambda xs: [
          select_k._count_below([s], pivots, inclusive=True) for s in scores(xs)],
      "scatter 65536 bins": lambda xs: [
          select_k._histogram((select_k._radix_key(s) >> 16).astype(jnp.int32))
          for s in scores(xs)],
      "sample + 15 pivots": lambda xs: [select_k.sample_pivots([s], rank) for s in scores(xs)],
      "tie blocks + cut": lambda xs: select_k._tie_cuts(keys(xs), pivots[7], rank, rank + 9, None),
      "mask pass (key, t, cut)": lambda xs: [(k > pivots[7]) | (k == pivots[7]) for k in keys(xs)],
  }
  for name, fn in parts.items():
    print(f"  {name:<20}{cell(median_time(jax.jit(fn), xs, repeats=repeats)):>22}")


def dense_stack(key, width: int, depth: int):
  keys = jax.random.split(key, depth)
  return {f"dense_{i}": {"kernel": jax.random.normal(k, (width, width)) / width**0.5,
                         "bias": jnp.zeros(width)} for i, k in enumerate(keys)}


def loss_fn(params, x, y):
  for i in range(len(params)):
    layer = params[f"dense_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return jnp.mean((x - y) ** 2)


def time_training(tx, steps: int, width: int = 1024, depth: int = 4, batch: int = 64) -> float:
  """Mean seconds per step of ``steps`` jitted steps (compilation excluded)."""
  params = dense_stack(jax.random.key(0), width, depth)
  x = jax.random.normal(jax.random.key(1), (batch, width))
  y = jax.random.normal(jax.random.key(2), (batch, width))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # Compile and warm up on a copy of the state, so the timed run starts at step 0.
  jax.block_until_ready(step(params, state))
  start = time.perf_counter()
  for _ in range(steps):
    params, state = step(params, state)
  jax.block_until_ready(params)
  return (time.perf_counter() - start) / steps


def wrappers(steps: int):
  adam = optax.adam(1e-4)
  gmp = jaxprune.polynomial_schedule(0.0, 0.8, 0, steps, frequency=10)
  return {
      "magnitude_pruning (GMP to 80%)": jaxprune.magnitude_pruning(adam, gmp),
      "magnitude_pruning global": jaxprune.magnitude_pruning(adam, gmp, scope="global"),
      "saliency_pruning (to 80%)": jaxprune.saliency_pruning(adam, gmp),
      "random_pruning static 80%": jaxprune.random_pruning(adam, 0.8),
      "set_pruning 80% (every 10)": jaxprune.set_pruning(adam, 0.8, update_every=10,
                                                         end_step=steps),
      "rigl 80% (every 10)": jaxprune.rigl(adam, 0.8, update_every=10, end_step=steps),
      "nm_pruning 2:4": jaxprune.nm_pruning(adam, 2, 4),
      "sr_ste 2:4": jaxprune.sr_ste(adam, 2, 4),
      "gradient_flow 1:8 (MDGF)": jaxprune.gradient_flow(adam, 1, 8, total_steps=steps,
                                                         coef=0.05),
      # STEP is a whole optimizer; it switches to its N:M phase after step 10.
      "step_adam 2:4 (vs adam)": jaxprune.step_adam(1e-4, 2, 4, t_min=5, t_max=10),
      "quantization int4 + 2:4 (QAT)": jaxprune.quantization(adam, "int4", nm=(2, 4)),
  }


def bench_training(steps: int, rounds: int) -> None:
  print(f"\n== train step on {device_line()}")
  print(f"   4 x Dense(1024), batch 64, {steps} steps (mean per step)")
  plain = optax.adam(1e-4)
  for name, tx in wrappers(steps).items():
    # Alternate plain and wrapped runs so that machine noise hits both alike.
    ratios = []
    for _ in range(rounds):
      base = time_training(plain, steps)
      wrapped = time_training(tx, steps)
      ratios.append(wrapped / base)
    ratio = sorted(ratios)[len(ratios) // 2]
    print(f"{name:<32} adam {base * 1e3:7.2f} ms  wrapped {wrapped * 1e3:7.2f} ms  "
          f"ratio {ratio:5.3f} (median of {rounds})")


def recipe_steps_per_s(name: str, steps: int) -> float:
  """Train steps per second of a recipe at default size, in its sparse phase."""
  config = train.load_recipe(name)
  config.prune.begin_fraction = 0.0      # GMP: inside the ramp from the first step.
  config.one_shot_fraction = 0.0         # ASP: masked from the first step.
  config.step_t_max_fraction = 0.0       # STEP: switch forced after step 1.
  config.dst.update_every = 10           # SET/RigL: 5x the recipes' rate of connectivity updates.
  config.dst.end_fraction = 1.0
  graphdef, params = nnx.split(train.make_model(config), nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = train.make_optimizer(config)
  state = tx.init(params)
  batch = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (config.batch_size, config.model.context + 1)), jnp.int32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(train.loss_fn, argnums=1)(graphdef, params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):                       # Compile, then pass STEP's switch.
    params, state = step(params, state)
  jax.block_until_ready(params)
  start = time.perf_counter()
  for _ in range(steps):
    params, state = step(params, state)
  jax.block_until_ready(params)
  return steps / (time.perf_counter() - start)


def bench_recipes(steps: int, rounds: int, names: list[str] | None = None) -> None:
  config = train.load_recipe("dense")
  tokens = config.batch_size * config.model.context
  print(f"\n== recipes on {device_line()}")
  print(f"   default size ({tokens} tokens per step), {steps} steps, "
        f"median of {rounds} rounds alternating with dense")
  for name in names or train.recipe_names():
    if name == "dense":
      continue
    ratios, dense_rates = [], []
    for _ in range(rounds):
      dense_rates.append(recipe_steps_per_s("dense", steps))
      ratios.append(recipe_steps_per_s(name, steps) / dense_rates[-1])
    ratio, dense = sorted(ratios)[len(ratios) // 2], sorted(dense_rates)[len(ratios) // 2]
    print(f"{name:<22} {ratio * dense * tokens:9.0f} tokens/s  (dense {dense * tokens:7.0f})  "
          f"ratio {ratio:5.3f}")


QAT_CASES = {  # name: (format, nm, axis); axis None: the kernel's input axis (0)
    "int4 + 2:4": ("int4", (2, 4), None),
    "int4 + 2:4, axis=-1": ("int4", (2, 4), -1),
    "int8 per tensor": ("int8", None, None),
    "fp8_e4m3 per tensor": ("fp8_e4m3", None, None),
    "mxfp4_e2m1 + 2:4, axis=-1": ("mxfp4_e2m1", (2, 4), -1),
    "mxfp8_e4m3, axis=-1": ("mxfp8_e4m3", None, -1),
    "nvfp4 + 2:4, axis=-1": ("nvfp4", (2, 4), -1),
}


def bench_qat_updates(rounds: int, repeats: int) -> None:
  import bench_qat  # scripts/, beside this file

  params = bench_qat._params(jnp.float32)
  names = ["adamw", *QAT_CASES]
  txs = [optax.adamw(1e-3)] + [jaxprune.quantization(optax.adamw(1e-3), fmt, nm=nm, axis=axis)
                               for fmt, nm, axis in QAT_CASES.values()]
  print(f"\n== QAT optimizer update on {device_line()}")
  print(f"   jitted tx.update alone, {sum(p.size for p in jax.tree.leaves(params)):,} float32 "
        f"weights; median over {rounds} rounds (alternating) of the median of {repeats}")
  results = bench_qat.interleaved_ms([bench_qat.compiled_update(tx, params) for tx in txs],
                                     rounds, repeats)
  base_rounds = results[0][1]
  for name, (ms, per_round) in zip(names, results, strict=True):
    ratio = sorted(r / b for r, b in zip(per_round, base_rounds, strict=True))[rounds // 2]
    print(f"{name:<32} update {ms:7.3f} ms  ratio to adamw {ratio:5.2f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
  parser.add_argument("--only", choices=("masks", "wrappers", "recipes", "qat"),
                      help="run one section")
  parser.add_argument("--recipes", help="comma-separated recipe names (default: all)")
  parser.add_argument("--methods", default=",".join(select_k.METHODS),
                      help="comma-separated mask selection methods (default: all of "
                           f"{', '.join(select_k.METHODS)}); the default method is always run")
  parser.add_argument("--min", action="store_true",
                      help="report the fastest run instead of the median (a busy shared machine)")
  args = parser.parse_args()
  global STATISTIC
  STATISTIC = "min" if args.min else "median"
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    select_k.check_method(m)
  print(f"{device_line()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"jaxprune from {os.path.dirname(jaxprune.__file__)}")
  if args.only in (None, "masks"):
    bench_masks(repeats=5 if args.quick else 30, methods=methods)
  if args.only in (None, "wrappers"):
    bench_training(steps=20 if args.quick else 200, rounds=1 if args.quick else 3)
  if args.only in (None, "recipes"):
    bench_recipes(steps=5 if args.quick else 40, rounds=1 if args.quick else 3,
                  names=args.recipes.split(",") if args.recipes else None)
  if args.only in (None, "qat"):
    bench_qat_updates(rounds=3 if args.quick else 7, repeats=5 if args.quick else 15)


if __name__ == "__main__":
  main()
