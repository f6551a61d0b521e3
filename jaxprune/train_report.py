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
import math
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

import jaxprune
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


def make_report(config, config_dict, params, corpus, acc, total_params, last, pruned,
                compile_time_s=None) -> dict:
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
      "eval_loss": last.get("eval_loss"),
      "eval_perplexity": last.get("eval_perplexity"),
      "eval_bits_per_byte": last["eval_loss"] / math.log(2) if "eval_loss" in last else None,
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
      "config": config_dict,
  }


def report_markdown(report: dict) -> str:
  keys = ("method", "steps", "eval_loss", "eval_perplexity", "eval_bits_per_byte",
          "params_total", "params_nonzero", "params_active_mean", "prunable_sparsity",
          "nm_valid", "tokens_seen", "tokens_per_s", "model_flops_per_token", "mfu",
          "wall_time_s", "compile_time_s", "devices", "device_kind")
  lines = ["# jaxprune training report", "", "| quantity | value |", "|---|---|"]
  for k in keys:
    v = report.get(k)
    lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
  fp = report["corpus"]
  lines += ["", f"Corpus: {json.dumps(fp)}", "", "## Sparsity per layer", "", "```",
            report["sparsity_table_text"], "```", "", "## Config", "", "```json",
            json.dumps(report["config"], indent=2), "```", ""]
  return "\n".join(lines)
