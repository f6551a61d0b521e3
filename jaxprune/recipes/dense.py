"""Dense baseline: AdamW on the default tiny transformer (every other recipe compares to it)."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "dense"
  return train.apply_preset(config, preset)
