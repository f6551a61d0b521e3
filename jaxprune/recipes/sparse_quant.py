"""2:4 sparsity plus MXFP4 quantization-aware training, sparsify then quantize.

SR-STE (Zhou et al. 2021) learns the 2:4 mask on dense master weights; around
it, ``jaxprune.quantization`` makes the model see ``Q(S(W))``: the MXFP4 (E2M1,
blocks of 32 along the input axis, shared E8M0 scales) fake quantization of
the 2:4-sparse weights, scales computed on the sparse tensor (the order Harma
et al. 2024 show is optimal). After every step every pruned kernel is exactly
2:4 and exactly representable in MXFP4. Set ``--config.quant.format=int4`` for
INT4 with a per-tensor scale.
"""

from jaxprune import train


def get_config(preset: str = ""):
  config = train.default_config()
  config.method = "sr_ste"
  config.n, config.m = 2, 4
  config.quant.format = "mxfp4_e2m1"
  config.quant.order = "sq"
  return train.apply_preset(config, preset)
