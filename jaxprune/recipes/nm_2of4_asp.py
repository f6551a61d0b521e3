"""ASP-style 2:4 (Mishra et al. 2021): dense training, one-shot 2:4 magnitude mask, fine-tune.

The mask is computed at half of training and held; the second half fine-tunes
the kept weights."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "nm_asp"
  config.n, config.m = 2, 4
  config.one_shot_fraction = 0.5
  return train.apply_preset(config, preset)
