"""SET, Sparse Evolutionary Training (Mocanu et al. 2018), at 75% unstructured sparsity.

RigL's schedule (every 50 steps until 75% of training, cosine drop fraction from
0.3) with random instead of gradient-based growth: the comparison Evci et al.
(2020) make."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "set"
  config.sparsity = 0.75
  config.dst.drop_fraction = 0.3
  config.dst.update_every = 50
  config.dst.end_fraction = 0.75
  return train.apply_preset(config, preset)
