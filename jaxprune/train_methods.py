"""The optimizer a training config names: AdamW (warmup, cosine decay, clipping) and the method.

:func:`make_optimizer` is the one place where ``config.method`` becomes a
jaxprune transform, with the recipes' settings (fractions of training turned
into steps). The pruned parameters are the attention and MLP kernels
(:func:`selection`); embeddings, the output head, biases and LayerNorms stay
dense.
"""

from __future__ import annotations

import jax
import optax

import jaxprune
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
  adamw = optax.chain(clip, optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                        mask=_decay_mask))
  method = config.method
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
