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

On several hosts (TPU or GPU pods) run the same command on every host with
``--distributed``: it calls ``jax.distributed.initialize()`` first, which
detects Cloud TPU, SLURM, Open MPI and Kubernetes clusters; elsewhere set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. recipes/gmp.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, report.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def _field_names(config, prefix: str = "") -> list[str]:
  names = []
  for key, value in config.items():
    names += _field_names(value, f"{prefix}{key}.") if hasattr(value, "items") else [prefix + key]
  return names


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown ``--config.<field>``."""
  from jaxprune import train

  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is not None and not pathlib.Path(value.split(":", 1)[0]).is_file():
      sys.exit(f"error: unknown recipe {value!r}: no such file; valid recipes in "
               f"{train.RECIPES_DIR}: {train.recipe_names()}")
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value  # noqa: B018 -- config_flags loads lazily; surface recipe errors here.
    return rest
  except Exception as e:  # noqa: BLE001 -- config_flags raises AttributeError/KeyError/...

    valid = _field_names(train.default_config())
    unknown = [a.split("=", 1)[0][len("--config."):] for a in argv
               if a.startswith("--config.") and a.split("=", 1)[0][len("--config."):] not in valid]
    if unknown:
      sys.exit(f"error: unknown config field(s) {unknown}; valid fields:\n  " +
               "\n  ".join(valid))
    sys.exit(f"error: {type(e).__name__}: {e}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  import jax

  if _DISTRIBUTED.value:
    # JAX reads JAX_COORDINATOR_ADDRESS and detects the rest on TPU pods, SLURM, Open MPI and
    # Kubernetes, but not JAX_NUM_PROCESSES / JAX_PROCESS_ID (jax/_src/distributed.py, 0.10 and
    # 0.12): pass those on, for clusters it cannot detect (e.g. processes on one machine).
    jax.distributed.initialize(**{
        arg: int(os.environ[var]) for arg, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                   ("process_id", "JAX_PROCESS_ID"))
        if os.environ.get(var)})
  from jaxprune import train

  report = train.train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(train.report_markdown(report))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
