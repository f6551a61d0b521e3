"""jaxprune: sparsity and quantization research as drop-in Optax transforms."""

from jaxprune import quant, scaling
from jaxprune.compress import (
    CompressedParams,
    ErrorAnalysis,
    compress,
    compress_params,
    compressed_size_report,
    decompress,
    error_analysis,
    export_compressed,
    load_compressed,
    save_compressed,
)
from jaxprune.dst import connectivity_update, drop_fraction_schedule, rigl, set_pruning
from jaxprune.invariants import Check, check
from jaxprune.layouts import einsum_axis
from jaxprune.masks import (
    NM,
    UNSTRUCTURED,
    Unstructured,
    bottom_k_masks,
    default_nm_axis,
    global_magnitude_masks,
    magnitude_mask,
    nm,
    nm_mask,
    random_mask,
    random_nm_mask,
)
from jaxprune.progressive import gradient_flow
from jaxprune.pruning import (
    PruningState,
    SkippedLayerWarning,
    magnitude_pruning,
    nm_pruning,
    random_pruning,
    saliency_pruning,
)
from jaxprune.qat import quantization, quantization_corrections, scale_bits, snapped_quantize
from jaxprune.report import SparsitySummary, nm_valid, sparsity_summary
from jaxprune.schedules import (
    applied_sparsity,
    constant_schedule,
    geometric_schedule,
    mask_decay,
    one_shot_schedule,
    polynomial_schedule,
    structure_frames,
)
from jaxprune.selection import (
    LeafSpec,
    Selection,
    erk_sparsities,
    leaf_paths,
    path_str,
    resolve,
    select,
)
from jaxprune.step import StepState, step_adam, step_phase, step_status
from jaxprune.straight_through import (
    MasterWeightsState,
    ViewTransformation,
    master_dtype,
    master_params,
    master_weight_transform,
    sr_ste,
    ste,
)
from jaxprune.views import schedule_free_eval_params, view

__version__ = "0.1.0"
