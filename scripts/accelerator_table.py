r"""Dense and every recipe at one preset, in one process: throughput, MFU and quality, as a table.

    python scripts/accelerator_table.py --preset small --steps 300
    python scripts/accelerator_table.py --preset tiny --steps 20 --recipes dense,gmp   # CPU smoke

Each recipe is trained by :func:`jaxprune.train.train` for ``--steps`` steps
(its schedules scaled to that length), evaluated once at the end on
``--eval_batches`` validation batches, without checkpoints, in a fresh
temporary workdir. Runs share what their shapes allow: the corpus (read once),
the evaluation program (one compilation per model), and JAX's persistent
compilation cache (``--compilation_cache``; a second invocation loads every
train step instead of compiling it). Prints one line per run as it finishes,
then a markdown table with the backend and device named:

* tokens/s: the run's mean over its steps but the first (warm-up) one, all
  phases included (e.g. GMP's dense start and its mask updates);
* vs dense: tokens/s over the dense recipe's;
* MFU: model FLOPs per token (``6N + 12 L d T``, :mod:`jaxprune.train_report`)
  x tokens/s over the device's bf16 dense peak (``--peak_flops`` for devices
  that :data:`jaxprune.train_report.PEAK_FLOPS` does not list; "-" on CPU);
* validation perplexity (per byte), wall time of the run (compilation,
  steps, evaluation) and the train step's compile time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import jax

from jaxprune import train


def run(name: str, args, workdir: str) -> dict:
  config = train.load_recipe(name, args.preset)
  config.steps = args.steps
  config.update(eval_every=args.steps, log_every=min(50, args.steps), checkpoint_every=0,
                eval_batches=args.eval_batches, progress=False,
                compilation_cache=args.compilation_cache, peak_flops=args.peak_flops)
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, max(args.steps // 10, 1))
  start = time.perf_counter()
  report = train.train(config, f"{workdir}/{name}")
  return {"recipe": name, "tokens_per_s": report["tokens_per_s"], "mfu": report["mfu"],
          "eval_perplexity": report["eval_perplexity"], "params_total": report["params_total"],
          "wall_time_s": time.perf_counter() - start, "compile_time_s": report["compile_time_s"],
          "model_flops_per_token": report["model_flops_per_token"]}


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def table(rows: list[dict], args) -> str:
  dense = next((r["tokens_per_s"] for r in rows if r["recipe"] == "dense"), None)
  device = jax.devices()[0]
  lines = [f"backend {jax.default_backend()}, {jax.device_count()} x {device.device_kind}, "
           f"jax {jax.__version__}; preset {args.preset!r}, {args.steps} steps, "
           f"{rows[0]['params_total']:,} parameters, "
           f"{rows[0]['model_flops_per_token']:,} model FLOPs per token", "",
           "| recipe | tokens/s | vs dense | MFU | val ppl | wall s | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = r["tokens_per_s"] / dense if dense and r["tokens_per_s"] else None
    lines.append(f"| {r['recipe']} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                 f"{_fmt(ratio, '.3f')}x | {_fmt(r['mfu'], '.1%')} | "
                 f"{_fmt(r['eval_perplexity'], '.3f')} | {r['wall_time_s']:.1f} | "
                 f"{_fmt(r['compile_time_s'], '.1f')} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="small", help="e.g. small, base, tiny, tiny+bf16")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--recipes", help="comma-separated (default: dense, then every recipe)")
  parser.add_argument("--eval_batches", type=int, default=8)
  parser.add_argument("--peak_flops", type=float, default=0.0,
                      help="peak dense FLOP/s of one device, for devices without a known peak")
  parser.add_argument("--compilation_cache", default="",
                      help="'' (default: ~/.cache/jaxprune/jax_cache), 'off', or a directory")
  parser.add_argument("--out", help="also write the rows as JSON to this file")
  args = parser.parse_args(argv)
  if args.steps < 2:
    parser.error("--steps must be >= 2 (the first step is warm-up, not timed).")
  names = args.recipes.split(",") if args.recipes else train.recipe_names()
  names = sorted(names, key=lambda n: n != "dense")   # dense first: the reference.
  rows = []
  with tempfile.TemporaryDirectory(prefix="jaxprune-table-") as workdir:
    for name in names:
      rows.append(run(name, args, workdir))
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print(table(rows, args))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
