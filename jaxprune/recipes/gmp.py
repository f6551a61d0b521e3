"""Gradual magnitude pruning (Zhu & Gupta 2017) to 75% unstructured sparsity.

Zhu & Gupta's cubic ramp s(t) = s_f (1 - (1 - p)^3), each layer pruned to the
same sparsity by its own magnitude threshold, masks recomputed every 10 steps.
The ramp runs from 25% to 75% of training, the window that Jin et al. (2025)
"The Journey Matters" found near-optimal; their own method prunes with one
global threshold on a geometric schedule instead (``gmp_global_geometric``)."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "gmp"
  config.sparsity = 0.75
  config.prune.begin_fraction = 0.25
  config.prune.end_fraction = 0.75
  return train.apply_preset(config, preset)
