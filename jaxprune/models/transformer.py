"""A small pre-LayerNorm decoder-only transformer (GPT-2 / nanoGPT style) in Flax NNX.

Architecture, for tokens ``x`` of shape ``[batch, time]`` (``time <= context``)::

    h = embed(x) (+ pos_embed(0..time-1) with positions='learned')
    for each of `depth` blocks:
      h = h + attention(attention_norm(h))   # causal multi-head, optional RoPE on q and k
      h = h + mlp(mlp_norm(h))                # up: width -> mlp_ratio*width, GELU, down
    logits = head(final_norm(h))              # separate (untied) output head

There is no dropout, so a forward pass is a deterministic function of the parameters.
Initialisation follows GPT-2: kernels and embeddings ~ N(0, 0.02^2), except the output
projections of the residual branches (``attention/output``, ``mlp/down``), whose std is
``0.02 / sqrt(2 * depth)`` so that the residual stream's variance does not grow with depth;
biases are zero and LayerNorm scales one.

Precision: parameters are stored in ``param_dtype`` (float32 by default) and the
layers compute in ``dtype`` (float32 by default; ``'bfloat16'`` for mixed precision,
with float32 parameters as the recipes' ``:small`` and ``:base`` presets use). As is
standard (e.g. nanoGPT's autocast, MaxText), these stay float32 whatever ``dtype``
is: the LayerNorm statistics (Flax computes them in float32), the attention scores
and their softmax (the ``q k^T`` product accumulates in float32), and the output
head, so that the logits and the loss are float32.

Positions are either learned (a ``pos_embed`` table of ``context`` rows added to the token
embedding) or rotary (RoPE, Su et al. 2021, https://arxiv.org/abs/2104.09864, applied to q and
k of every head in :func:`apply_rotary`; no parameters).

Parameter count, with ``V = vocab_size``, ``C = context``, ``W = width``, ``D = depth``,
``r = mlp_ratio`` (every Linear and LayerNorm has a bias)::

    V*W                              embed
  + C*W              (learned only)  pos_embed
  + D * ((4 + 2r) W^2 + (9 + r) W)   blocks: q, k, v, output (4 W^2 + 4 W), up and down
                                     (2r W^2 + r W + W), two LayerNorms (4 W)
  + 2W                               final_norm
  + W*V + V                          head

The default ``jaxprune.select()`` prunes exactly six kernels in every block,
``layers/{i}/attention/{query,key,value,output}/kernel`` (``(W, W)``) and
``layers/{i}/mlp/{up,down}/kernel`` (``(W, rW)``, ``(rW, W)``); it leaves out ``embed/embedding``,
``pos_embed/embedding`` and ``head/kernel`` (they match ``DEFAULT_EXCLUDE``) and every bias and
LayerNorm scale (1-D). ``select(prune_embeddings=True)`` adds the embeddings and the head.
Query, key and value are separate Linear layers rather than one fused ``(W, 3W)`` kernel so that
each is its own leaf, as in most checkpoints that pruning papers report on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune import _checks

POSITIONS = ("learned", "rotary")
ROPE_BASE = 10_000.0
#: The floating dtypes a model may compute in or store its parameters in, by name.
DTYPES = ("float32", "bfloat16", "float16")


def _normal(std: float):
  return nnx.initializers.normal(stddev=std)


def as_dtype(name: str, value) -> jnp.dtype:
  """``value`` (a name in :data:`DTYPES` or a dtype) as a dtype; raises naming ``name``."""
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in DTYPES:
    raise ValueError(f"`{name}` must be one of {DTYPES}, got {value!r}.")
  return dtype


def _check_config(*, vocab_size, context, width, depth, heads, mlp_ratio, positions,
                  dtype="float32", param_dtype="float32") -> None:
  """Raises a ValueError naming the first bad argument; shared by the model and param_count."""
  as_dtype("dtype", dtype)
  as_dtype("param_dtype", param_dtype)
  for name, value in [("vocab_size", vocab_size), ("context", context), ("width", width),
                      ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)]:
    _checks.check_int(name, value, minimum=1)
  if positions not in POSITIONS:
    raise ValueError(f"`positions` must be one of {POSITIONS}, got {positions!r}.")
  if width % heads:
    raise ValueError(f"`width` must be a multiple of `heads`, got width={width}, heads={heads}.")
  if positions == "rotary" and (width // heads) % 2:
    raise ValueError("positions='rotary' needs an even head dimension `width // heads`, "
                     f"got {width} // {heads} = {width // heads}.")


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = ROPE_BASE) -> jax.Array:
  """Rotary position embedding (RoPE) of ``x`` with shape ``[..., time, heads, head_dim]``.

  Su et al. 2021, "RoFormer" (https://arxiv.org/abs/2104.09864), in the rotate-half convention
  of GPT-NeoX and Llama: channel ``c < d/2`` is paired with channel ``c + d/2`` (``d`` =
  head_dim) and the pair is rotated by the angle ``p * theta_c`` at position ``p``, with
  ``theta_c = base^(-2c/d)``::

      rope(x, p) = x * cos(p theta) + rotate_half(x) * sin(p theta),
      rotate_half([x1, x2]) = [-x2, x1].

  A rotation by ``p theta`` is orthogonal and rotations compose, so
  ``<rope(q, i), rope(k, j)> = <q, rope(k, j - i)>``: attention scores depend on positions
  only through ``j - i``.

  Args:
    x: array ``[..., time, heads, head_dim]``; ``head_dim`` must be even.
    positions: integer positions ``[time]``.
    base: the wavelength base, 10000 in the paper.

  Returns:
    The rotated array, same shape and dtype as ``x``.
  """
  half = x.shape[-1] // 2
  theta = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # base^(-2c/d)
  angles = positions.astype(jnp.float32)[:, None] * theta  # [time, half]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, None, :]  # [time, 1, head_dim]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, None, :]
  rotated_half = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated_half * sin).astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention; ``query``, ``key``, ``value``, ``output`` are (W, W).

  Scores and softmax in float32 whatever the compute ``dtype`` (module docstring).
  """

  def __init__(self, width: int, heads: int, depth: int, rotary: bool, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    def linear(std):
      return nnx.Linear(width, width, kernel_init=_normal(std), dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

    self.query, self.key, self.value = linear(0.02), linear(0.02), linear(0.02)
    self.output = linear(0.02 / math.sqrt(2 * depth))  # GPT-2: residual variance ~ constant.
    self.heads = heads
    self.rotary = rotary

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, time, width = x.shape
    def split_heads(y):
      return y.reshape(batch, time, self.heads, width // self.heads)

    q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
    if self.rotary:
      q, k = apply_rotary(q, jnp.arange(time)), apply_rotary(k, jnp.arange(time))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((time, time), bool))  # Query q sees keys k <= q.
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
    return self.output(y.reshape(batch, time, width))


class MLP(nnx.Module):
  """``down(gelu(up(x)))`` with hidden size ``mlp_ratio * width`` (tanh GELU, as GPT-2)."""

  def __init__(self, width: int, mlp_ratio: int, depth: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    hidden = mlp_ratio * width
    precision = dict(dtype=dtype, param_dtype=param_dtype)
    self.up = nnx.Linear(width, hidden, kernel_init=_normal(0.02), rngs=rngs, **precision)
    self.down = nnx.Linear(hidden, width, kernel_init=_normal(0.02 / math.sqrt(2 * depth)),
                           rngs=rngs, **precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm residual block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, width: int, heads: int, mlp_ratio: int, depth: int, rotary: bool, *,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    precision = dict(dtype=dtype, param_dtype=param_dtype)
    self.attention_norm = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs, **precision)
    self.attention = CausalSelfAttention(width, heads, depth, rotary, rngs=rngs, **precision)
    self.mlp_norm = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs, **precision)
    self.mlp = MLP(width, mlp_ratio, depth, rngs=rngs, **precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Decoder-only transformer: int tokens ``[batch, time]`` -> float32 logits ``[.., vocab]``.

  See the module docstring for the architecture, the parameter count and the parameter paths.

  Args:
    vocab_size: number of tokens (256: bytes).
    context: longest sequence; the size of ``pos_embed`` with learned positions.
    width: residual stream size; a multiple of ``heads``.
    depth: number of blocks.
    heads: attention heads; head dimension ``width // heads``, even with rotary positions.
    mlp_ratio: MLP hidden size over ``width``.
    positions: ``'learned'`` (a ``pos_embed`` table) or ``'rotary'`` (RoPE on q and k).
    dtype: the compute dtype, a name in :data:`DTYPES` (or the dtype): ``'float32'`` or
      ``'bfloat16'`` for mixed precision (``'float16'`` has no loss scaling here).
    param_dtype: the dtype the parameters are stored in (same names).
    rngs: initialisation keys.
  """

  def __init__(self, *, vocab_size: int = 256, context: int = 128, width: int = 128,
               depth: int = 2, heads: int = 4, mlp_ratio: int = 4, positions: str = "learned",
               dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
    _check_config(vocab_size=vocab_size, context=context, width=width, depth=depth,
                  heads=heads, mlp_ratio=mlp_ratio, positions=positions, dtype=dtype,
                  param_dtype=param_dtype)
    precision = dict(dtype=as_dtype("dtype", dtype),
                     param_dtype=as_dtype("param_dtype", param_dtype))
    self.context = context
    self.embed = nnx.Embed(vocab_size, width, embedding_init=_normal(0.02), rngs=rngs,
                           **precision)
    if positions == "learned":
      self.pos_embed = nnx.Embed(context, width, embedding_init=_normal(0.02), rngs=rngs,
                                 **precision)
    else:
      self.pos_embed = None
    rotary = positions == "rotary"
    self.layers = nnx.List([Block(width, heads, mlp_ratio, depth, rotary, rngs=rngs, **precision)
                            for _ in range(depth)])
    self.final_norm = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs, **precision)
    # float32 logits (and so loss) whatever the compute dtype.
    self.head = nnx.Linear(width, vocab_size, kernel_init=_normal(0.02), rngs=rngs,
                           dtype=jnp.float32, param_dtype=precision["param_dtype"])

  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"`tokens` must be [batch, time], got shape {tokens.shape}.")
    time = tokens.shape[1]
    if time > self.context:  # Shapes are static: this fires at trace time, also under jit.
      raise ValueError(f"sequence length {time} is longer than `context`={self.context}.")
    h = self.embed(tokens)
    if self.pos_embed is not None:
      h = h + self.pos_embed(jnp.arange(time))
    for layer in self.layers:
      h = layer(h)
    return self.head(self.final_norm(h))


def param_count(*, vocab_size: int = 256, context: int = 128, width: int = 128, depth: int = 2,
                heads: int = 4, mlp_ratio: int = 4, positions: str = "learned",
                dtype="float32", param_dtype="float32") -> int:
  """Number of parameters of ``Transformer(**same arguments)``, in closed form.

  Lets a scaling sweep pick sizes without building models; the formula is in the module
  docstring (``heads`` and the dtypes do not change the count, but are validated like the
  model does).
  """
  _check_config(vocab_size=vocab_size, context=context, width=width, depth=depth, heads=heads,
                mlp_ratio=mlp_ratio, positions=positions, dtype=dtype, param_dtype=param_dtype)
  v, w, r = vocab_size, width, mlp_ratio
  block = (4 + 2 * r) * w * w + (9 + r) * w
  positional = context * w if positions == "learned" else 0
  return v * w + positional + depth * block + 2 * w + w * v + v


def count_params(model_or_state) -> int:
  """Number of parameters (array elements) of an NNX model or of a state/pytree.

  A module counts its ``nnx.Param`` variables; a ``nnx.State`` (or any pytree) counts every
  leaf, so pass ``nnx.state(model, nnx.Param)``. Leaves may be ``jax.ShapeDtypeStruct``, so an
  abstract model from ``nnx.eval_shape`` is counted without allocating it.
  """
  tree = model_or_state
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
