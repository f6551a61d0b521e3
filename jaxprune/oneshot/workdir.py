"""A finished ``scripts/train.py`` run as a model, with its data: what one-shot calibrates on.

:func:`load_run` rebuilds the run's model from the config in ``report.json``
and restores its params from the newest checkpoint (:mod:`jaxprune.checkpoint`),
which must be the run's last step. :func:`calibration_batches` draws the
calibration set from the run's training split; :func:`evaluate` is the
validation loss the training report gives (the same fixed windows).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxprune import checkpoint as checkpoint_lib
from jaxprune import data as data_lib
from jaxprune import train as train_lib

# Calibration windows come from their own stream of the training split, not the run's batches.
CALIBRATION_SEED_OFFSET = 10_007


class Run(NamedTuple):
  """A finished training run: its config, the model with the final params, and its corpus."""

  config: ml_collections.ConfigDict
  model: nnx.Module
  corpus: data_lib.Corpus
  report: dict


def load_run(workdir: str | pathlib.Path) -> Run:
  """The model of a finished ``scripts/train.py`` run in ``workdir``.

  Raises:
    ValueError: if ``workdir`` holds no finished run: no ``report.json``, no
      readable checkpoint, or a newest checkpoint before the run's last step.
  """
  workdir = pathlib.Path(workdir)
  report_path = workdir / "report.json"
  if not report_path.is_file():
    raise ValueError(f"`workdir` {str(workdir)!r} holds no finished run of scripts/train.py "
                     "(no report.json); train one first, e.g. python scripts/train.py "
                     f"--config recipes/dense.py --workdir {workdir}.")
  report = json.loads(report_path.read_text())
  config = ml_collections.ConfigDict(report["config"])
  model = train_lib.make_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  tx = train_lib.make_optimizer(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = {"params": pure, "opt_state": jax.eval_shape(tx.init, pure),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  mngr = checkpoint_lib.manager(workdir, keep=config.keep_checkpoints)
  restored = checkpoint_lib.restore_latest(mngr, abstract)
  if restored is None or restored[0] != config.steps:
    found = "no readable checkpoint" if restored is None else f"step {restored[0]}"
    raise ValueError(f"`workdir` {str(workdir)!r} holds no finished run: {found}, the run has "
                     f"{config.steps} steps.")
  nnx.replace_by_pure_dict(params, restored[1]["params"])
  nnx.update(model, params)
  corpus = data_lib.load_corpus(config.data.path or None,
                                valid_fraction=config.data.valid_fraction,
                                include_tests=config.data.include_tests)
  if corpus.fingerprint["sha256"] != report["corpus"]["sha256"]:
    raise ValueError(f"the corpus differs from the one {workdir} was trained on: "
                     f"{corpus.fingerprint} vs {report['corpus']}.")
  return Run(config, model, corpus, report)


def calibration_batches(run: Run, sequences: int = 128, batch_size: int = 32) -> list[np.ndarray]:
  """``sequences`` random training windows of the run's context: model inputs ``[b, context]``."""
  if sequences < 1 or batch_size < 1:
    raise ValueError(f"`sequences` and `batch_size` must be >= 1, got {sequences}, {batch_size}.")
  out, left = [], sequences
  for i in range(math.ceil(sequences / batch_size)):
    batch = data_lib.train_batch(run.corpus.train, i, batch_size=min(batch_size, left),
                                 context=run.config.model.context,
                                 seed=run.config.seed + CALIBRATION_SEED_OFFSET)
    out.append(batch[:, :-1])
    left -= batch.shape[0]
  return out


def evaluate(run: Run, model: nnx.Module | None = None) -> float:
  """Mean validation loss (nats/byte) on the run's fixed evaluation windows, as train reports."""
  graphdef, params = nnx.split(model if model is not None else run.model, nnx.Param)
  loss = jax.jit(lambda p, b: train_lib.loss_fn(graphdef, p, b))
  batches = data_lib.eval_batches(run.corpus.valid, batch_size=run.config.batch_size,
                                  context=run.config.model.context,
                                  num_batches=run.config.eval_batches)
  losses = [loss(params, b) for b in batches]
  return float(np.mean(np.asarray(jax.device_get(losses), np.float64)))
