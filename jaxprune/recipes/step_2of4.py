"""STEP 2:4 (Lu et al. 2023): AdamW, AutoSwitch (forced by 25% of training), then N:M masks.

The masks are learned under the frozen second moment v of the switch step."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "step"
  config.n, config.m = 2, 4
  config.step_t_max_fraction = 0.25
  return train.apply_preset(config, preset)
