"""Compare training runs: one markdown row per workdir's ``report.json``.

    python scripts/results_table.py /tmp/results/dense /tmp/results/gmp ...

The first workdir whose method is ``dense`` is the baseline of the relative
columns (perplexity ratio, tokens/s ratio). Runs on different corpora (their
fingerprints differ) are refused: their losses are not comparable.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def load(workdir: str) -> dict:
  path = pathlib.Path(workdir) / "report.json"
  if not path.is_file():
    sys.exit(f"error: {path} does not exist (did the run finish?)")
  return json.loads(path.read_text())


def table(reports: list[dict]) -> str:
  corpora = {r["corpus"]["sha256"] for r in reports}
  if len(corpora) > 1:
    raise ValueError(f"runs on {len(corpora)} different corpora are not comparable.")
  base = next((r for r in reports if r["method"] == "dense"), None)
  header = ("| run | val ppl | vs dense | bits/byte | prunable sparsity | N:M ok | params (final "
            "non-zero) | mean params over training | tokens/s | vs dense | wall time |")
  lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
  for r in reports:
    ppl_ratio = r["eval_perplexity"] / base["eval_perplexity"] if base else float("nan")
    tps_ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
    nm = {True: "yes", False: "NO", None: "-"}[r["nm_valid"]]
    lines.append(
        f"| {r['name']} | {r['eval_perplexity']:.3f} | {ppl_ratio:.3f}x | "
        f"{r['eval_bits_per_byte']:.3f} | {r['prunable_sparsity']:.1%} | {nm} | "
        f"{r['params_active_final']:,} | {r['params_active_mean']:,.0f} | "
        f"{r['tokens_per_s']:,.0f} | {tps_ratio:.2f}x | {r['wall_time_s']:.0f} s |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  args = parser.parse_args()
  reports = []
  for w in args.workdirs:
    report = load(w)
    report["name"] = pathlib.Path(w).name
    reports.append(report)
  print(table(reports))


if __name__ == "__main__":
  main()
