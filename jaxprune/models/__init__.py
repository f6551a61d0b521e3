"""Models for sparsity experiments: small enough to read, sized by arguments."""

from jaxprune.models.transformer import (
    MLP,
    Block,
    CausalSelfAttention,
    Transformer,
    apply_rotary,
    count_params,
    param_count,
)

# Re-exports: this list is what jaxprune.models makes public.
__all__ = [
    "MLP",
    "Block",
    "CausalSelfAttention",
    "Transformer",
    "apply_rotary",
    "count_params",
    "param_count",
]
