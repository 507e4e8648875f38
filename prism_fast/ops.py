"""Public ops: argument checks, then the Triton kernels or the PyTorch reference."""

from __future__ import annotations

import os

import torch

from prism_fast import reference
from prism_fast.kernels import check_gated_lora_args, check_prism_gate_args

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, device: torch.device) -> bool:
    """Resolve a backend name: "auto" runs Triton on CUDA tensors and the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         f"triton is imported to run on CPU; got tensors on {device}")
    return True


def gated_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                      adapter_ids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """y = F.linear(x, W, b) + [id ≥ 0] · scaling[id] · (x A[id]ᵀ) B[id]ᵀ.

    x [..., K] fp16/bf16/fp32; weight [N, K]; bias [N] or None; lora_a [L, R, K];
    lora_b [L, N, R]; scaling [L] (a tensor, or a list of floats); adapter_ids x.shape[:-1] or
    [B] for x [B, T, K]; −1 = base.
    Returns [..., N] in x's dtype; rows with id −1 are bit-identical to F.linear.
    """
    if isinstance(scaling, (list, tuple)) and isinstance(x, torch.Tensor):
        scaling = torch.tensor(scaling, dtype=torch.float32, device=x.device)   # [L]
    check_gated_lora_args(x, [weight], [bias], lora_a, lora_b, scaling, adapter_ids)
    if use_triton(backend, x.device):
        return torch.ops.prism_fast.gated_lora(x, [weight], [bias], lora_a, lora_b, scaling,
                                               adapter_ids)[0]
    return reference.gated_lora_linear(x, weight, bias, lora_a, lora_b, scaling, adapter_ids)


def prism_gate(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """h [B, H] → routes [B] int32: argmax(W2 · GELU(W1 h + b1) + b2) − 1 (−1 = base)."""
    check_prism_gate_args(h, w1, b1, w2, b2)
    if use_triton(backend, h.device):
        return torch.ops.prism_fast.prism_gate(h, w1, b1, w2, b2)
    return reference.prism_gate(h, w1, b1, w2, b2)
