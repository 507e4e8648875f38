"""The one door to the kernels: every gated LoRA and gate evaluation goes through here.

`gated_lora_group` and `gate_routes` pick the implementation (the Triton launcher in eager
mode, its registered `torch.ops.prism_fast.*` op under torch.compile, where the launcher is
opaque, or the PyTorch reference); the public ops and the patched layers both call them. The
public ops check their arguments first (the checks live in kernels/, beside the launchers);
the patched layers build their arguments themselves and skip the checks on the hot path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from prism_fast import reference
from prism_fast.kernels import (
    GatedLoraLauncher,
    check_gated_lora_args,
    check_prism_gate_args,
    gated_lora_linear_triton,
    prism_gate_triton,
)

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


def gated_lora_group(x: torch.Tensor, weights: list[torch.Tensor],
                     biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
                     triton: bool, launcher: GatedLoraLauncher | None = None
                     ) -> list[torch.Tensor]:
    """S projections reading the same x: ys[s] = F.linear(x, W_s, b_s) + gated LoRA of slice s.

    x [..., K]; weights S × [N_s, K]; lora_a [L, S·R, K]; lora_b [L, ΣN_s, R]; scaling [S, L]
    or [L] (S = 1); ids [B] (x = [B, T, K]) or x.shape[:-1]. Arguments are assumed checked.
    `launcher`: the group's GatedLoraLauncher over these lora_a, lora_b, scaling ([S, L] fp32),
    the lean eager path of a patched layer.
    """
    if triton:
        if torch.compiler.is_compiling():
            return torch.ops.prism_fast.gated_lora(x, weights, biases, lora_a, lora_b, scaling,
                                                   ids)
        if launcher is not None:
            ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]   # S × [..., N_s]
            launcher(ys, x, ids, x.dim() == 3 and ids.dim() == 1)
            return ys
        return gated_lora_linear_triton(x, weights, biases, lora_a, lora_b, scaling, ids)
    n_slices = len(weights)
    r = lora_a.shape[1] // n_slices
    scaling = scaling.reshape(n_slices, -1)                                 # [S, L]
    ys, lo = [], 0
    for s, (w, b) in enumerate(zip(weights, biases)):
        hi = lo + w.shape[0]
        ys.append(reference.gated_lora_linear(x, w, b, lora_a[:, s * r:(s + 1) * r],
                                              lora_b[:, lo:hi], scaling[s], ids))
        lo = hi
    return ys


def gate_routes(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, triton: bool) -> torch.Tensor:
    """h [B, H] → routes [B] int32. Arguments are assumed checked."""
    if not triton:
        return reference.prism_gate(h, w1, b1, w2, b2)
    if torch.compiler.is_compiling():
        return torch.ops.prism_fast.prism_gate(h, w1, b1, w2, b2)
    return prism_gate_triton(h, w1, b1, w2, b2)


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


def prism_gate(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """h [B, H] → routes [B] int32: argmax(W2 · GELU(W1 h + b1) + b2) − 1 (−1 = base)."""
    check_prism_gate_args(h, w1, b1, w2, b2)
    return gate_routes(h, w1, b1, w2, b2, use_triton(backend, h.device))
