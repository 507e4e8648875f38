"""The gated multi-LoRA linear: its dispatch (`gated_lora_group`, which every patched layer and
the public op call) and its public op (`gated_lora_linear`). Its PyTorch path is
gated_lora_torch.py (with the CPU fused base GEMM of gated_lora_fused_base.py), its Triton
launcher kernels/gated_lora.py; `prism_fast.reference.gated_lora_linear` is the oracle.

The public op checks its arguments first (the checks live in kernels/, beside the launcher);
the patched layers build their arguments themselves and skip the checks on the hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_fast.kernels.fused_base_lora import fused_base_lora_triton, takes_fused
from prism_fast.kernels.gated_lora import (
    GatedLoraLauncher,
    check_gated_lora_args,
    gated_lora_linear_triton,
    ids_per_sequence,
)
from prism_fast.ops.backend import use_triton
from prism_fast.ops.gated_lora_torch import Prepared, gated_lora_linear_torch


def gated_lora_group(x: torch.Tensor, weights: list[torch.Tensor],
                     biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
                     triton: bool, launcher: GatedLoraLauncher | Prepared | None = None,
                     fuse_base: bool = False) -> list[torch.Tensor]:
    """S projections reading the same x: ys[s] = F.linear(x, W_s, b_s) + gated LoRA of slice s.

    x [..., K]; weights S × [N_s, K]; lora_a [L, S·R, K]; lora_b [L, ΣN_s, R]; scaling [S, L]
    or [L] (S = 1); ids [B] (x = [B, T, K]) or x.shape[:-1]. Arguments are assumed checked.
    `launcher`: a patched layer's lean eager path over these lora_a, lora_b, scaling ([S, L]
    fp32): its GatedLoraLauncher (triton) or its gated_lora_torch.Prepared operands (torch).
    `fuse_base` (Triton only, patch_model's opt-in): calls of ≤ 64 rows run the base projection
    and the LoRA in one kernel (kernels/fused_base_lora.py; closed rows then within the
    accuracy bounds, not bit-identical to F.linear) unless this GPU's tuned table says the
    split path is faster at this size (gated_lora_config.pick_base, via `takes_fused`);
    larger calls keep the split path.
    """
    if triton and fuse_base:
        if torch.compiler.is_compiling():   # the op itself asks takes_fused, when it runs
            return torch.ops.prism_fast.fused_base_lora(x, weights, biases, lora_a, lora_b,
                                                        scaling, ids)
        if takes_fused(x, weights, lora_a):
            return fused_base_lora_triton(x, weights, biases, lora_a, lora_b, scaling, ids)
    if triton:
        if torch.compiler.is_compiling():
            return torch.ops.prism_fast.gated_lora(x, weights, biases, lora_a, lora_b, scaling,
                                                   ids)
        if launcher is not None:
            ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]   # S × [..., N_s]
            launcher(ys, x, ids, ids_per_sequence(x, ids))
            return ys
        return gated_lora_linear_triton(x, weights, biases, lora_a, lora_b, scaling, ids)
    # The fast PyTorch path (gated_lora_torch.py), checked against the reference in tests.
    return gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids, launcher)


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
    triton = use_triton(backend, x.device)
    return gated_lora_group(x, [weight], [bias], lora_a, lora_b, scaling, adapter_ids, triton)[0]
