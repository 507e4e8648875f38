"""prism_fast: fused gated multi-LoRA kernels and single-pass PRISM routing for HF models."""

from prism_fast.ops import gated_lora_linear, prism_gate

__all__ = ["gated_lora_linear", "prism_gate"]
__version__ = "0.1.0"
