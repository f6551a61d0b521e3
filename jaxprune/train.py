"""Train a byte-level decoder-only transformer with any jaxprune method.

One flat loop (:func:`train`) that a reader can follow top to bottom:

1. set up (:func:`setup`): load the corpus (:mod:`jaxprune.data`; default: the
   Python standard library sources, fingerprinted), build the model
   (:class:`jaxprune.models.Transformer`) and the optimizer: AdamW with
   warmup + cosine decay and global-norm clipping, wrapped by the method
   (:func:`jaxprune.train_methods.make_optimizer`); then resume from the newest
   readable checkpoint in ``workdir``, if any, after checking that the config
   matches (:func:`resume`), and compile the step (:func:`compile_step`);
2. step: ``loss, g = value_and_grad(...)``; ``tx.update``;
   ``optax.apply_updates`` -- the unchanged Optax loop, jitted, with the
   batch sharded over the ``data`` mesh axis;
3. every ``log_every`` steps append a line to ``workdir/metrics.jsonl``,
   every ``eval_every`` steps evaluate, every ``checkpoint_every`` steps save;
4. write ``report.json`` and ``report.md`` (:mod:`jaxprune.train_report`).

The config's fields, presets and recipe files are in
:mod:`jaxprune.train_config`, the devices, shardings and compilation cache in
:mod:`jaxprune.train_devices`; everything a recipe or script needs is importable
from here (``jaxprune.train.default_config``, ``load_recipe``, ``make_optimizer``, ...).

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

Start-up: brief lines on stderr say what is happening (corpus, model,
compilation); JAX's persistent compilation cache (``config.compilation_cache``)
makes a repeated run load its compiled programs instead of compiling them.
With several processes (a TPU or GPU pod, ``jax.distributed.initialize()``
before :func:`train`), every process builds the same global batch and
contributes its addressable shards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxprune
from jaxprune import checkpoint as checkpoint_lib
from jaxprune import data as data_lib
from jaxprune import tokens as tokens_lib
from jaxprune.models import transformer
from jaxprune.train_config import (
    DTYPES,
    METHODS,
    PRESETS,
    RECIPES_DIR,
    RESUME_SAFE_FIELDS,
    apply_preset,
    check_config,
    config_diff,
    default_config,
    load_recipe,
    recipe_names,
)
from jaxprune.train_devices import (
    compilation_cache,
    global_batch,
    leaf_sharding,
    make_mesh,
    state_shardings,
)
from jaxprune.train_methods import learning_rate_schedule, make_optimizer, selection
from jaxprune.train_report import (
    PEAK_FLOPS,
    make_report,
    mfu,
    model_flops_per_token,
    peak_flops,
    report_markdown,
)

# What recipes, scripts and tests use from here (defined here or in the train_* modules).
__all__ = [
    "DTYPES", "METHODS", "PEAK_FLOPS", "PRESETS", "RECIPES_DIR", "RESUME_SAFE_FIELDS",
    "Accumulators", "apply_preset", "check_config", "compilation_cache", "compile_step",
    "config_diff", "count_active", "default_config", "evaluate_loss", "global_batch",
    "leaf_sharding", "learning_rate_schedule", "load_corpus", "load_recipe", "loss_fn",
    "make_mesh", "make_model", "make_optimizer", "make_report", "mfu", "model_flops_per_token",
    "peak_flops", "recipe_names", "report_markdown", "resume", "selection", "setup",
    "state_shardings", "train", "TrainingDiverged", "perplexity", "vocab_size", "token_bytes",
]


def vocab_size(config) -> int:
  """256 for a byte corpus; the tokenizer's vocabulary for a token corpus (``data.format``).

  A config saved before ``data.format`` existed (e.g. in an older sweep CSV) is a byte corpus.
  """
  if config.data.get("format", "bytes") != "tokens":
    return 256
  return tokens_lib.vocabulary(config.data.path)


def make_model(config, vocab: int | None = None) -> transformer.Transformer:
  """The config's transformer; ``vocab`` defaults to :func:`vocab_size` of the config's data."""
  return transformer.Transformer(vocab_size=vocab_size(config) if vocab is None else vocab,
                                 **config.model.to_dict(), rngs=nnx.Rngs(config.seed))


def loss_fn(graphdef, params, batch):
  """Mean next-byte cross-entropy (nats) of ``batch[:, :-1] -> batch[:, 1:]``, in float32."""
  logits = nnx.merge(graphdef, params)(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# One compilation per model and mesh, shared by every run in the process (e.g. a sweep).
evaluate_loss = jax.jit(loss_fn, static_argnums=0)


def count_active(params, prunable) -> jax.Array:
  """Parameters minus the exact zeros of the prunable leaves (``prunable``: bool tree)."""
  zeros = [jnp.sum(p == 0, dtype=jnp.int32) for p, s in
           zip(jax.tree.leaves(params), jax.tree.leaves(prunable), strict=True) if s]
  total = sum(int(np.size(p)) for p in jax.tree.leaves(params))
  return jnp.int32(total) - sum(zeros, jnp.int32(0))


@functools.lru_cache(maxsize=2)
def load_corpus(path: str, valid_fraction: float, include_tests: bool,
                format: str = "bytes") -> data_lib.Corpus | tokens_lib.TokenCorpus:  # noqa: A002
  """The run's corpus, read once per process for the same arguments.

  ``format='bytes'``: :func:`jaxprune.data.load_corpus`; ``'tokens'``:
  :func:`jaxprune.tokens.load_token_corpus` of the directory ``path`` (its files
  are checked and fingerprinted; ``valid_fraction`` and ``include_tests`` do not
  apply, the split is the files').
  """
  if format == "tokens":
    if not path:
      raise ValueError("`config.data.format='tokens'` needs `config.data.path`: a directory "
                       "written by scripts/prepare_data.py (train.bin, val.bin, tokenizer.json).")
    return tokens_lib.load_token_corpus(path)
  return data_lib.load_corpus(path or None, valid_fraction=valid_fraction,
                              include_tests=include_tests)


def token_bytes(corpus) -> np.ndarray | None:
  """Bytes per token id of a token corpus (None for bytes: one byte each)."""
  return getattr(corpus, "token_bytes", None)


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
# Files and messages
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
  """The metric lines of ``path``; a torn or garbled line is dropped with a warning.

  A kill during an append can leave the last line without its end (or, on some
  file systems, a run of NUL bytes): such lines are not records of a step and
  are recomputed by the resumed run, which rewrites the file whole.
  """
  if not path.exists():
    return []
  records, dropped = [], []
  for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
    if not line.strip("\x00 \t"):
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not a metrics record")
      records.append(record)
    except ValueError:
      dropped.append(number)
  if dropped:
    warnings.warn(f"{path}: dropped {len(dropped)} torn or unreadable line(s) (line "
                  f"{', '.join(map(str, dropped[:5]))}); the resumed run recomputes them.",
                  stacklevel=2)
  return records


def _append_line(path: pathlib.Path, record: dict) -> None:
  """Appends one whole JSON line and syncs it to disk before the run goes on."""
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _progress(step: int, total: int, text: str, enabled: bool) -> None:
  if not enabled:
    return
  width = 30
  done = int(width * step / total)
  sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {text}   ")
  sys.stderr.flush()
  if step == total:
    sys.stderr.write("\n")


def _say(message: str) -> None:
  """A start-up line on stderr (primary process only)."""
  if _is_primary():
    print(f"jaxprune: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# Set-up
# --------------------------------------------------------------------------- #


class Setup(NamedTuple):
  """What the loop needs, built once per run by :func:`setup`."""

  corpus: data_lib.Corpus
  graphdef: Any
  tx: optax.GradientTransformation
  state: dict                    # params, opt_state, step: placed on the mesh.
  state_sh: Any                  # their shardings.
  batch_sharding: NamedSharding
  pruned: bool                   # the method prunes (not the dense recipe).
  prunable: Any                  # bool tree: the leaves the selection prunes.
  total_params: int
  prunable_size: int


def setup(config) -> Setup:
  """Corpus, mesh, model, optimizer and the initial state (params and optimizer state)."""
  start = time.perf_counter()
  _say(f"loading the corpus ({config.data.path or 'the Python standard library'}, "
       f"{config.data.format}) ...")
  corpus = load_corpus(config.data.path, config.data.valid_fraction, config.data.include_tests,
                       config.data.format)
  fp = corpus.fingerprint
  if config.data.format == "tokens":
    tokens_lib.check_context(corpus, config.model.context)
    size = (f"{fp['train_tokens'] + fp['valid_tokens']:,} tokens, vocabulary "
            f"{corpus.vocab_size:,}")
  else:
    data_lib.check_context(corpus, config.model.context)
    size = f"{fp['num_files']} files, {fp['num_bytes'] / 1e6:.1f} MB"
  _say(f"corpus: {size} ({time.perf_counter() - start:.1f} s); "
       "building the model and the optimizer ...")
  start = time.perf_counter()
  mesh = make_mesh(config)
  graphdef, params = nnx.split(make_model(config, getattr(corpus, "vocab_size", 256)), nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = make_optimizer(config)
  pruned = config.method != "dense"
  specs = jaxprune.resolve(selection(config), params, config.sparsity) if pruned else None
  leaves = jax.tree.leaves(params)
  prunable = jax.tree.unflatten(jax.tree.structure(params),
                                [s is not None for s in specs] if pruned else [False] * len(leaves))
  prunable_size = sum(int(np.size(p)) for p, s in
                      zip(leaves, jax.tree.leaves(prunable), strict=True) if s)
  params = jax.device_put(params, state_shardings(mesh, params))
  opt_state = jax.jit(tx.init)(params)   # Master weights (STE family) start dense...
  if hasattr(tx, "view"):                 # ...and the first forward pass sees their view.
    params = tx.view(params)
  state = {"params": params, "opt_state": opt_state, "step": jnp.zeros([], jnp.int32)}
  state_sh = state_shardings(mesh, state)
  total = sum(int(np.size(p)) for p in leaves)
  _say(f"model: {total:,} parameters ({config.model.dtype} compute, {config.model.param_dtype} "
       f"params), method {config.method} ({time.perf_counter() - start:.1f} s)")
  return Setup(corpus, graphdef, tx, jax.device_put(state, state_sh), state_sh,
               NamedSharding(mesh, P("data")), pruned, prunable, total, prunable_size)


def resume(config, config_dict: dict, workdir: pathlib.Path, s: Setup):
  """``(start, state, accumulators, kept metric lines, checkpoint manager)``.

  Restores the newest readable checkpoint in ``workdir`` (after checking that its
  config and corpus are this run's) and drops the metric lines written after it,
  which the loop recomputes identically.
  """
  mngr = checkpoint_lib.manager(workdir, keep=config.keep_checkpoints)
  abstract = jax.tree.map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), s.state, s.state_sh)

  def check_meta(meta):
    diff = config_diff(meta["config"], config_dict)
    if diff:
      raise ValueError("refusing to resume " + str(workdir) + " with a different config; "
                       "fields that differ:\n  " + "\n  ".join(diff) +
                       "\nUse a new --workdir, or the checkpoint's values.")
    if meta["corpus"]["sha256"] != s.corpus.fingerprint["sha256"]:
      raise ValueError(f"refusing to resume {workdir}: the corpus differs from the "
                       f"checkpoint's ({meta['corpus']} vs {s.corpus.fingerprint}).")

  restored = checkpoint_lib.restore_latest(mngr, abstract, check_meta,
                                           required_keys=("config", "corpus", "accumulators"))
  start, state, acc = 0, s.state, Accumulators()
  if restored is not None:
    start, state, meta = restored
    acc = Accumulators(**meta["accumulators"])
    print(f"resumed from step {start} in {workdir}", file=sys.stderr)
  metrics_path = workdir / "metrics.jsonl"
  kept = [m for m in _read_metrics(metrics_path) if m["step"] <= start]
  if _is_primary():
    _write_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))
  return start, state, acc, kept, mngr


def compile_step(s: Setup, state, batch):
  """The train step, compiled ahead of time for ``state`` and ``batch``; and the seconds taken.

  ``state, out = step(state, batch)``, ``out`` the step's loss and ``n_active``.
  """
  graphdef, tx, prunable = s.graphdef, s.tx, s.prunable

  def step_fn(state, batch):
    params = state["params"]
    loss, grads = jax.value_and_grad(loss_fn, argnums=1)(graphdef, params, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
    return new, {"loss": loss, "active": count_active(new_params, prunable)}

  start = time.perf_counter()
  step = jax.jit(step_fn, in_shardings=(s.state_sh, s.batch_sharding),
                 out_shardings=(s.state_sh, None), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def _window_record(acc, fetched, done, step, schedule, s: Setup, timed_tokens, elapsed) -> dict:
  """The metrics line of a log window that ends at step ``done``."""
  active = int(fetched[-1]["active"])
  record = {"step": done, "train_loss": acc.window_loss / acc.window_count,
            "learning_rate": float(schedule(step)), "n_active": active,
            "sparsity": (s.total_params - active) / s.prunable_size if s.prunable_size else 0.0,
            "tokens_per_s": timed_tokens / elapsed if timed_tokens else None}
  acc.window_loss, acc.window_count = 0.0, 0
  return record


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; nothing from that point on was saved."""


def perplexity(loss: float | None) -> float | None:
  """``exp(loss)``, and ``inf`` where that overflows a float (loss above ~709.78)."""
  if loss is None:
    return None
  try:
    return math.exp(loss)
  except OverflowError:
    return math.inf


def _check_finite(what: str, value: float, step: int, config, workdir, saved: int) -> None:
  if math.isfinite(value):
    return
  lr = float(learning_rate_schedule(config)(max(step - 1, 0)))
  kept = (f"the last good checkpoint (step {saved}) is kept in {workdir}" if saved else
          "no checkpoint had been written yet")
  raise TrainingDiverged(
      f"training diverged: the {what} is {value} at step {step} (learning rate {lr:.3g}); "
      f"nothing from this step on was saved, and {kept}. Lower `config.optimizer.lr` (now "
      f"{config.optimizer.lr}) or raise `config.optimizer.warmup_steps`, then resume or start "
      "a new --workdir.")


class _Evaluator(NamedTuple):
  """Validation loss per token and per byte on fixed batches (see :mod:`jaxprune.tokens`)."""

  batches: np.ndarray
  bytes_per_target: float     # mean bytes behind a target token of these batches (1 for bytes)

  def __call__(self, s: Setup, params) -> dict:
    losses = [evaluate_loss(s.graphdef, params, global_batch(b, s.batch_sharding))
              for b in self.batches]
    loss = float(np.mean(np.asarray(jax.device_get(losses), np.float64)))
    per_byte = loss / self.bytes_per_target
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss),
            "eval_loss_per_byte": per_byte, "eval_bits_per_byte": per_byte / math.log(2)}


def _evaluator(config, corpus) -> _Evaluator:
  batches = data_lib.eval_batches(corpus.valid, batch_size=config.batch_size,
                                  context=config.model.context, num_batches=config.eval_batches)
  widths = token_bytes(corpus)
  per_target = 1.0 if widths is None else float(np.mean(widths[batches[..., 1:]]))
  return _Evaluator(batches, per_target)


def _eta(acc, done: int, total: int, tokens_per_step: int) -> str:
  if not acc.train_time or not acc.timed_tokens:
    return "?"
  seconds = (total - done) * tokens_per_step * acc.train_time / acc.timed_tokens
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _log(done: int, config, last: dict, acc, tokens_per_step: int, bar: bool) -> None:
  """The progress bar on a terminal; else one plain line per log window (SLURM, nohup, CI)."""
  if not (config.progress and _is_primary()):
    return
  rate = last.get("tokens_per_s")
  parts = [f"loss {last.get('train_loss', float('nan')):.4f}"]
  if "eval_loss" in last:
    parts.append(f"eval {last['eval_loss']:.4f}")
  parts += [f"sparsity {last.get('sparsity', 0.0):.1%}",
            f"{rate / 1e3:,.1f}k tok/s" if rate else "- tok/s",
            f"ETA {_eta(acc, done, config.steps, tokens_per_step)}"]
  if bar:
    _progress(done, config.steps, " | ".join(parts), True)
  else:
    print(f"jaxprune: step {done}/{config.steps} " + " | ".join(parts), file=sys.stderr,
          flush=True)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) the run described by ``config`` in ``workdir``; returns the report.

  Nothing is written before the config, the corpus, the model and the optimizer
  are known to be valid. A NaN or infinite loss stops the run with
  :class:`TrainingDiverged` before anything of that step is saved.
  """
  check_config(config)
  workdir = pathlib.Path(workdir)
  config_dict = json.loads(config.to_json())
  with compilation_cache(config.compilation_cache) as cache:
    s = setup(config)
    _check_workdir(workdir)
    start, state, acc, kept, mngr = resume(config, config_dict, workdir, s)

    def batch_at(step):
      return global_batch(data_lib.train_batch(s.corpus.train, step, batch_size=config.batch_size,
                                               context=config.model.context, seed=config.seed),
                          s.batch_sharding)

    compile_s = None
    if start < config.steps:
      _say("compiling the train step" + (f" (cache: {cache})" if cache else "") + " ...")
      train_step, compile_s = compile_step(s, state, batch_at(start))
      _say(f"compiled in {compile_s:.1f} s; training steps {start + 1}..{config.steps}")
      acc.wall_time += compile_s
    evaluate = _evaluator(config, s.corpus)
    schedule = learning_rate_schedule(config)
    tokens_per_step = config.batch_size * config.model.context
    bar = sys.stderr.isatty()
    metrics_path = workdir / "metrics.jsonl"
    pending, last = [], (kept[-1] if kept else {})   # A finished run only re-reports.
    saved = start
    mark = time.perf_counter()
    for step in range(start, config.steps):
      state, out = train_step(state, batch_at(step))
      pending.append(out)
      if step == start:  # Keep the first (warm-up) step out of the throughput.
        jax.block_until_ready(out)
        acc.wall_time += time.perf_counter() - mark
        mark, timed_steps = time.perf_counter(), 0
      else:
        timed_steps += 1
      done = step + 1
      is_log = done % config.log_every == 0 or done == config.steps
      is_eval = done % config.eval_every == 0 or done == config.steps
      is_ckpt = config.checkpoint_every > 0 and (
          done % config.checkpoint_every == 0 or done == config.steps)
      if not (is_log or is_eval or is_ckpt):
        continue
      fetched = jax.device_get(pending)   # One host sync per logged window, not per step.
      pending = []
      for k, o in enumerate(fetched):
        _check_finite("train loss", float(o["loss"]), done - len(fetched) + k + 1, config,
                      workdir, saved)
      elapsed = time.perf_counter() - mark
      acc.add(fetched, elapsed, timed_steps * tokens_per_step, len(fetched) * tokens_per_step)
      if is_log or is_eval:
        last = _window_record(acc, fetched, done, step, schedule, s,
                              timed_steps * tokens_per_step, elapsed)
        if is_eval:
          last.update(evaluate(s, state["params"]))
          _check_finite("validation loss", last["eval_loss"], done, config, workdir, saved)
        if _is_primary():
          _append_line(metrics_path, last)
        _log(done, config, last, acc, tokens_per_step, bar)
      acc.wall_time += time.perf_counter() - mark - elapsed
      if is_ckpt:
        save_start = time.perf_counter()
        meta = {"config": config_dict, "corpus": s.corpus.fingerprint,
                "accumulators": dataclasses.asdict(acc), "data_position": done}
        checkpoint_lib.save(mngr, done, state, meta)
        saved = done
        acc.wall_time += time.perf_counter() - save_start
      mark, timed_steps = time.perf_counter(), 0
    mngr.close()
    if "eval_loss" not in last:   # A finished run whose metrics.jsonl was lost: recompute.
      last = _recovered(s, state, evaluate, config.steps)
    return _finish(config, config_dict, workdir, s, state, acc, last, compile_s)


def _recovered(s: Setup, state, evaluate, steps: int) -> dict:
  """The final record of a finished run rebuilt from its checkpoint (its metrics log is gone)."""
  _say("metrics.jsonl has no final record: the final evaluation and parameter count are "
       "recomputed from the checkpoint; the last window's train loss cannot be recovered.")
  active = int(jax.device_get(count_active(state["params"], s.prunable)))
  record = {"step": steps, "n_active": active, "recovered": True,
            "unrecoverable": ["final_train_loss", "learning_rate"],
            "sparsity": (s.total_params - active) / s.prunable_size if s.prunable_size else 0.0}
  record.update(evaluate(s, state["params"]))
  return record


def _finish(config, config_dict, workdir, s: Setup, state, acc, last, compile_s) -> dict:
  """Writes ``report.json`` and ``report.md``; returns the report."""
  report = make_report(config, config_dict, state["params"], s.corpus, acc, s.total_params,
                       last, s.pruned, compile_s, opt_state=state["opt_state"])
  if config.quant.format:   # Entries that could not land on the quantization grid (see qat).
    report["quant_corrections"] = int(jaxprune.quantization_corrections(state["opt_state"]))
  if _is_primary():
    _write_atomic(workdir / "report.json", json.dumps(report, indent=2) + "\n")
    _write_atomic(workdir / "report.md", report_markdown(report))
  return report


if __name__ == "__main__":   # python -m jaxprune.train: the command line of jaxprune.cli.
  from jaxprune import cli

  cli.run()
