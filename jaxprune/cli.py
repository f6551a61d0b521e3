r"""The training command line: ``jaxprune-train``, ``python -m jaxprune.train`` or scripts/train.py.

    jaxprune-train --config gmp --workdir /tmp/gmp                   # an installed recipe by name
    jaxprune-train --config recipes/sr_ste_2of4.py:tiny --workdir /tmp/t --config.steps=200
    jaxprune-train --config gmp:small --workdir /tmp/g --config.data.format=tokens \
        --config.data.path=/data/stdlib-bpe4k

``--config`` is a recipe: a name among the installed recipes (``jaxprune/recipes``) or a
``.py`` file, with an optional preset after a colon (``:tiny``, ``:small``, ``:bf16``, joined
by ``+``); any field can be overridden with ``--config.<field>=<value>``. A run resumes
automatically from the newest checkpoint in ``--workdir``. Metrics go to
``workdir/metrics.jsonl``, the final report to ``workdir/report.{json,md}``; the report is
printed without the config (it is in both files).

Errors end the command with one line naming the field and what it accepts, exit status 1,
and no workdir is created for a config that is not valid; ``--verbose`` shows the traceback.
A run whose loss becomes NaN or infinite stops (exit status 1) and keeps its last good
checkpoint.

On several hosts (TPU or GPU pods) run the same command on every host with
``--distributed``: it calls ``jax.distributed.initialize()`` first, which detects Cloud TPU,
SLURM, Open MPI and Kubernetes clusters; elsewhere set ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe: an installed recipe's name or a .py file, e.g. gmp or "
    "recipes/gmp.py, optionally with ':preset'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, report.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])


def _field_names(config, prefix: str = "") -> list[str]:
  names = []
  for key, value in config.items():
    names += _field_names(value, f"{prefix}{key}.") if hasattr(value, "items") else [prefix + key]
  return names


def _resolve_recipe(argv: list[str]) -> list[str]:
  """``--config NAME[:preset]`` -> the installed recipe's file; exits for an unknown one."""
  from jaxprune import train_config

  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      value, place = arg.split("=", 1)[1], ("=", i)
    elif arg == "--config" and i + 1 < len(out):
      value, place = out[i + 1], ("next", i + 1)
    else:
      continue
    name, _, preset = value.partition(":")
    path = train_config.recipe_path(name)
    if path is None:
      sys.exit(f"error: --config: unknown recipe {name!r}: no such file or installed recipe; "
               f"installed recipes: {', '.join(train_config.recipe_names())}")
    resolved = str(path) + (f":{preset}" if preset else "")
    if place[0] == "=":
      out[place[1]] = f"--config={resolved}"
    else:
      out[place[1]] = resolved
  return out


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with one clear line for an unknown recipe, field or preset."""
  from jaxprune import train

  argv = _resolve_recipe(argv)
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


def _quiet_exit_noise() -> None:
  """asyncio's "Event loop is closed" at interpreter exit (Orbax's loops) is not an error."""

  class _Drop(std_logging.Filter):
    def filter(self, record):
      return "Event loop is closed" not in record.getMessage()

  std_logging.getLogger("asyncio").addFilter(_Drop())


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  _quiet_exit_noise()
  import jax

  from jaxprune import train

  try:
    if _DISTRIBUTED.value:
      # JAX reads JAX_COORDINATOR_ADDRESS and detects the rest on TPU pods, SLURM, Open MPI and
      # Kubernetes, but not JAX_NUM_PROCESSES / JAX_PROCESS_ID (jax/_src/distributed.py, 0.10
      # and 0.12): pass those on, for clusters it cannot detect (e.g. processes on one machine).
      jax.distributed.initialize(**{
          arg: int(os.environ[var]) for arg, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                     ("process_id", "JAX_PROCESS_ID"))
          if os.environ.get(var)})
    report = train.train(_CONFIG.value, _WORKDIR.value)
  except (KeyboardInterrupt, SystemExit):
    raise
  except Exception as e:  # noqa: BLE001 -- one line for the user; --verbose for the rest.
    if _VERBOSE.value:
      traceback.print_exc()
    message = str(e).strip() or type(e).__name__
    hint = "" if _VERBOSE.value else "\n(run again with --verbose for the traceback)"
    sys.stderr.write(f"error: {message}{hint}\n")
    sys.stderr.flush()
    os._exit(1)   # Skip interpreter teardown: background threads (Orbax) can only add noise.
  if jax.process_index() == 0:
    print(train.report_markdown(report, with_config=False))


def run() -> None:
  """The console entry point ``jaxprune-train``."""
  app.run(main, flags_parser=_parse_flags)
