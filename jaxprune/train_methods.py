"""The optimizer a training config names: AdamW (warmup, cosine decay, clipping) and the method.

:func:`make_optimizer` is the one place where ``config.method`` becomes a
jaxprune transform, with the recipes' settings (fractions of training turned
into steps). The pruned parameters are the attention and MLP kernels
(:func:`selection`); embeddings, the output head, biases and LayerNorms stay
dense.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import jaxprune
from jaxprune import schedules as schedules_lib
from jaxprune.train_config import METHODS


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to ``lr``, then cosine decay to ``lr * final_lr_fraction``."""
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


def _gmp(config, adamw, sel):
  p, steps = config.prune, config.steps
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
  return pruners[p.score](adamw, schedule, select=sel,
                          **({} if p.score == "random" else {"scope": p.scope}))


def warmup_cosine(count, peak, warmup, total, final_fraction):
  """``optax.warmup_cosine_decay_schedule(0, peak, warmup, total, peak * final_fraction)``.

  Written with array arithmetic only, so every number may be traced (optax's
  checks ``decay_steps > 0`` on the host). ``warmup >= 1`` and ``total > warmup``.
  """
  count = jnp.asarray(count, jnp.float32)
  warmup = jnp.asarray(warmup, jnp.float32)
  total = jnp.asarray(total, jnp.float32)
  ramp = peak * jnp.minimum(count, warmup) / warmup
  t = jnp.clip(count - warmup, 0.0, total - warmup) / (total - warmup)
  decayed = peak * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
  return jnp.where(count < warmup, ramp, decayed)


def _shared(config, sel, adamw_of) -> optax.GradientTransformation:
  """Dense or GMP whose run-specific numbers are optimizer state, not program constants.

  ``optax.inject_hyperparams`` keeps the peak learning rate, the warm-up and run
  length, the final sparsity and the ramp's steps in the state and rebuilds the
  transform from them inside every update, so runs that differ only in these
  (and in the seed) lower to the same program and share one compilation through
  JAX's persistent cache: a sweep compiles once per model size and method. The
  pruning counts are then ``round(s_t * size)`` in float32 under ``jit``
  (:func:`jaxprune.masks.num_pruned`) rather than the exact host count; they can
  differ by one weight per layer at some updates.
  """
  o, p, steps = config.optimizer, config.prune, config.steps
  warmup = max(min(o.warmup_steps, steps - 1), 1)
  method, kind = config.method, p.schedule

  def factory(peak_lr, warmup, total, sparsity, begin, end, frequency):
    adamw = adamw_of(lambda count: warmup_cosine(count, peak_lr, warmup, total,
                                                 o.final_lr_fraction))
    if method == "dense":
      return adamw
    if kind == "polynomial":
      schedule = schedules_lib.PolynomialSchedule(0.0, sparsity, begin, end, p.power, frequency)
    else:
      schedule = schedules_lib.GeometricSchedule(sparsity, begin, end, frequency)
    return jaxprune.magnitude_pruning(adamw, schedule, select=sel, scope=p.scope)

  begin, end = int(p.begin_fraction * steps), min(int(p.end_fraction * steps), steps - 1)
  return optax.inject_hyperparams(factory)(
      peak_lr=float(o.lr), warmup=warmup, total=max(steps, warmup + 1),
      sparsity=float(config.sparsity), begin=begin, end=end, frequency=p.frequency)


def _step(config, clip, lr, sel):
  o = config.optimizer
  tx = jaxprune.step_adam(lr, config.n, config.m, b1=o.b1, b2=o.b2,
                          weight_decay=o.weight_decay, select=sel,
                          t_max=max(int(config.step_t_max_fraction * config.steps), 1))
  clipped = optax.chain(clip, tx)   # STEP is the whole optimizer: clip before it.
  return jaxprune.ViewTransformation(clipped.init, clipped.update, tx.view)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (+ clipping, schedule) wrapped by ``config.method`` (and QAT if asked)."""
  o, steps, sel = config.optimizer, config.steps, selection(config)
  lr = learning_rate_schedule(config)
  clip = optax.clip_by_global_norm(o.grad_clip)

  def adamw_of(learning_rate):
    return optax.chain(clip, optax.adamw(learning_rate, b1=o.b1, b2=o.b2,
                                         weight_decay=o.weight_decay, mask=_decay_mask))

  adamw = adamw_of(lr)
  method = config.method
  if config.share_compilation:
    if method not in ("dense", "gmp") or config.prune.score != "magnitude" or config.quant.format:
      raise ValueError("`config.share_compilation` supports the dense and gmp methods with "
                       f"magnitude scores and no quantization, got method {method!r}.")
    return _shared(config, sel, adamw_of)
  if method == "dense":
    tx = adamw
  elif method == "gmp":
    tx = _gmp(config, adamw, sel)
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
    tx = _step(config, clip, lr, sel)
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
