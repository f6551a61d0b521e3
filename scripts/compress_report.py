r"""Sparsity x quantization on a trained transformer: errors, losses and sizes per format.

    python scripts/compress_report.py                           # trains recipes/dense.py first
    python scripts/compress_report.py --preset=tiny --out=/tmp/r.md   # seconds
    python scripts/compress_report.py /tmp/gmp --out=report.md  # a training workdir

``WORKDIR`` is a ``scripts/train.py`` workdir: its newest checkpoint's params
are analysed. If it holds no checkpoint, ``--recipe`` (at ``--preset``) is
trained there first; without ``WORKDIR``, into a new temporary directory.

For every format (``--formats``; int formats symmetric with one scale per
output channel, MX formats in blocks of 32 along the input axis, NVFP4 with an
E4M3 scale per 16 along the input axis and a float32 scale per kernel) and every
sparsity (``--sparsities``; magnitude, N:M along the input axis, unstructured
uniform over the layers), on the kernels ``jaxprune.select()`` picks:

* relative L2 errors ``||W - C(W)|| / ||W||`` per layer and pooled, for
  sparsity only (S), quantization only (Q), S->Q and Q->S, and the same of
  the layer outputs ``X W`` with ``X`` the layer's real inputs on a
  validation batch (:func:`jaxprune.error_analysis`);
* the validation loss of the whole model with every kernel compressed;
* the stored bytes of the S->Q export (:func:`jaxprune.export_compressed`).

It then checks the two findings of Harma et al. 2024 (arXiv:2405.20935) and
prints whether each holds here: S->Q is no worse than Q->S, and the errors
compound (the combined error exceeds the sum of the parts) for low-bit
formats, both as relative L2 and as increases of the validation loss, with
standard errors over the batches. The report is printed as markdown and, with
``--out report.md``, written to ``report.md`` and ``report.json``.

``--int_conventions=absmax,harma`` adds, for every int format, the rows of
Harma et al.'s own integer quantizer (``quantize(..., convention='harma')``:
``s = 2 amax / (2^k - 1)``, levels ``-2^(k-1) ... 2^(k-1) - 1``), labelled
``int4 (harma)``; their finer step gives a smaller quantization error. The
theorem behind finding 1 does not cover them: their levels are not symmetric,
and the scale doubles when a channel keeps a negative weight.

MXFP6 is ``mxfp6_e2m3`` by default: inside a block of 32 weights the values
span few binades, so the extra mantissa bit beats E3M2's range (on the
default dense model, quantization error 2.9% against 5.4%).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx

import jaxprune
from jaxprune import checkpoint, quant, train
from jaxprune import data as data_lib
from jaxprune.compress import compress_params

_RECIPE = flags.DEFINE_string("recipe", "dense", "Recipe to train when WORKDIR has no checkpoint.")
_PRESET = flags.DEFINE_enum("preset", "", ["", "tiny"], "Size preset of the recipe to train "
                            "('tiny': a seconds-long run).")
_OUT = flags.DEFINE_string("out", "", "Markdown report path; the JSON goes beside it (.json).")
_FORMATS = flags.DEFINE_list(
    "formats", ["int8", "int4", "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1", "nvfp4"],
    "Quantization formats (names in jaxprune.quant.FORMATS).")
_SPARSITIES = flags.DEFINE_list(
    "sparsities", ["50%", "2:4", "1:4", "75%"], "N:M patterns ('2:4') or unstructured "
    "sparsities ('75%' or '0.75').")
_INT_GRANULARITY = flags.DEFINE_enum(
    "int_granularity", "channel", ["channel", "tensor"], "Scales of the int formats.")
_INT_CONVENTIONS = flags.DEFINE_list(
    "int_conventions", ["absmax"], "Scalings of the int formats, one row each: 'absmax' "
    "(ours, s = amax / (2^(k-1) - 1)) and/or 'harma' (Harma et al.'s, s = 2 amax / (2^k - 1)).")
_EVAL_BATCHES = flags.DEFINE_integer(
    "eval_batches", 0, "Validation batches for the losses (the first gives the layer inputs); "
    "0: the run's own evaluation set (config.eval_batches).")

LOW_BITS = 6  # Formats of at most this many bits are the "low-bit" ones of finding 2.


def parse_sparsity(text: str) -> dict[str, Any]:
  """``'2:4'`` -> ``{'nm': (2, 4)}``; ``'75%'`` or ``'0.75'`` -> ``{'sparsity': 0.75}``."""
  try:
    if ":" in text:
      n, m = text.split(":")
      return {"nm": (int(n), int(m))}
    return {"sparsity": float(text[:-1]) / 100 if text.endswith("%") else float(text)}
  except ValueError:
    raise ValueError(f"bad sparsity {text!r}: give 'n:m' (e.g. 2:4) or a fraction "
                     "('0.75' or '75%').") from None


def _manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(workdir.absolute() / checkpoint.CHECKPOINT_DIR,
                               item_names=("state", "meta"))


def has_checkpoint(workdir: pathlib.Path) -> bool:
  if not (workdir / checkpoint.CHECKPOINT_DIR).is_dir():
    return False
  with _manager(workdir) as mngr:
    return mngr.latest_step() is not None


def load_params(workdir: pathlib.Path):
  """``(graphdef, params, config, step)`` of the newest checkpoint in ``workdir``."""
  if not has_checkpoint(workdir):
    raise ValueError(f"no checkpoint in {workdir}")
  with _manager(workdir) as mngr:
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  config = ml_collections.ConfigDict(restored["meta"]["config"])
  # Restored without a target, list indices are strings ('0'); the model's state maps them back.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: train.make_model(config)), nnx.Param)
  nnx.replace_by_pure_dict(state, restored["state"]["params"])
  return graphdef, nnx.to_pure_dict(state), config, step


def layer_inputs(graphdef, params, tokens, paths: Sequence[str]) -> dict:
  """The input ``(rows, in)`` of every ``nnx.Linear`` whose kernel path is in ``paths``.

  One jitted forward pass of the model on ``tokens`` in which each such layer
  is replaced by a function that records its input and calls the layer.
  """
  def forward(params, tokens):
    model, inputs = nnx.merge(graphdef, params), {}
    for path, module in list(nnx.iter_modules(model)):
      key = "/".join(map(str, path)) + "/kernel"
      if isinstance(module, nnx.Linear) and key in paths:
        def record(x, layer=module, key=key):
          inputs[key] = x
          return layer(x)
        parent = model
        for p in path[:-1]:
          parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], record)
    model(tokens)
    return inputs

  inputs = jax.jit(forward)(params, tokens)
  return {k: np.asarray(x).reshape(-1, x.shape[-1]) for k, x in inputs.items()}


def variants(formats: Sequence[str], int_conventions: Sequence[str]) -> dict[str, tuple]:
  """``label -> (format, convention)``: every format, each int one once per convention
  (labelled ``'int4 (harma)'`` unless ``'absmax'``)."""
  for c in int_conventions:
    if c not in quant.CONVENTIONS:
      raise ValueError(f"`int_conventions` must be among {quant.CONVENTIONS}, got {c!r}.")
  out = {}
  for f in formats:
    f = quant.get_format(f).name  # Unknown names list the valid ones.
    for c in int_conventions if quant.get_format(f).kind == "int" else ["absmax"]:
      out[f if c == "absmax" else f"{f} ({c})"] = (f, c)
  return out


def evaluate(workdir: pathlib.Path, formats: Sequence[str], sparsities: Sequence[str], *,
             int_granularity: str = "channel", eval_batches: int = 0,
             int_conventions: Sequence[str] = ("absmax",)) -> dict[str, Any]:
  """Every (format, sparsity) cell of the report, as a JSON-serialisable dict."""
  structures = {s: parse_sparsity(s) for s in sparsities}
  formats = variants(formats, int_conventions)
  graphdef, params, config, step = load_params(workdir)
  # numpy leaves: restored arrays are committed to a device, which would give every jitted
  # mask and quantizer a second compilation next to the numpy copies error_analysis makes.
  params = jax.tree.map(np.asarray, params)
  select = jaxprune.select(prune_embeddings=config.prune_embeddings)
  corpus = data_lib.load_corpus(config.data.path or None,
                                valid_fraction=config.data.valid_fraction,
                                include_tests=config.data.include_tests)
  batches = data_lib.eval_batches(corpus.valid, batch_size=config.batch_size,
                                  context=config.model.context,
                                  num_batches=eval_batches or config.eval_batches)
  loss_fn = jax.jit(lambda p, b: train.loss_fn(graphdef, p, b))

  def losses(p) -> np.ndarray:
    """The validation loss of each batch, as float64 for the differences of differences."""
    return np.array([loss_fn(p, b) for b in batches], np.float64)

  specs = jaxprune.resolve(select, params, 0.5)
  selected = [p for p, s in zip(jaxprune.leaf_paths(params), specs, strict=True) if s]
  inputs = layer_inputs(graphdef, params, batches[0][:, :-1], selected)

  def settings(fmt: str | None, convention: str = "absmax") -> dict[str, Any]:
    if fmt is None or quant.get_format(fmt).kind != "int":
      return {"select": select, "granularity": None}
    return {"select": select, "granularity": int_granularity, "convention": convention}

  dense = losses(params)
  sparse_only = {s: losses(compress_params(params, **kw, **settings(None)))
                 for s, kw in structures.items()}
  quant_only = {v: losses(compress_params(params, f, **settings(f, c)))
                for v, (f, c) in formats.items()}
  cells = []
  for variant, (fmt, convention) in formats.items():
    fmt_kw = settings(fmt, convention)
    for label, kw in structures.items():
      analysis = jaxprune.error_analysis(params, fmt, inputs=inputs, **kw, **fmt_kw)
      sizes = jaxprune.compressed_size_report(
          jaxprune.export_compressed(params, fmt=fmt, **kw, **fmt_kw)).total_compressed
      sq, qs = (losses(compress_params(params, fmt, order=order, **kw, **fmt_kw))
                for order in ("sq", "qs"))
      s_loss, q_loss = sparse_only[label], quant_only[variant]
      cells.append({
          "format": variant, "element_format": fmt, "convention": convention,
          "bits": quant.get_format(fmt).bits, "sparsity": label,
          "nm": list(kw["nm"]) if "nm" in kw else None, "unstructured": kw.get("sparsity"),
          "total": analysis.total._asdict(),
          "layers": [r._asdict() for r in analysis.rows],
          "loss": {"s": s_loss.mean(), "q": q_loss.mean(), "sq": sq.mean(), "qs": qs.mean()},
          # Per batch, then mean and standard error over the batches.
          "loss_gap": mean_se((sq - dense) - ((s_loss - dense) + (q_loss - dense))),
          "loss_sq_minus_qs": mean_se(sq - qs),
          "dense_bytes": sizes.dense_bytes, "stored_bytes": sizes.stored_bytes,
          "bits_per_weight": 32 * sizes.stored_bytes / sizes.dense_bytes,
          "table": analysis.table(),
      })
  return {
      "workdir": str(workdir), "step": step, "steps": config.steps, "method": config.method,
      "model": config.model.to_dict(), "layers": selected,
      "weights": sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(params), specs,
                                                     strict=True) if s),
      "input_rows": int(next(iter(inputs.values())).shape[0]),
      "eval_batches": len(batches), "int_granularity": int_granularity,
      "int_conventions": list(int_conventions),
      "dense_loss": dense.mean(),
      "loss_s": {k: v.mean() for k, v in sparse_only.items()},
      "loss_q": {k: v.mean() for k, v in quant_only.items()}, "cells": cells,
  }


def mean_se(x) -> dict[str, float | None]:
  """Mean of per-batch values and its standard error (None from a single batch)."""
  x = np.asarray(x, np.float64)
  se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else None
  return {"mean": float(x.mean()), "se": se}


def _significant(v: dict[str, float | None], sign: int) -> bool:
  """``v``'s mean is beyond 2 standard errors on the side of ``sign``."""
  return v["se"] is not None and sign * v["mean"] > 2 * v["se"]


def findings(report: dict[str, Any]) -> list[str]:
  """The paper's two findings, computed on ``report``'s cells: one line each."""
  cells, tol = report["cells"], 1e-12
  low = [c for c in cells if c["bits"] <= LOW_BITS]

  def sq_le_qs(rows, prefix=""):
    return [r[prefix + "eps_sq"] <= r[prefix + "eps_qs"] + tol for r in rows]

  def verdict(ok: Sequence[bool]) -> str:
    return f"{'HOLDS' if all(ok) else 'does NOT hold'} ({sum(ok)}/{len(ok)})"

  def significant(key: str, sign: int, subset) -> str:
    return f"{sum(_significant(c[key], sign) for c in subset)}/{len(subset)}"

  per_format = ", ".join(
      f"{f} {sum(c['loss_gap']['mean'] > 0 for c in cells if c['format'] == f)}/"
      f"{sum(c['format'] == f for c in cells)}" for f in dict.fromkeys(c["format"] for c in cells))
  return [
      "Finding 1, S->Q error <= Q->S error, in the weights (the theorem's quantity): "
      f"{verdict(sq_le_qs([c['total'] for c in cells]))} cells, "
      f"{verdict(sq_le_qs([r for c in cells for r in c['layers']]))} layers; in the N:M "
      "cells, whose groups lie inside one scaling group so that the theorem guarantees it per "
      f"layer: {verdict(sq_le_qs([r for c in cells if c['nm'] for r in c['layers']]))} layers. "
      f"Layer outputs: {verdict(sq_le_qs([c['total'] for c in cells], 'out_'))} cells. "
      f"Validation loss: {verdict([c['loss_sq_minus_qs']['mean'] <= 0 for c in cells])} "
      f"cells; S->Q better by > 2 standard errors in "
      f"{significant('loss_sq_minus_qs', -1, cells)}, Q->S better by > 2 SE in "
      f"{significant('loss_sq_minus_qs', 1, cells)}.",
      f"Finding 2, errors compound for low-bit formats "
      f"({', '.join(dict.fromkeys(c['format'] for c in low))}), as validation-loss increases "
      f"dL_sq > dL_s + dL_q (the paper's measure): "
      f"{verdict([c['loss_gap']['mean'] > 0 for c in low])} low-bit cells; beyond 2 standard "
      f"errors: compound in {significant('loss_gap', 1, low)}, sub-additive in "
      f"{significant('loss_gap', -1, low)} (all formats, gap > 0: {per_format}). "
      "As relative L2, eps_sq > eps_s + eps_q: weights "
      f"{verdict([c['total']['gap'] > 0 for c in low])}, layer outputs "
      f"{verdict([c['total']['out_gap'] > 0 for c in low])} low-bit cells. In the weights it "
      "cannot hold: S->Q's error is the pruned weights plus Q's error on the kept ones "
      "(disjoint supports, same scales), so eps_sq <= sqrt(eps_s^2 + eps_q^2) <= eps_s + eps_q.",
  ]


def _pct(v: float | None) -> str:
  return "-" if v is None else f"{100 * v:.3f}"


def _pm(v: dict[str, float | None]) -> str:
  return f"{v['mean']:+.4f}" + ("" if v["se"] is None else f" ± {v['se']:.4f}")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(report: dict[str, Any]) -> str:
  cells = report["cells"]
  m = report["model"]
  lines = [
      "# Sparsity x quantization report", "",
      f"Model: `{report['method']}` transformer (width {m['width']}, depth {m['depth']}, "
      f"context {m['context']}) at step {report['step']}/{report['steps']} of "
      f"`{report['workdir']}`; {len(report['layers'])} kernels, {report['weights']} weights "
      f"compressed. Dense validation loss {report['dense_loss']:.4f} nats/byte over "
      f"{report['eval_batches']} batches; layer inputs: {report['input_rows']} validation "
      f"tokens. int formats: symmetric, one scale per {report['int_granularity']} "
      "(per output channel: over the input axis), s = amax / (2^(k-1) - 1) ('(harma)' rows: "
      "Harma et al.'s s = 2 amax / (2^k - 1), levels -2^(k-1)..2^(k-1)-1); MX: blocks of 32 "
      "along the input axis; NVFP4: an E4M3 scale per 16 along the input axis and a float32 "
      "scale per kernel; "
      "N:M groups along the input axis; unstructured: uniform per layer.", "",
      "Errors: relative L2 in % of the weights (eps) and of the layer outputs (out), pooled "
      "over the layers; gap = eps_sq - (eps_s + eps_q). Loss: validation loss (nats/byte) with "
      "every kernel compressed; loss gap = dL_sq - (dL_s + dL_q), mean ± standard error over "
      "the batches. Bytes: the S->Q export of "
      "the kernels (values + index/mask + scales), bits per weight against 32 dense.", "",
  ]
  header = ["format", "sparsity", "eps_s", "eps_q", "eps_sq", "eps_qs", "gap", "out_sq",
            "out_qs", "out gap", "loss S->Q", "loss Q->S", "loss gap", "bytes", "bits/w"]
  rows = []
  for c in cells:
    t = c["total"]
    rows.append([c["format"], c["sparsity"], *map(_pct, [t["eps_s"], t["eps_q"], t["eps_sq"],
                                                         t["eps_qs"], t["gap"],
                                                         t["out_eps_sq"], t["out_eps_qs"],
                                                         t["out_gap"]]),
                 f"{c['loss']['sq']:.4f}", f"{c['loss']['qs']:.4f}", _pm(c["loss_gap"]),
                 str(c["stored_bytes"]), f"{c['bits_per_weight']:.2f}"])
  lines += _md_table(header, rows)
  lines += ["", "Loss with sparsity only: " + ", ".join(
      f"{s} {v:.4f}" for s, v in report["loss_s"].items()) + "; quantization only: " + ", ".join(
      f"{f} {v:.4f}" for f, v in report["loss_q"].items()) + ".", "", "## Findings", ""]
  lines += [f"- {line}" for line in report["findings"]]
  lines += ["", "## Per layer", ""]
  for c in cells:
    lines += ["```", c["table"], "```", ""]
  return "\n".join(lines)


def run(workdir: str | None, *, out: str = "", recipe: str = "dense", preset: str = "",
        formats: Sequence[str], sparsities: Sequence[str], int_granularity: str = "channel",
        eval_batches: int = 0, int_conventions: Sequence[str] = ("absmax",)) -> dict[str, Any]:
  """Trains if needed, evaluates, prints the markdown and writes ``out`` (+ ``.json``)."""
  start = time.perf_counter()
  workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="compress_report_"))
  if not has_checkpoint(workdir):
    print(f"training recipe {recipe!r}{f' (preset {preset})' if preset else ''} into {workdir}",
          file=sys.stderr)
    train.train(train.load_recipe(recipe, preset), workdir)
  report = evaluate(workdir, formats, sparsities, int_granularity=int_granularity,
                    eval_batches=eval_batches, int_conventions=int_conventions)
  report["findings"] = findings(report)
  report["wall_time_s"] = time.perf_counter() - start
  text = markdown(report)
  print(text)
  if out:
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
  print(f"wall time {report['wall_time_s']:.1f} s", file=sys.stderr)
  return report


def main(argv) -> None:
  if len(argv) > 2:
    raise app.UsageError(f"expected at most one WORKDIR, got {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save and restore at INFO.
    logging.set_verbosity(logging.WARNING)
  try:
    run(argv[1] if len(argv) > 1 else None, out=_OUT.value, recipe=_RECIPE.value,
        preset=_PRESET.value, formats=_FORMATS.value, sparsities=_SPARSITIES.value,
        int_granularity=_INT_GRANULARITY.value, eval_batches=_EVAL_BATCHES.value,
        int_conventions=_INT_CONVENTIONS.value)
  except ValueError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
