"""Global gradual magnitude pruning to 75%, as Jin et al. (2025) ran it.

"The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse
and Dense Scaling Laws" (Jin et al. 2025), following their MaxText code
(tjingrant/sparse-llm-code, ``MaxText/train.py``, ``pruning_method:
global_gradual``): one *global* magnitude threshold across all pruned kernels
(``magnitude_pruning(..., scope='global')``), updated every 10 steps from 25%
to 75% of training on their *geometric* schedule: each of the n = 41 updates
removes the same fraction of the weights still kept, keep = (1 - s)^((k+1)/n)
(``jaxprune.geometric_schedule``). Compare ``gmp``: Zhu & Gupta's cubic ramp,
per layer, over the same window."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "gmp"
  config.sparsity = 0.75
  config.prune.schedule = "geometric"
  config.prune.scope = "global"
  config.prune.begin_fraction = 0.25
  config.prune.end_fraction = 0.75
  config.prune.frequency = 10
  return train.apply_preset(config, preset)
