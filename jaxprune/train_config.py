"""The training recipes' configs: every field, the presets, the recipe files, validation.

A recipe (``recipes/<name>.py``) is a ``get_config(preset)`` that starts from
:func:`default_config`, sets a few fields and applies :func:`apply_preset`.
The command line overrides any field (``--config.model.width=256``).

Presets (``recipes/gmp.py:small``; several joined by ``+``, applied left to
right, e.g. ``:tiny+bf16``):

* ``tiny``: a seconds-long run for tests and smoke checks (width 32, 1 layer,
  context 32, 40 steps of 8 sequences).
* ``bf16``: bfloat16 compute with float32 parameters (``model.dtype`` and
  ``model.param_dtype``), at the recipe's size. Logits, softmax and loss stay
  float32 (see :mod:`jaxprune.models.transformer`).
* ``small``: one accelerator, about 20M parameters: width 512, 6 layers, 8 heads,
  context 256, batch 64, bfloat16 compute; 19,308,800 parameters.
* ``base``: GPT-2-small-like at byte vocabulary: width 768, 12 layers, 12 heads,
  context 1024, batch 32, bfloat16 compute; 86,235,904 parameters (GPT-2 small
  has 124M with its 50,257-token vocabulary).

Every preset keeps the method-specific fields: fractions of training are
fractions of the preset's run.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib

import ml_collections

METHODS = ("dense", "gmp", "static_random", "set", "rigl", "nm_asp", "ste", "sr_ste", "step",
           "gradient_flow")
#: Dtype names for ``model.dtype`` (compute) and ``model.param_dtype`` (storage).
DTYPES = ("float32", "bfloat16")
#: ``data.format``: a byte corpus, or a token corpus directory (:mod:`jaxprune.tokens`).
DATA_FORMATS = ("bytes", "tokens")
PRESETS = ("", "tiny", "bf16", "small", "base")
# Fields that may change between a run and its resumption: logging and checkpoint cadence
# (no change to the result), the mesh (a resume on other hardware; the result then
# matches to float rounding instead of bit for bit), and what only affects start-up or reporting.
RESUME_SAFE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "progress", "mesh",
                      "compilation_cache", "peak_flops")


def default_config() -> ml_collections.ConfigDict:
  """Every field a recipe may set; recipes start from this and change a few."""
  c = ml_collections.ConfigDict()
  c.method = "dense"
  c.seed = 0
  c.steps = 800
  c.batch_size = 32
  # dtype: compute; param_dtype: storage (see jaxprune.models.transformer).
  c.model = ml_collections.ConfigDict(dict(
      context=64, width=128, depth=2, heads=4, mlp_ratio=4, positions="learned",
      dtype="float32", param_dtype="float32"))
  # format 'bytes': the text under `path` (default: the Python standard library) as bytes;
  # 'tokens': a token corpus directory (scripts/prepare_data.py, jaxprune.tokens) at `path`.
  c.data = ml_collections.ConfigDict(dict(path="", valid_fraction=0.05, include_tests=False,
                                          format="bytes"))
  # AdamW with linear warmup and cosine decay to lr * final_lr_fraction.
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=50, final_lr_fraction=0.1, b1=0.9, b2=0.99, weight_decay=0.1,
      grad_clip=1.0))
  # Which parameters are pruned: jaxprune.select(prune_embeddings=..., distribution=...).
  c.prune_embeddings = False
  c.distribution = "uniform"
  # Unstructured methods (gmp): final sparsity and the ramp as fractions of training.
  c.sparsity = 0.75
  # schedule: 'polynomial' (Zhu-Gupta, `power`) or 'geometric' (Jin et al. 2025); scope: 'layer'
  # or 'global' (one magnitude threshold across the pruned kernels).
  c.prune = ml_collections.ConfigDict(dict(
      begin_fraction=0.25, end_fraction=0.75, frequency=10, power=3.0, score="magnitude",
      schedule="polynomial", scope="layer"))
  # Unstructured sparse from the start (static_random, set, rigl) at `sparsity`; set and rigl
  # move connections every `update_every` steps until `end_fraction` of training.
  c.dst = ml_collections.ConfigDict(dict(drop_fraction=0.3, update_every=50, end_fraction=0.75))
  # N:M methods.
  c.n = 2
  c.m = 4
  c.one_shot_fraction = 0.5          # nm_asp: dense until this fraction, then the 2:4 mask.
  c.sr_ste_decay = 2e-4              # sr_ste: lambda_W.
  c.step_t_max_fraction = 0.25       # step: AutoSwitch forced by this fraction of training.
  c.gradient_flow = ml_collections.ConfigDict(dict(
      decay="exp", coef=ml_collections.config_dict.placeholder(float),  # None: b_end = 0.01
      dense_fraction=0.0, finetune_fraction=0.1))
  # Quantization-aware training on top of the method ('' = none).
  c.quant = ml_collections.ConfigDict(dict(format="", order="sq"))
  c.eval_every = 200
  c.eval_batches = 16
  c.log_every = 25
  c.checkpoint_every = 200           # 0: never (benchmarks); the run cannot resume then.
  c.keep_checkpoints = 2
  c.progress = True                  # progress bar on a terminal (never when not a TTY).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))   # -1: all devices.
  # JAX's persistent compilation cache: '' = $JAXPRUNE_CACHE_DIR or ~/.cache/jaxprune/jax_cache
  # (unless JAX already has one), 'off' = leave JAX's setting alone, else a directory.
  c.compilation_cache = ""
  # Peak dense FLOP/s of one device for the report's MFU; 0: look the device up in
  # jaxprune.train_report.PEAK_FLOPS (unknown devices, e.g. CPUs, get no MFU).
  c.peak_flops = 0.0
  # Dense and gmp only: learning-rate and pruning-schedule numbers live in the optimizer state
  # (optax.inject_hyperparams), so runs of one model size share a compiled program (sweeps).
  c.share_compilation = False
  return c


def _tiny(config: ml_collections.ConfigDict) -> None:
  config.model.update(context=32, width=32, depth=1, heads=2)
  config.update(steps=40, batch_size=8, eval_every=20, eval_batches=2, log_every=10,
                checkpoint_every=20)
  config.optimizer.warmup_steps = 5
  config.prune.frequency = 2
  config.dst.update_every = 5


def _bf16(config: ml_collections.ConfigDict) -> None:
  config.model.update(dtype="bfloat16", param_dtype="float32")


def _small(config: ml_collections.ConfigDict) -> None:
  config.model.update(context=256, width=512, depth=6, heads=8)
  _bf16(config)
  config.update(steps=2000, batch_size=64, eval_every=500, eval_batches=16, log_every=50,
                checkpoint_every=1000)
  config.optimizer.update(lr=1e-3, warmup_steps=100)


def _base(config: ml_collections.ConfigDict) -> None:
  config.model.update(context=1024, width=768, depth=12, heads=12)
  _bf16(config)
  config.update(steps=5000, batch_size=32, eval_every=1000, eval_batches=16, log_every=50,
                checkpoint_every=1000)
  config.optimizer.update(lr=6e-4, warmup_steps=200)


_PRESET_FNS = {"tiny": _tiny, "bf16": _bf16, "small": _small, "base": _base}


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """Applies ``preset`` (see the module docstring; ``''``: the recipe's own size).

  Several presets may be joined by ``+`` and are applied left to right
  (``'tiny+bf16'``).
  """
  for name in [p for p in preset.split("+") if p] if preset else []:
    if name not in _PRESET_FNS:
      raise ValueError(f"unknown preset {name!r}; valid presets: {PRESETS[1:]} "
                       "(or none, for the recipe's default size), joined by '+'.")
    _PRESET_FNS[name](config)
  return config


#: The recipes shipped with the package (``jaxprune/recipes/``; ``recipes/`` in a checkout).
RECIPES_DIR = pathlib.Path(__file__).resolve().parent / "recipes"


def recipe_names(directory: str | os.PathLike = RECIPES_DIR) -> list[str]:
  """The recipes in ``directory`` (the repository's ``recipes/`` by default)."""
  return sorted(p.stem for p in pathlib.Path(directory).glob("*.py") if not p.stem.startswith("_"))


def recipe_path(name: str, directory: str | os.PathLike = RECIPES_DIR) -> pathlib.Path | None:
  """The file of recipe ``name`` (a path to a ``.py`` file, or a name in ``directory``)."""
  path = pathlib.Path(name)
  if path.suffix == ".py":
    return path if path.is_file() else None
  path = pathlib.Path(directory) / f"{name}.py"
  return path if path.is_file() and not name.startswith("_") else None


def load_recipe(name: str, preset: str = "", *,
                directory: str | os.PathLike = RECIPES_DIR) -> ml_collections.ConfigDict:
  """``get_config(preset)`` of ``recipes/<name>.py`` (or of a ``.py`` path)."""
  path = recipe_path(name, directory)
  if path is None:
    raise ValueError(f"unknown recipe {name!r}; valid recipes in {directory}: "
                     f"{recipe_names(directory)}.")
  spec = importlib.util.spec_from_file_location(f"jaxprune_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def _number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


# (field, predicate, the allowed values in words). Checked in order, before anything is built:
# a value outside these ranges would crash later, or silently turn the method off (an ASP
# mask at 150% of training is never applied; a DST end before the start never moves a weight).
_RULES = (
    ("steps", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("eval_every", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("eval_batches", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("log_every", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("keep_checkpoints", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("checkpoint_every", lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: never save)"),
    ("peak_flops", lambda v: _number(v) and v >= 0,
     "a number >= 0 (FLOP/s of one device; 0: look the device up)"),
    ("sparsity", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("n", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("m", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("one_shot_fraction", lambda v: _number(v) and 0 <= v < 1,
     "a fraction of training in [0, 1) (at 1 or later the mask is never applied)"),
    ("sr_ste_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("step_t_max_fraction", lambda v: _number(v) and 0 < v <= 1,
     "a fraction of training in (0, 1]"),
    ("prune.begin_fraction", lambda v: _number(v) and 0 <= v < 1, "a fraction in [0, 1)"),
    ("prune.end_fraction", lambda v: _number(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    ("prune.frequency", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("prune.power", lambda v: _number(v) and v > 0, "a number > 0"),
    ("dst.drop_fraction", lambda v: _number(v) and 0 <= v <= 1, "a fraction in [0, 1]"),
    ("dst.update_every", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("dst.end_fraction", lambda v: _number(v) and 0 < v <= 1,
     "a fraction of training in (0, 1] (at 0 or below no connection ever moves)"),
    ("gradient_flow.dense_fraction", lambda v: _number(v) and 0 <= v < 1, "a fraction in [0, 1)"),
    ("gradient_flow.finetune_fraction", lambda v: _number(v) and 0 <= v < 1,
     "a fraction in [0, 1)"),
    ("gradient_flow.coef", lambda v: v is None or (_number(v) and v > 0),
     "a number > 0, or None (scaled to the sparse window)"),
    ("optimizer.lr", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("optimizer.warmup_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("optimizer.final_lr_fraction", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("optimizer.b1", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.b2", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    ("optimizer.grad_clip", lambda v: _number(v) and v > 0, "a finite number > 0"),
    ("data.valid_fraction", lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    ("data.format", lambda v: v in DATA_FORMATS, f"one of {DATA_FORMATS}"),
    ("model.dtype", lambda v: v in DTYPES, f"one of {DTYPES}"),
    ("model.param_dtype", lambda v: v in DTYPES, f"one of {DTYPES}"),
)


def _value(config, name: str):
  for part in name.split("."):
    config = config[part]
  return config


def check_config(config) -> None:
  """Errors that should stop a run before anything is built or written.

  Every field is checked against its range (:data:`_RULES`), and the fields that
  work together: ``n <= m``, a GMP ramp that begins before it ends, gradient
  flow's dense and fine-tune phases that leave room for the sparse window.
  """
  valid = set(default_config().keys())
  unknown = sorted(set(config.keys()) - valid)
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(valid)}.")
  if config.method not in METHODS:
    raise ValueError(f"`config.method` must be one of {METHODS}, got {config.method!r}.")
  for name, ok, allowed in _RULES:
    value = _value(config, name)
    if not ok(value):
      raise ValueError(f"`config.{name}` must be {allowed}, got {value!r}.")
  if config.n > config.m:
    raise ValueError(f"`config.n` must be in [1, config.m] = [1, {config.m}], got {config.n}.")
  if config.prune.begin_fraction >= config.prune.end_fraction:
    raise ValueError(f"`config.prune.begin_fraction` ({config.prune.begin_fraction}) must be "
                     f"below `config.prune.end_fraction` ({config.prune.end_fraction}).")
  g = config.gradient_flow
  if g.dense_fraction + g.finetune_fraction >= 1:
    raise ValueError(f"`config.gradient_flow.dense_fraction` + `finetune_fraction` = "
                     f"{g.dense_fraction + g.finetune_fraction} must be below 1: nothing is "
                     "left for the sparse window.")


def _default_at(name: str):
  value = default_config().to_dict()
  for part in name.split("."):
    if not isinstance(value, dict) or part not in value:
      return "<missing>"
    value = value[part]
  return value


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """``'field: checkpoint a vs now b'`` for every field that differs, but RESUME_SAFE_FIELDS.

  A field missing from a checkpoint written before the field existed counts as its default.
  """
  fields = []
  for key in sorted(set(saved) | set(current)):
    name = prefix + key
    a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
    if name in RESUME_SAFE_FIELDS or (key not in saved and b == _default_at(name)):
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      fields += config_diff(a, b, name + ".")
    elif a != b:
      fields.append(f"{name}: checkpoint {a!r} vs now {b!r}")
  return fields
