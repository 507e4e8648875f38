"""prism_fast: fused gated multi-LoRA kernels and single-pass PRISM routing for HF models."""

from prism_fast.loading import PrismAdapter, load_prism
from prism_fast.ops import gated_lora_linear, prism_gate, topk_distill_loss
from prism_fast.patch import get_routes, patch_model, set_routes, unpatch_model
from prism_fast.tuning import tune

__all__ = [
    "PrismAdapter",
    "gated_lora_linear",
    "get_routes",
    "load_prism",
    "patch_model",
    "prism_gate",
    "set_routes",
    "topk_distill_loss",
    "tune",
    "unpatch_model",
]
__version__ = "0.1.0"
