"""Gradual magnitude pruning (Zhu & Gupta 2017) to 75% unstructured sparsity.

Cubic ramp from 25% to 75% of training, the near-optimal window of Jin et al.
(2025) "The Journey Matters"; masks recomputed every 10 steps of the ramp."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "gmp"
  config.sparsity = 0.75
  config.prune.begin_fraction = 0.25
  config.prune.end_fraction = 0.75
  return train.apply_preset(config, preset)
