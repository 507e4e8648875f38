"""Inputs for the op tests: fresh randn tensors, zero-padded ranks, mixed −1 ids."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from prism_fast import reference


def make_lora(n_adapters: int, rank: int, k: int, n: int, dtype: torch.dtype,
              ranks: list[int] | None = None):
    """A [L, R, K], B [L, N, R] with adapter l of rank ranks[l] ≤ R zero-padded; scaling [L]."""
    a = torch.randn(n_adapters, rank, k, dtype=torch.float32) / k**0.5
    b = torch.randn(n_adapters, n, rank, dtype=torch.float32)
    if ranks is not None:
        for i, r in enumerate(ranks):
            a[i, r:] = 0
            b[i, :, r:] = 0
    scaling = torch.rand(n_adapters) + 0.5
    return a.to(dtype), b.to(dtype), scaling


def stack_slices(parts):
    """One group from per-slice make_lora results: A [L, S·R, K], B [L, ΣN, R], scaling [S, L]."""
    a = torch.cat([p[0] for p in parts], dim=1)
    b = torch.cat([p[1] for p in parts], dim=1)
    scaling = torch.stack([p[2] for p in parts])
    return a, b, scaling


def make_ids(shape: tuple[int, ...], n_adapters: int, p_closed: float = 0.3) -> torch.Tensor:
    ids = torch.randint(0, n_adapters, shape)
    return torch.where(torch.rand(shape) < p_closed, torch.full_like(ids, -1), ids)


def float64_ref(x, w, b, a, bb, scaling, ids):
    """The reference op evaluated entirely in float64 (the oracle for accuracy bounds)."""
    return reference.gated_lora_linear(
        x.double(), w.double(), None if b is None else b.double(), a.double(), bb.double(),
        scaling.double(), ids)


def plain_torch(x, w, b, a, bb, scaling, ids):
    """PEFT-style op in x's dtype: base + s · B(A x), everything rounded as PyTorch rounds it."""
    y = F.linear(x, w, b)
    full = reference.per_token_ids(x, ids)
    for adapter in range(a.shape[0]):
        d = F.linear(F.linear(x, a[adapter]), bb[adapter]) * scaling[adapter].to(x.dtype)
        y = torch.where((full == adapter)[..., None], y + d, y)
    return y


def compiled_gpu_mode() -> bool:
    """TRITON_INTERPRET=0 on a CUDA machine: the kernel tests run compiled on the GPU."""
    return os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
