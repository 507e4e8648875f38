"""Triton kernels of prism_fast (installed as `prism_fast.kernels`). Imports only torch and triton."""

from .gated_lora import (
    GatedLoraLauncher,
    add_gated_lora_,
    check_gated_lora_args,
    gated_lora_linear_triton,
    gated_lora_op,
    ids_per_sequence,
)
from .prism_gate import check_prism_gate_args, prism_gate_op, prism_gate_triton
from .topk_distill import (
    check_topk_distill_args,
    topk_distill_backward,
    topk_distill_forward,
)

__all__ = [
    "GatedLoraLauncher",
    "add_gated_lora_",
    "check_gated_lora_args",
    "check_prism_gate_args",
    "check_topk_distill_args",
    "gated_lora_linear_triton",
    "gated_lora_op",
    "ids_per_sequence",
    "prism_gate_op",
    "prism_gate_triton",
    "topk_distill_backward",
    "topk_distill_forward",
]
