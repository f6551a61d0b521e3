"""1:8 sparsity by progressive gradient-flow decay (MDGF, Bambhaniya et al. 2024).

Exponential mask decay b_t = exp(-coef t) from the first step; the last 10% of
training fine-tunes with the hard 1:8 mask. ``coef`` is left to
``jaxprune.gradient_flow``'s default, ln(100) / L for a sparse window of L
steps, so that b_t reaches 0.01 where the hard mask arrives (coef = 6.4e-3 at
the default 800 steps; the authors' fixed ViT-B rate, 1e-4 over ~438k steps,
would leave b_t = 0.93 there). Set ``--config.gradient_flow.coef=...`` for a
fixed rate."""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "gradient_flow"
  config.n, config.m = 1, 8
  config.gradient_flow.decay = "exp"
  config.gradient_flow.coef = None   # the window-scaled default (see above)
  config.gradient_flow.finetune_fraction = 0.1
  return train.apply_preset(config, preset)
