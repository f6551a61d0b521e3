r"""Train a tiny byte-level transformer LM with a jaxprune method and report.

    python scripts/train.py --config recipes/gmp.py --workdir /tmp/gmp
    python scripts/train.py --config recipes/sr_ste_2of4.py:tiny --workdir /tmp/t \
        --config.steps=200 --config.optimizer.lr=1e-3

``--config`` is a recipe file (``recipes/*.py``) with an optional preset
after a colon (``:tiny``, a seconds-long run for tests); any field can be
overridden with ``--config.<field>=<value>``. A run resumes automatically
from the newest checkpoint in ``--workdir``. Metrics go to
``workdir/metrics.jsonl``, the final report to ``workdir/report.{json,md}``
and to stdout.

On several hosts (TPU or GPU pods) pass ``--distributed``: every process
calls ``jax.distributed.initialize()`` (which reads the cluster from the
environment) before training and runs the same command.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. recipes/gmp.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, report.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  import jax

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from jaxprune import train

  report = train.train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(train.report_markdown(report))


if __name__ == "__main__":
  app.run(main)
