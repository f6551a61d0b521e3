"""Static random sparse training at 75%: a random mask drawn at the first step and held.

The baseline that dynamic sparse training (set, rigl) must beat at the same
sparsity and the same number of parameters over training."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "static_random"
  config.sparsity = 0.75
  return train.apply_preset(config, preset)
