"""Train a byte-level decoder-only transformer with any jaxprune method.

One flat loop (:func:`train`) that a reader can follow top to bottom:

1. load the corpus (:mod:`jaxprune.data`; default: the Python standard
   library sources, fingerprinted), build the model
   (:class:`jaxprune.models.Transformer`) and the optimizer: AdamW with
   warmup + cosine decay and global-norm clipping, wrapped by the method
   (:func:`make_optimizer`);
2. resume from the newest readable checkpoint in ``workdir``, if any, after
   checking that the config matches;
3. step: ``loss, g = value_and_grad(...)``; ``tx.update``;
   ``optax.apply_updates`` -- the unchanged Optax loop, jitted, with the
   batch sharded over the ``data`` mesh axis;
4. every ``log_every`` steps append a line to ``workdir/metrics.jsonl``,
   every ``eval_every`` steps evaluate, every ``checkpoint_every`` steps save;
5. write ``report.json`` and ``report.md`` and print the report.

Determinism and exact resume: the batch of step ``t`` is a pure function of
``(seed, t)`` (the data position is the step), there is no dropout, and the
host-side accumulators (loss and parameter-count sums, wall time) are saved
with each checkpoint, so a run killed at any point and resumed produces
bit-identical params and metrics on CPU.

Parameter count over training: ``n_active(t)`` is the number of parameters
minus the exact zeros of the *prunable* leaves (those the run's selection
picks; none for the dense recipe) in the params that step ``t`` produces
(the sparsity the method enforces at step ``t``); the report gives its mean
over ``t = 0..T-1``, the ``N`` of Jin et al. (2025) "The Journey Matters",
counted as :func:`jaxprune.scaling.average_param_count` counts it.

Devices: a mesh with axes ``('data', 'model')``. The batch is split over
``data``; a 2-D kernel (and every optimizer-state leaf of the same shape:
masks, master weights, moments) is split over ``model`` along its output axis
when ``config.mesh.model > 1`` and it divides; everything else is replicated.
The rule depends only on a leaf's shape, which is what makes masks and master
weights shard like their parameters. With several processes (a TPU or GPU
pod, ``jax.distributed.initialize()`` before :func:`train`), every process
builds the same global batch and contributes its addressable shards.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxprune
from jaxprune import checkpoint as checkpoint_lib
from jaxprune import data as data_lib
from jaxprune.models import transformer

METHODS = ("dense", "gmp", "static_random", "set", "rigl", "nm_asp", "ste", "sr_ste", "step",
           "gradient_flow")
# Fields that may change between a run and its resumption: logging and checkpoint cadence
# (no change to the result), and the mesh (a resume on other hardware; the result then
# matches to float rounding instead of bit for bit).
RESUME_SAFE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "progress", "mesh")


def default_config() -> ml_collections.ConfigDict:
  """Every field a recipe may set; recipes start from this and change a few."""
  c = ml_collections.ConfigDict()
  c.method = "dense"
  c.seed = 0
  c.steps = 800
  c.batch_size = 32
  c.model = ml_collections.ConfigDict(dict(
      context=64, width=128, depth=2, heads=4, mlp_ratio=4, positions="learned"))
  c.data = ml_collections.ConfigDict(dict(path="", valid_fraction=0.05, include_tests=False))
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
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.progress = True                  # progress bar on a terminal (never when not a TTY).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))   # -1: all devices.
  return c


PRESETS = ("", "tiny")


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """``''``: the recipe's default size; ``'tiny'``: a seconds-long run for tests and smoke checks.

  The tiny preset keeps every method-specific field (fractions of training are
  fractions of its shorter run).
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; valid presets: {PRESETS[1:]} "
                     "(or none, for the recipe's default size).")
  if preset == "tiny":
    config.model.update(context=32, width=32, depth=1, heads=2)
    config.update(steps=40, batch_size=8, eval_every=20, eval_batches=2, log_every=10,
                  checkpoint_every=20)
    config.optimizer.warmup_steps = 5
    config.prune.frequency = 2
    config.dst.update_every = 5
  return config


def _recipes_dir() -> pathlib.Path:
  """The checkout's ``recipes/`` (an editable install), else ``./recipes``."""
  beside = pathlib.Path(__file__).resolve().parents[1] / "recipes"
  return beside if beside.is_dir() else pathlib.Path.cwd() / "recipes"


RECIPES_DIR = _recipes_dir()


def recipe_names(directory: str | os.PathLike = RECIPES_DIR) -> list[str]:
  """The recipes in ``directory`` (the repository's ``recipes/`` by default)."""
  return sorted(p.stem for p in pathlib.Path(directory).glob("*.py") if not p.stem.startswith("_"))


def load_recipe(name: str, preset: str = "", *,
                directory: str | os.PathLike = RECIPES_DIR) -> ml_collections.ConfigDict:
  """``get_config(preset)`` of ``recipes/<name>.py`` (or of a ``.py`` path)."""
  path = pathlib.Path(name) if name.endswith(".py") else pathlib.Path(directory) / f"{name}.py"
  if not path.is_file():
    raise ValueError(f"unknown recipe {name!r}; valid recipes in {directory}: "
                     f"{recipe_names(directory)}.")
  spec = importlib.util.spec_from_file_location(f"jaxprune_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def learning_rate_schedule(config) -> optax.Schedule:
  o = config.optimizer
  warmup = min(o.warmup_steps, config.steps - 1)
  return optax.warmup_cosine_decay_schedule(
      0.0, o.lr, warmup_steps=max(warmup, 1), decay_steps=max(config.steps, warmup + 1),
      end_value=o.lr * o.final_lr_fraction)


def selection(config) -> jaxprune.Selection:
  return jaxprune.select(prune_embeddings=config.prune_embeddings,
                         distribution=config.distribution)


def _decay_mask(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (+ clipping, schedule) wrapped by ``config.method`` (and QAT if asked)."""
  o, steps, sel = config.optimizer, config.steps, selection(config)
  lr = learning_rate_schedule(config)
  clip = optax.clip_by_global_norm(o.grad_clip)
  adamw = optax.chain(clip, optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                        mask=_decay_mask))
  method = config.method
  if method == "dense":
    tx = adamw
  elif method == "gmp":
    p = config.prune
    # A ramp ending at fraction 1 ends at the last step, T - 1, so that it is reached.
    begin, end = int(p.begin_fraction * steps), min(int(p.end_fraction * steps), steps - 1)
    if p.schedule not in ("polynomial", "geometric"):
      raise ValueError("`config.prune.schedule` must be one of ('polynomial', 'geometric'), "
                       f"got {p.schedule!r}.")
    schedule = (jaxprune.polynomial_schedule(0.0, config.sparsity, begin, end, power=p.power,
                                             frequency=p.frequency)
                if p.schedule == "polynomial" else
                jaxprune.geometric_schedule(config.sparsity, begin, end, frequency=p.frequency))
    pruners = {"magnitude": jaxprune.magnitude_pruning, "saliency": jaxprune.saliency_pruning,
               "random": jaxprune.random_pruning}
    if p.score not in pruners:
      raise ValueError(f"`config.prune.score` must be one of {tuple(pruners)}, got {p.score!r}.")
    if p.score == "random" and p.scope != "layer":
      raise ValueError("`config.prune.score='random'` prunes per layer; set `prune.scope='layer'`.")
    tx = pruners[p.score](adamw, schedule, select=sel,
                          **({} if p.score == "random" else {"scope": p.scope}))
  elif method == "static_random":
    tx = jaxprune.random_pruning(adamw, config.sparsity, select=sel, seed=config.seed)
  elif method in ("set", "rigl"):
    d = config.dst
    make = jaxprune.rigl if method == "rigl" else jaxprune.set_pruning
    tx = make(adamw, config.sparsity, drop_fraction=d.drop_fraction, update_every=d.update_every,
              end_step=max(int(d.end_fraction * steps), 1), select=sel, seed=config.seed)
  elif method == "nm_asp":
    tx = jaxprune.nm_pruning(adamw, config.n, config.m,
                             prune_step=int(config.one_shot_fraction * steps), select=sel)
  elif method == "ste":
    tx = jaxprune.ste(adamw, jaxprune.nm(config.n, config.m), select=sel)
  elif method == "sr_ste":
    tx = jaxprune.sr_ste(adamw, config.n, config.m, decay=config.sr_ste_decay, select=sel)
  elif method == "step":
    tx = jaxprune.step_adam(lr, config.n, config.m, b1=o.b1, b2=o.b2,
                            weight_decay=o.weight_decay, select=sel,
                            t_max=max(int(config.step_t_max_fraction * steps), 1))
    clipped = optax.chain(clip, tx)   # STEP is the whole optimizer: clip before it.
    tx = jaxprune.ViewTransformation(clipped.init, clipped.update, tx.view)
  elif method == "gradient_flow":
    g = config.gradient_flow
    tx = jaxprune.gradient_flow(
        adamw, config.n, config.m, total_steps=steps, decay=g.decay, coef=g.coef,
        dense_steps=int(g.dense_fraction * steps),
        finetune_steps=int(g.finetune_fraction * steps), select=sel)
  else:
    raise ValueError(f"`config.method` must be one of {METHODS}, got {method!r}.")
  if config.quant.format:
    tx = jaxprune.quantization(tx, config.quant.format, order=config.quant.order, select=sel)
  return tx


def make_model(config) -> transformer.Transformer:
  return transformer.Transformer(vocab_size=256, **config.model.to_dict(),
                                 rngs=nnx.Rngs(config.seed))


def check_config(config) -> None:
  """Errors that should stop a run before anything is built or written."""
  valid = set(default_config().keys())
  unknown = sorted(set(config.keys()) - valid)
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown}; valid fields: {sorted(valid)}.")
  if config.method not in METHODS:
    raise ValueError(f"`config.method` must be one of {METHODS}, got {config.method!r}.")
  for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every",
               "checkpoint_every", "keep_checkpoints"):
    if not (isinstance(config[name], int) and config[name] >= 1):
      raise ValueError(f"`config.{name}` must be an integer >= 1, got {config[name]!r}.")


# --------------------------------------------------------------------------- #
# Devices
# --------------------------------------------------------------------------- #


def make_mesh(config) -> jax.sharding.Mesh:
  """A ``('data', 'model')`` mesh over all devices (``data=-1``: what ``model`` leaves)."""
  count = jax.device_count()
  model = config.mesh.model
  data = config.mesh.data if config.mesh.data != -1 else count // max(model, 1)
  if model < 1 or data < 1 or data * model != count:
    raise ValueError(f"`config.mesh` data={config.mesh.data} x model={model} must use all "
                     f"{count} devices (data=-1 fills in what model leaves).")
  if config.batch_size % data:
    raise ValueError(f"`config.batch_size` = {config.batch_size} must be divisible by the "
                     f"{data} devices of the 'data' mesh axis.")
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, model), ("data", "model"), axis_types=axis_types)


def leaf_sharding(mesh, shape) -> NamedSharding:
  """Output axis of a 2-D leaf over ``model`` when it divides; else replicated."""
  model = mesh.shape["model"]
  if model > 1 and len(shape) == 2 and shape[1] % model == 0:
    return NamedSharding(mesh, P(None, "model"))
  return NamedSharding(mesh, P())


def state_shardings(mesh, tree):
  return jax.tree.map(lambda x: leaf_sharding(mesh, np.shape(x)), tree)


def global_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The same host batch on every process; each contributes its addressable shards."""
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


# --------------------------------------------------------------------------- #
# Loss, step, evaluation
# --------------------------------------------------------------------------- #


def loss_fn(graphdef, params, batch):
  """Mean next-byte cross-entropy (nats) of ``batch[:, :-1] -> batch[:, 1:]``."""
  logits = nnx.merge(graphdef, params)(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def count_active(params, prunable) -> jax.Array:
  """Parameters minus the exact zeros of the prunable leaves (``prunable``: bool tree)."""
  zeros = [jnp.sum(p == 0, dtype=jnp.int32) for p, s in
           zip(jax.tree.leaves(params), jax.tree.leaves(prunable), strict=True) if s]
  total = sum(int(np.size(p)) for p in jax.tree.leaves(params))
  return jnp.int32(total) - sum(zeros, jnp.int32(0))


@dataclasses.dataclass
class Accumulators:
  """Host-side sums saved with each checkpoint (JSON: Python floats round-trip exactly)."""

  loss_sum: float = 0.0
  loss_count: int = 0
  active_sum: int = 0       # sum over steps of n_active(t): exact (Python int).
  window_loss: float = 0.0  # the current log window's train loss sum and count.
  window_count: int = 0
  tokens: int = 0
  train_time: float = 0.0   # training steps, less each session's first (compiling) one.
  timed_tokens: int = 0     # the tokens of those steps.
  wall_time: float = 0.0    # everything: compilation, steps, evaluation, checkpoints.

  def add(self, fetched, elapsed: float, timed_tokens: int, tokens: int) -> None:
    for o in fetched:
      loss = float(o["loss"])
      self.loss_sum += loss
      self.loss_count += 1
      self.window_loss += loss
      self.window_count += 1
      self.active_sum += int(o["active"])
    self.tokens += tokens
    self.timed_tokens += timed_tokens
    self.train_time += elapsed
    self.wall_time += elapsed


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def _is_primary() -> bool:
  return jax.process_index() == 0


def _check_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write-test-{jax.process_index()}-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"`workdir` {str(workdir)!r} is not writable: {e}") from e


def _read_metrics(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """``'field: checkpoint a vs now b'`` for every field that differs, but RESUME_SAFE_FIELDS."""
  fields = []
  for key in sorted(set(saved) | set(current)):
    name = prefix + key
    a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
    if name in RESUME_SAFE_FIELDS:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      fields += config_diff(a, b, name + ".")
    elif a != b:
      fields.append(f"{name}: checkpoint {a!r} vs now {b!r}")
  return fields


def _progress(step: int, total: int, text: str, enabled: bool) -> None:
  if not enabled:
    return
  width = 30
  done = int(width * step / total)
  sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {text}   ")
  sys.stderr.flush()
  if step == total:
    sys.stderr.write("\n")


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) the run described by ``config`` in ``workdir``; returns the report."""
  check_config(config)
  workdir = pathlib.Path(workdir)
  _check_workdir(workdir)
  config_dict = json.loads(config.to_json())

  # Data, model, optimizer, devices.
  corpus = data_lib.load_corpus(config.data.path or None,
                                valid_fraction=config.data.valid_fraction,
                                include_tests=config.data.include_tests)
  data_lib.check_context(corpus, config.model.context)
  mesh = make_mesh(config)
  batch_sharding = NamedSharding(mesh, P("data"))
  model = make_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = make_optimizer(config)
  pruned = config.method != "dense"
  specs = jaxprune.resolve(selection(config), params, config.sparsity) if pruned else None
  prunable = jax.tree.unflatten(jax.tree.structure(params),
                                [s is not None for s in specs] if pruned else
                                [False] * len(jax.tree.leaves(params)))
  total_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
  prunable_size = sum(int(np.size(p)) for p, s in
                      zip(jax.tree.leaves(params), jax.tree.leaves(prunable), strict=True) if s)

  shardings = state_shardings(mesh, params)
  params = jax.device_put(params, shardings)
  opt_state = jax.jit(tx.init)(params)   # Master weights (STE family) start dense...
  if hasattr(tx, "view"):                 # ...and the first forward pass sees their view.
    params = tx.view(params)
  state = {"params": params, "opt_state": opt_state, "step": jnp.zeros([], jnp.int32)}
  state_sh = state_shardings(mesh, state)
  state = jax.device_put(state, state_sh)

  # Resume.
  mngr = checkpoint_lib.manager(workdir, keep=config.keep_checkpoints)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)

  def check_meta(meta):
    diff = config_diff(meta["config"], config_dict)
    if diff:
      raise ValueError("refusing to resume " + str(workdir) + " with a different config; "
                       "fields that differ:\n  " + "\n  ".join(diff) +
                       "\nUse a new --workdir, or the checkpoint's values.")
    if meta["corpus"]["sha256"] != corpus.fingerprint["sha256"]:
      raise ValueError(f"refusing to resume {workdir}: the corpus differs from the "
                       f"checkpoint's ({meta['corpus']} vs {corpus.fingerprint}).")

  restored = checkpoint_lib.restore_latest(mngr, abstract, check_meta)
  acc = Accumulators()
  metrics_path = workdir / "metrics.jsonl"
  start = 0
  if restored is not None:
    start, state, meta = restored
    acc = Accumulators(**meta["accumulators"])
    print(f"resumed from step {start} in {workdir}", file=sys.stderr)
  # Lines written after the checkpoint are recomputed identically.
  kept = [m for m in _read_metrics(metrics_path) if m["step"] <= start]
  if _is_primary():
    _write_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

  def step_fn(state, batch):
    params = state["params"]
    loss, grads = jax.value_and_grad(loss_fn, argnums=1)(graphdef, params, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    return new, {"loss": loss, "active": count_active(new_params, prunable)}

  train_step = jax.jit(step_fn, in_shardings=(state_sh, batch_sharding),
                       out_shardings=(state_sh, None), donate_argnums=0)
  eval_loss = jax.jit(lambda p, b: loss_fn(graphdef, p, b), in_shardings=(shardings,
                                                                            batch_sharding))
  valid_batches = data_lib.eval_batches(corpus.valid, batch_size=config.batch_size,
                                        context=config.model.context,
                                        num_batches=config.eval_batches)

  def evaluate(params) -> float:
    losses = [eval_loss(params, global_batch(b, batch_sharding)) for b in valid_batches]
    return float(np.mean(np.asarray(jax.device_get(losses), np.float64)))

  schedule = learning_rate_schedule(config)
  tokens_per_step = config.batch_size * config.model.context
  show = config.progress and sys.stderr.isatty() and _is_primary()
  pending, last = [], (kept[-1] if kept else {})   # A finished run only re-reports.
  mark = time.perf_counter()
  for step in range(start, config.steps):
    batch = data_lib.train_batch(corpus.train, step, batch_size=config.batch_size,
                                 context=config.model.context, seed=config.seed)
    state, out = train_step(state, global_batch(batch, batch_sharding))
    pending.append(out)
    if step == start:  # Keep compilation out of the throughput.
      jax.block_until_ready(out)
      acc.wall_time += time.perf_counter() - mark
      mark, timed_steps = time.perf_counter(), 0
    else:
      timed_steps += 1
    done = step + 1
    is_log = done % config.log_every == 0 or done == config.steps
    is_eval = done % config.eval_every == 0 or done == config.steps
    is_ckpt = done % config.checkpoint_every == 0 or done == config.steps
    if not (is_log or is_eval or is_ckpt):
      continue
    fetched = jax.device_get(pending)   # One host sync per logged window, not per step.
    pending = []
    elapsed = time.perf_counter() - mark
    acc.add(fetched, elapsed, timed_steps * tokens_per_step, len(fetched) * tokens_per_step)
    if is_log or is_eval:
      active = int(fetched[-1]["active"])
      last = {"step": done, "train_loss": acc.window_loss / acc.window_count,
              "learning_rate": float(schedule(step)), "n_active": active,
              "sparsity": (total_params - active) / prunable_size if prunable_size else 0.0,
              "tokens_per_s": timed_steps * tokens_per_step / elapsed if timed_steps else None}
      acc.window_loss, acc.window_count = 0.0, 0
      if is_eval:
        last["eval_loss"] = evaluate(state["params"])
        last["eval_perplexity"] = math.exp(last["eval_loss"])
      if _is_primary():
        with metrics_path.open("a") as f:
          f.write(json.dumps(last) + "\n")
    acc.wall_time += time.perf_counter() - mark - elapsed
    if is_ckpt:
      save_start = time.perf_counter()
      meta = {"config": config_dict, "corpus": corpus.fingerprint,
              "accumulators": dataclasses.asdict(acc), "data_position": done}
      checkpoint_lib.save(mngr, done, state, meta)
      acc.wall_time += time.perf_counter() - save_start
    _progress(done, config.steps, f"loss {last.get('train_loss', float('nan')):.3f}", show)
    mark, timed_steps = time.perf_counter(), 0

  report = make_report(config, config_dict, state["params"], corpus, acc, total_params,
                       last, pruned)
  if config.quant.format:   # Entries that could not land on the quantization grid (see qat).
    report["quant_corrections"] = int(jaxprune.quantization_corrections(state["opt_state"]))
  if _is_primary():
    _write_atomic(workdir / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(workdir / "report.md", report_markdown(report))
  return report


def make_report(config, config_dict, params, corpus, acc, total_params, last, pruned) -> dict:
  nm = (config.n, config.m) if config.method in ("nm_asp", "ste", "sr_ste", "step",
                                                  "gradient_flow") else None
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
      "tokens_per_s": acc.timed_tokens / acc.train_time if acc.train_time else None,
      "wall_time_s": acc.wall_time,
      "corpus": corpus.fingerprint,
      "devices": jax.device_count(),
      "sparsity_table": summary.as_dict(),
      "sparsity_table_text": summary.table(),
      "config": config_dict,
  }


def report_markdown(report: dict) -> str:
  keys = ("method", "steps", "eval_loss", "eval_perplexity", "eval_bits_per_byte",
          "params_total", "params_nonzero", "params_active_mean", "prunable_sparsity",
          "nm_valid", "tokens_seen", "tokens_per_s", "wall_time_s", "devices")
  lines = ["# jaxprune training report", "", "| quantity | value |", "|---|---|"]
  for k in keys:
    v = report[k]
    lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
  fp = report["corpus"]
  lines += ["", f"Corpus: {json.dumps(fp)}", "", "## Sparsity per layer", "", "```",
            report["sparsity_table_text"], "```", "", "## Config", "", "```json",
            json.dumps(report["config"], indent=2), "```", ""]
  return "\n".join(lines)
