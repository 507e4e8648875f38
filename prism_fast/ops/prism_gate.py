"""The PRISM gate: its dispatch (`gate_routes`, which the routing state calls on each forward)
and its public op (`prism_gate`). Its PyTorch path is the reference itself
(`prism_fast.reference.prism_gate`), its Triton launcher kernels/prism_gate.py."""

from __future__ import annotations

import torch

from prism_fast import reference
from prism_fast.kernels.prism_gate import check_prism_gate_args, prism_gate_triton
from prism_fast.ops.backend import pick, use_triton


def gate_routes(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, triton: bool) -> torch.Tensor:
    """h [B, H] → routes [B] int32. Arguments are assumed checked."""
    run = pick(triton, torch.ops.prism_fast.prism_gate, prism_gate_triton, reference.prism_gate)
    return run(h, w1, b1, w2, b2)


def prism_gate(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """h [B, H] → routes [B] int32: argmax(W2 · GELU(W1 h + b1) + b2) − 1 (−1 = base)."""
    check_prism_gate_args(h, w1, b1, w2, b2)
    return gate_routes(h, w1, b1, w2, b2, use_triton(backend, h.device))
