r"""One-shot pruning and/or post-training quantization of a trained run, then a sparse fine-tune.

    python scripts/oneshot.py --from /tmp/dense --method sparsegpt --nm 2:4
    python scripts/oneshot.py --from /tmp/dense --method wanda --sparsity 0.7 --distribution owl
    python scripts/oneshot.py --from /tmp/dense --method none --quantize int4 --group_size 32
    python scripts/oneshot.py --from /tmp/dense --method sparsegpt --nm 2:4 --quantize int4 \
        --finetune_steps 200

``--from`` is the workdir of a finished ``scripts/train.py`` run. Calibration
uses ``--calibration`` training windows of the run's context (128 by default),
in batches of ``--calibration_batch``, split over all local devices. Prints
the per-layer report (relative reconstruction error, sparsity, time) and the
validation perplexity of the run, after one-shot and, with
``--finetune_steps`` > 0, after a fine-tune that keeps the one-shot masks
(quantization-aware when quantizing; ``--finetune_method sr_ste`` for N:M).
``--json`` appends the numbers as one JSON line; ``--save`` writes the final
params. ``--method none`` without ``--quantize`` skips the one-shot step: the
fine-tune alone, the dense model trained on for as many steps (the baseline
that fine-tuned rows should be compared with).
"""

from __future__ import annotations

import json
import math
import pathlib
import platform
import sys
import time

from absl import app, flags, logging

_FROM = flags.DEFINE_string("from", None, "Workdir of a finished scripts/train.py run.")
_METHOD = flags.DEFINE_enum("method", "sparsegpt", ["magnitude", "wanda", "sparsegpt", "none"],
                            "Pruning method ('none': quantize only).")
_SPARSITY = flags.DEFINE_float("sparsity", None, "Unstructured sparsity in [0, 1).")
_NM = flags.DEFINE_string("nm", None, "N:M, e.g. 2:4 (keep 2 of every 4 inputs).")
_QUANTIZE = flags.DEFINE_string("quantize", None, "A jaxprune.quant int or MX format.")
_QUANTIZER = flags.DEFINE_enum("quantizer", "gptq", ["gptq", "rtn"], "GPTQ or round to nearest.")
_GROUP = flags.DEFINE_integer("group_size", None, "Inputs per quantization scale.")
_ACT_ORDER = flags.DEFINE_bool("act_order", False, "GPTQ's act-order (decreasing H_ii).")
_DISTRIBUTION = flags.DEFINE_enum("distribution", "uniform", ["uniform", "owl"],
                                  "Per-layer sparsities: uniform or OWL.")
_OWL_LAMBDA = flags.DEFINE_float("owl_lambda", 0.08, "OWL's lambda.")
_OWL_M = flags.DEFINE_float("owl_threshold", 5.0, "OWL's outlier threshold M.")
_BLOCK = flags.DEFINE_integer("blocksize", 128, "SparseGPT/GPTQ lazy-update block.")
_DAMP = flags.DEFINE_float("damp", 0.01, "Dampening, a fraction of mean(diag H).")
_CALIBRATION = flags.DEFINE_integer("calibration", 128, "Calibration sequences.")
_CAL_BATCH = flags.DEFINE_integer("calibration_batch", 32, "Calibration sequences per batch.")
_FT_STEPS = flags.DEFINE_integer("finetune_steps", 0, "Fine-tuning steps after one-shot.")
_FT_LR = flags.DEFINE_float("finetune_lr", 1e-3, "Peak fine-tuning learning rate.")
_FT_METHOD = flags.DEFINE_enum("finetune_method", "mask", ["mask", "sr_ste"],
                               "Hold the one-shot mask, or SR-STE (N:M) from the pruned weights.")
_JSON = flags.DEFINE_string("json", None, "Append the results as one JSON line to this file.")
_SAVE = flags.DEFINE_string("save", None, "Write the final params to this .npz (path -> array).")
flags.mark_flag_as_required("from")


def _nm(text: str | None) -> tuple[int, int] | None:
  if text is None:
    return None
  try:
    n, m = (int(x) for x in text.split(":"))
  except ValueError:
    raise app.UsageError(f"--nm must look like 2:4, got {text!r}.") from None
  return n, m


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax

  from jaxprune import oneshot
  from jaxprune.oneshot import finetune as finetune_lib
  from jaxprune.oneshot import workdir as workdir_lib

  try:
    run = workdir_lib.load_run(_FROM.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  method = None if _METHOD.value == "none" else _METHOD.value
  nm = _nm(_NM.value)
  batches = workdir_lib.calibration_batches(run, _CALIBRATION.value, _CAL_BATCH.value)
  devices = jax.local_devices()
  mesh = None
  if len(devices) > 1 and all(b.shape[0] % len(devices) == 0 for b in batches):
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  dense_loss = workdir_lib.evaluate(run)
  if method is None and _QUANTIZE.value is None:
    if _FT_STEPS.value <= 0:
      sys.exit("error: nothing to do: give --method, --quantize or --finetune_steps.")
    result = oneshot.OneShotResult(None, {}, oneshot.OneShotReport((), 0.0, len(devices)))
  else:
    try:
      result = oneshot.prune(
          run.model, batches, method=method, sparsity=_SPARSITY.value, nm=nm,
          quantize=_QUANTIZE.value, quantizer=_QUANTIZER.value, group_size=_GROUP.value,
          act_order=_ACT_ORDER.value, blocksize=_BLOCK.value, damp=_DAMP.value,
          distribution=_DISTRIBUTION.value, owl_lambda=_OWL_LAMBDA.value,
          owl_threshold=_OWL_M.value, mesh=mesh)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(result.report.table())
  oneshot_loss = workdir_lib.evaluate(run)
  out = {
      "from": str(pathlib.Path(_FROM.value).resolve()), "method": _METHOD.value,
      "sparsity": _SPARSITY.value, "nm": _NM.value, "quantize": _QUANTIZE.value,
      "quantizer": _QUANTIZER.value if _QUANTIZE.value else None, "group_size": _GROUP.value,
      "act_order": _ACT_ORDER.value, "distribution": _DISTRIBUTION.value,
      "calibration": _CALIBRATION.value, "dense_loss": dense_loss,
      "dense_perplexity": math.exp(dense_loss), "oneshot_loss": oneshot_loss,
      "oneshot_perplexity": math.exp(oneshot_loss), "oneshot_seconds": result.report.seconds,
      "layers": result.report.as_dict()["layers"], "backend": jax.default_backend(),
      "device": devices[0].device_kind, "devices": len(devices),
      "python": platform.python_version(), "jax": jax.__version__,
  }
  print(f"validation perplexity: dense {out['dense_perplexity']:.4f}, "
        f"one-shot {out['oneshot_perplexity']:.4f}")
  if _FT_STEPS.value > 0:
    quant_kwargs = {}
    if _QUANTIZE.value:
      from jaxprune import quant
      if quant.get_format(_QUANTIZE.value).kind == "mx":
        quant_kwargs = {"block_size": _GROUP.value} if _GROUP.value else {}
      else:
        quant_kwargs = ({"block_size": _GROUP.value} if _GROUP.value
                        else {"granularity": "channel"})
    start = time.perf_counter()
    losses = finetune_lib.finetune(
        run, run.model, result.masks, steps=_FT_STEPS.value, lr=_FT_LR.value,
        method=_FT_METHOD.value, nm=nm, quantize=_QUANTIZE.value, quant_kwargs=quant_kwargs)
    tuned = workdir_lib.evaluate(run)
    out.update(finetune_steps=_FT_STEPS.value, finetune_lr=_FT_LR.value,
               finetune_method=_FT_METHOD.value, finetune_seconds=time.perf_counter() - start,
               finetune_final_train_loss=losses[-1], finetune_loss=tuned,
               finetune_perplexity=math.exp(tuned))
    from flax import nnx

    import jaxprune
    summary = jaxprune.sparsity_summary(nnx.state(run.model, nnx.Param), nm=nm,
                                        select=jaxprune.select())
    out["finetune_sparsity"] = summary.prunable_sparsity
    out["finetune_nm_valid"] = summary.nm_ok if nm else None
    print(f"after {_FT_STEPS.value} fine-tuning steps: validation perplexity "
          f"{out['finetune_perplexity']:.4f}, sparsity {summary.prunable_sparsity:.2%}")
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      f.write(json.dumps(out) + "\n")
  if _SAVE.value:
    import numpy as np
    from flax import nnx

    from jaxprune import selection
    params = nnx.state(run.model, nnx.Param)
    np.savez(_SAVE.value, **dict(zip(selection.leaf_paths(params),
                                     map(np.asarray, jax.tree.leaves(params)), strict=True)))


if __name__ == "__main__":
  app.run(main)
