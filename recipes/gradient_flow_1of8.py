"""1:8 sparsity by progressive gradient-flow decay (MDGF, Bambhaniya et al. 2024).

Exponential mask decay from the first step; the last 10% of training fine-tunes
with the hard 1:8 mask."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "gradient_flow"
  config.n, config.m = 1, 8
  config.gradient_flow.decay = "exp"
  config.gradient_flow.finetune_fraction = 0.1
  return train.apply_preset(config, preset)
