"""Sparse fine-tuning after one-shot pruning: keep the one-shot masks while training on.

:func:`keep_masks` is a pruning transform that starts from given masks and
holds them: it is what ``magnitude_pruning``/``nm_pruning`` do after their
last mask update (pruned gradients, updates and weights stay exactly 0; the
masks live in a :class:`jaxprune.PruningState`, so ``jaxprune.quantization``
around it quantizes the sparse master weights). :func:`finetune` runs a short
AdamW fine-tune of a trained run's model with it: the recipe's optimizer, a
warmup-cosine schedule over the fine-tune, and the batches the run would have
trained on next. With ``quantize`` the fine-tune is quantization-aware
(:func:`jaxprune.quantization`), so that the result stays exactly
representable; ``method='sr_ste'`` instead fine-tunes N:M masks with SR-STE
(Zhou et al. 2021), starting from the one-shot weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxprune
from jaxprune import data as data_lib
from jaxprune import pruning as pruning_lib
from jaxprune import selection as selection_lib
from jaxprune import train as train_lib

FINETUNE_METHODS = ("mask", "sr_ste")


def keep_masks(inner: optax.GradientTransformation,
               masks: Mapping[str, jax.Array]) -> optax.GradientTransformation:
  """Holds fixed masks around ``inner`` (pruned entries stay exactly 0).

  ``g <- M g``, ``u' = where(M, u, -w)`` as in :mod:`jaxprune.pruning`, with the
  masks given instead of computed.

  Args:
    inner: the optimizer to wrap.
    masks: ``path -> bool mask`` (True = kept) for the pruned leaves, paths as
      :func:`jaxprune.selection.path_str` names them (``OneShotResult.masks``);
      every other leaf is left alone.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`jaxprune.PruningState`.

  Raises:
    ValueError: at ``init``, for a mask path that is not a leaf of the params
      or a mask whose shape differs from its leaf's.
  """
  masks = dict(masks)

  def init_fn(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [selection_lib.path_str(p) for p, _ in flat]
    unknown = sorted(set(masks) - set(paths))
    if unknown:
      raise ValueError(f"`masks` names {unknown}, which are not leaves of the params "
                       f"({paths[:10]}...).")
    leaves = []
    for path, (_, leaf) in zip(paths, flat, strict=True):
      if path in masks:
        if jnp.shape(masks[path]) != jnp.shape(leaf):
          raise ValueError(f"`masks[{path!r}]` has shape {jnp.shape(masks[path])}, the leaf "
                           f"{jnp.shape(leaf)}.")
        leaves.append(jnp.asarray(masks[path], bool))
      else:
        leaves.append(jnp.ones((), bool))
    return pruning_lib.PruningState(inner.init(params), treedef.unflatten(leaves),
                                    jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    pruning_lib.check_update_args("keep_masks", updates, params, state.masks)
    grads = pruning_lib.mask_gradients(updates, state.masks)
    updates, inner_state = inner.update(grads, state.inner_state, params)
    updates = pruning_lib.masked_update(updates, state.masks, params)
    return updates, pruning_lib.PruningState(inner_state, state.masks,
                                             optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _adamw(config, steps: int, lr: float) -> optax.GradientTransformation:
  o = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(1, min(steps // 10, 50)), decay_steps=max(steps, 2),
      end_value=lr * o.final_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adamw(
      schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))


def finetune(
    run,
    model: nnx.Module,
    masks: Mapping[str, jax.Array],
    *,
    steps: int = 200,
    lr: float = 3e-4,
    method: str = "mask",
    nm: tuple[int, int] | None = None,
    quantize: str | None = None,
    quant_kwargs: Mapping | None = None,
) -> list[float]:
  """Fine-tunes ``model`` (a :class:`jaxprune.oneshot.workdir.Run`'s) in place; returns the losses.

  Args:
    run: the training run (its config and corpus).
    model: its model after one-shot pruning.
    masks: the one-shot masks (``OneShotResult.masks``), held by
      :func:`keep_masks` (``method='mask'``).
    steps: fine-tuning steps, on the batches of steps ``T .. T + steps - 1`` of
      the run's data stream (``T`` its length: data it has not seen).
    lr: peak learning rate (warmup over 10% of the steps, cosine decay to the
      recipe's ``final_lr_fraction``).
    method: ``'mask'`` or ``'sr_ste'`` (N:M only, needs ``nm``).
    quantize: a format: quantization-aware fine-tuning with ``quant_kwargs``
      (``axis``, ``granularity``, ``block_size`` of :func:`jaxprune.quantization`).
  """
  if method not in FINETUNE_METHODS:
    raise ValueError(f"`method` must be one of {FINETUNE_METHODS}, got {method!r}.")
  config = run.config
  adamw = _adamw(config, steps, lr)
  select = train_lib.selection(config)
  if method == "sr_ste":
    if nm is None:
      raise ValueError("method='sr_ste' fine-tunes N:M masks: give `nm`.")
    tx = jaxprune.sr_ste(adamw, *nm, decay=config.sr_ste_decay, select=select)
  else:
    tx = keep_masks(adamw, masks)
  if quantize:
    tx = jaxprune.quantization(tx, quantize, select=select, **dict(quant_kwargs or {}))
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)
  if hasattr(tx, "view"):
    params = tx.view(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: train_lib.loss_fn(graphdef, p, batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(steps):
    batch = data_lib.train_batch(run.corpus.train, config.steps + i,
                                 batch_size=config.batch_size, context=config.model.context,
                                 seed=config.seed)
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(loss)
  nnx.update(model, params)
  return [float(x) for x in jax.device_get(losses)]
