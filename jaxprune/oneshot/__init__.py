"""One-shot pruning and post-training quantization of trained models.

Layer-level functions, pure and jittable, on Flax ``(in, out)`` kernels:
:func:`wanda`, :func:`sparsegpt` (also joint with quantization),
:func:`gptq`, :func:`magnitude`, and OWL's :func:`outlier_ratio` and
:func:`owl_sparsities`.
"""

from jaxprune.oneshot.gptq import gptq
from jaxprune.oneshot.layers import LayerCall, register_layer
from jaxprune.oneshot.model import (
    CalibrationWarning,
    LayerReport,
    OneShotReport,
    OneShotResult,
    prune,
)
from jaxprune.oneshot.owl import outlier_ratio, owl_sparsities
from jaxprune.oneshot.sparsegpt import Pruned, sparsegpt
from jaxprune.oneshot.wanda import magnitude, wanda

__all__ = [
    "CalibrationWarning", "LayerCall", "LayerReport", "OneShotReport", "OneShotResult", "Pruned",
    "gptq", "magnitude", "outlier_ratio", "owl_sparsities", "prune", "register_layer",
    "sparsegpt", "wanda",
]
