"""The training report: quality, parameter counts, sparsity per layer, throughput, FLOPs, MFU.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B; as in
the Chinchilla appendix F up to its finer count of embeddings and softmax)::

    6 N + 12 L d T

with ``N`` the parameters that multiply activations (all but the token and
position embeddings, which are table look-ups; the output head counts), ``L``
layers, ``d = H Q`` the width (heads x head dimension) and ``T`` the context.
``6 N`` is 2 FLOPs per multiply-add in the forward pass and twice that in the
backward pass; ``12 L d T`` is the attention scores and their weighted sum,
over the full ``T x T`` matrix (causality not discounted). The count is of the
dense model for every method: it says how much of the hardware the run uses,
and no method here skips the pruned multiplications.

MFU (model FLOPs utilisation) = model FLOPs per token x tokens/s / (peak FLOP/s
x devices), against the *bfloat16 dense* peak of the device from
:data:`PEAK_FLOPS` (or ``config.peak_flops``), whatever the compute dtype.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

import jaxprune
from jaxprune import data as data_lib
from jaxprune.models import transformer
from jaxprune.train_methods import selection

#: Peak dense bfloat16 FLOP/s of one device, by a pattern of ``jax.devices()[0].device_kind``.
#: Vendor figures: NVIDIA's H100 and H200 datasheets give 1,979 TFLOPS BF16 "with sparsity",
#: half dense (SXM; the H200 NVL and H100 PCIe/NVL are lower and not listed); the A100
#: datasheet 312 TFLOPS dense; the L4 datasheet 242 TFLOPS with sparsity (121 dense); Google
#: Cloud's TPU system-architecture pages give the peak compute per chip (bf16): v4 275, v5e
#: ("TPU v5 lite") 197, v5p 459, v6e ("TPU v6 lite", Trillium) 918 TFLOPs.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H100 (80GB HBM3|SXM)", 989.5e12),
    (r"H200(?! NVL)", 989.5e12),
    (r"A100", 312e12),
    (r"\bL4\b", 121e12),
    (r"^TPU v4$", 275e12),
    (r"^TPU v5 ?(lite|e)$", 197e12),
    (r"^TPU v5p?$", 459e12),
    (r"^TPU v6 ?(lite|e)$", 918e12),
)

METHODS_NM = ("nm_asp", "ste", "sr_ste", "step", "gradient_flow")


def model_flops_per_token(model: dict, vocab_size: int = 256) -> int:
  """``6 N + 12 L d T`` of the transformer with config ``model`` (see the module docstring)."""
  n = transformer.param_count(vocab_size=vocab_size, **model)
  n -= vocab_size * model["width"]                       # token embedding: a look-up
  if model["positions"] == "learned":
    n -= model["context"] * model["width"]               # position embedding: a look-up
  return 6 * n + 12 * model["depth"] * model["width"] * model["context"]


def peak_flops(device_kind: str, configured: float = 0.0) -> float | None:
  """``configured`` if > 0, else the :data:`PEAK_FLOPS` entry matching ``device_kind``, or None."""
  if configured > 0:
    return float(configured)
  for pattern, flops in PEAK_FLOPS:
    if re.search(pattern, device_kind):
      return flops
  return None


def mfu(flops_per_token: float, tokens_per_s: float | None, peak: float | None,
        devices: int) -> float | None:
  """Model FLOPs utilisation, or None when the throughput or the peak is unknown."""
  if not tokens_per_s or not peak:
    return None
  return flops_per_token * tokens_per_s / (peak * devices)


def _throughput(config, acc) -> dict:
  tokens_per_s = acc.timed_tokens / acc.train_time if acc.train_time else None
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind, config.peak_flops)
  flops = model_flops_per_token(config.model.to_dict())
  return {"tokens_per_s": tokens_per_s, "model_flops_per_token": flops,
          "device_kind": kind, "peak_flops": peak,
          "mfu": mfu(flops, tokens_per_s, peak, jax.device_count())}


#: Validation perplexity of ``recipes/dense.py`` at the recipes' default size on README's corpus
#: (:data:`jaxprune.data.README_CORPUS`): the baseline every recipe's row in README compares
#: with. Keyed by the fields that decide it; a run that matches them all gets a comparison line.
DENSE_BASELINES = (
    ({"model": {"context": 64, "width": 128, "depth": 2, "heads": 4, "mlp_ratio": 4,
                "positions": "learned"},
      "steps": 800, "batch_size": 32, "seed": 0, "data": {"format": "bytes"}}, 4.994),
)


def _matches(config_dict: dict, want: dict) -> bool:
  for key, value in want.items():
    have = config_dict.get(key)
    if isinstance(value, dict):
      if not isinstance(have, dict) or not _matches(have, value):
        return False
    elif have != value:
      return False
  return True


def dense_baseline(config_dict: dict, fingerprint: dict) -> float | None:
  """README's dense perplexity for this run's size and corpus, when README has one."""
  if data_lib.readme_comparison(fingerprint) is not None:
    return None
  for want, ppl in DENSE_BASELINES:
    if _matches(config_dict, want):
      return ppl
  return None


def _notes(config, config_dict, corpus, last, opt_state) -> list[str]:
  """Sentences for the report: corpus, baseline, STEP's phase, recovered figures."""
  notes = []
  readme = data_lib.readme_comparison(corpus.fingerprint)
  if readme:
    notes.append(readme)
  baseline = dense_baseline(config_dict, corpus.fingerprint)
  if baseline and last.get("eval_perplexity") and config.method != "dense":
    ppl = last["eval_perplexity"]
    notes.append(f"Dense recipe at this size and corpus (README): perplexity {baseline:.3f}; "
                 f"this run: {ppl:.3f} ({ppl / baseline:.3f}x).")
  if config.method == "step" and opt_state is not None:
    notes.append(jaxprune.step_status(opt_state))
  if last.get("recovered"):
    notes.append("metrics.jsonl was missing: the final evaluation and parameter count were "
                 "recomputed from the checkpoint; not recoverable: "
                 + ", ".join(last.get("unrecoverable", [])) + ".")
  return notes


def make_report(config, config_dict, params, corpus, acc, total_params, last, pruned,
                compile_time_s=None, opt_state=None) -> dict:
  """The report of a finished run (``report.json``)."""
  nm = (config.n, config.m) if config.method in METHODS_NM else None
  # Every process calls this; a 'model' axis may span processes, so gather before fetching.
  params = multihost_utils.process_allgather(params, tiled=True)
  summary = jaxprune.sparsity_summary(params, nm=nm,
                                      select=selection(config) if pruned else None)
  nonzero = sum(int(np.count_nonzero(p)) for p in jax.tree.leaves(params))
  steps = max(acc.loss_count, 1)
  return {
      "method": config.method,
      "steps": config.steps,
      "data_format": config.data.format,
      "eval_loss": last.get("eval_loss"),
      "eval_perplexity": last.get("eval_perplexity"),
      "eval_loss_per_byte": last.get("eval_loss_per_byte"),
      "eval_bits_per_byte": last.get("eval_bits_per_byte"),
      "final_train_loss": last.get("train_loss"),
      "params_total": total_params,
      "params_nonzero": nonzero,
      "params_active_final": int(last.get("n_active", total_params)),
      "params_active_mean": acc.active_sum / steps,
      "prunable_sparsity": summary.prunable_sparsity if pruned else 0.0,
      "nm_valid": summary.nm_ok if nm else None,
      "tokens_seen": acc.tokens,
      **_throughput(config, acc),
      "wall_time_s": acc.wall_time,
      "compile_time_s": compile_time_s,
      "corpus": corpus.fingerprint,
      "devices": jax.device_count(),
      "sparsity_table": summary.as_dict(),
      "sparsity_table_text": summary.table(),
      "notes": _notes(config, config_dict, corpus, last, opt_state),
      "config": config_dict,
  }


_COUNTS = ("steps", "params_total", "params_nonzero", "params_active_final", "tokens_seen",
           "model_flops_per_token", "devices")


def _cell(key: str, value) -> str:
  if value is None:
    return "-"
  if key in _COUNTS or key == "params_active_mean":
    return f"{round(value):,}"
  if key in ("prunable_sparsity", "mfu"):
    return f"{100 * value:.2f}%"
  if key == "tokens_per_s":
    return f"{value:,.0f}"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def report_markdown(report: dict, *, with_config: bool = True) -> str:
  """``report.md``: the figures, notes, the sparsity table and (in the file) the config.

  ``with_config=False`` leaves the config out, for the terminal: it is in
  ``report.json`` and ``report.md``.
  """
  keys = ["method", "steps", "eval_loss", "eval_perplexity", "eval_loss_per_byte",
          "eval_bits_per_byte", "params_total", "params_nonzero", "params_active_mean",
          "prunable_sparsity", "nm_valid", "tokens_seen", "tokens_per_s",
          "model_flops_per_token", "mfu", "wall_time_s", "compile_time_s", "devices",
          "device_kind"]
  if report.get("nm_valid") is None:
    keys.remove("nm_valid")
  if report.get("data_format", "bytes") == "bytes":   # Per token is per byte.
    keys.remove("eval_loss_per_byte")
  lines = ["# jaxprune training report", "", "| quantity | value |", "|---|---|"]
  lines += [f"| {k} | {_cell(k, report.get(k))} |" for k in keys]
  notes = report.get("notes") or []
  if notes:
    lines += [""] + [f"* {n}" for n in notes]
  fp = report["corpus"]
  lines += ["", f"Corpus: {json.dumps(fp)}", "", "## Sparsity per layer", "", "```",
            report["sparsity_table_text"], "```", ""]
  if with_config:
    lines += ["## Config", "", "```json", json.dumps(report["config"], indent=2), "```", ""]
  return "\n".join(lines)
