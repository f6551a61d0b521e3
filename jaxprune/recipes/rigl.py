"""RigL (Evci et al. 2020) at 75% unstructured sparsity, sparse from the first step.

Every 50 steps until 75% of training, each layer drops the fraction
f(t) = 0.3 / 2 * (1 + cos(pi t / T_end)) of its active weights with the smallest
|w| and grows as many of the inactive weights with the largest |dense gradient|,
at zero and with fresh Adam moments (the paper's alpha = 0.3 and T_end = 75%)."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "rigl"
  config.sparsity = 0.75
  config.dst.drop_fraction = 0.3
  config.dst.update_every = 50
  config.dst.end_fraction = 0.75
  return train.apply_preset(config, preset)
