"""SR-STE 2:4 from scratch (Zhou et al. 2021), refining decay 2e-4."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "sr_ste"
  config.n, config.m = 2, 4
  config.sr_ste_decay = 2e-4
  return train.apply_preset(config, preset)
