"""prism_fast/ops/gated_lora.py: the public op's backends agree, and the group entry of the
patched layers."""

from __future__ import annotations

import pytest
import torch

import prism_fast
from prism_fast import ops
from tests.helpers import compiled_gpu_mode, float64_ref, make_ids, make_lora
from tests.tolerances import REL_TOL, rel_err


def _args(m: int = 4, k: int = 16, n: int = 12):
    a, bb, s = make_lora(2, 4, k, n, torch.float32)
    return dict(x=torch.randn(m, k), weight=torch.randn(n, k) / k**0.5, bias=torch.randn(n),
                lora_a=a, lora_b=bb, scaling=s, adapter_ids=torch.tensor([0, -1, 1, 0]))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_backends_agree(backend):
    args = _args()
    ref = float64_ref(*args.values())
    y = prism_fast.gated_lora_linear(**args, backend=backend)
    assert rel_err(y, ref) <= REL_TOL[torch.float32]
    args["scaling"] = args["scaling"].tolist()            # a list of floats is accepted too
    assert torch.equal(prism_fast.gated_lora_linear(**args, backend=backend), y)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: expected one of"):
        prism_fast.gated_lora_linear(**_args(), backend="cuda")


@pytest.mark.skipif(compiled_gpu_mode(), reason="about CPU tensors")
def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        prism_fast.gated_lora_linear(**_args(), backend="triton")


@pytest.mark.parametrize("triton", [False, True])
def test_group_entry_slices_like_separate_ops(triton):
    """gated_lora_group over q/k/v-like slices (stacked as patch_model stacks them) equals one
    reference op per slice; per-sequence ids [B] for x [B, T, K]."""
    k, ns, r, n_adapters = 24, (16, 8, 8), 4, 3
    x = torch.randn(3, 5, k)
    ws = [torch.randn(n, k) / k**0.5 for n in ns]
    bs = [torch.randn(n) for n in ns]
    lora_a = torch.randn(n_adapters, len(ns) * r, k) / k**0.5              # [L, S·R, K]
    lora_b = torch.randn(n_adapters, sum(ns), r)                          # [L, ΣN, R]
    scaling = torch.rand(len(ns), n_adapters) + 0.5                       # [S, L]
    ids = make_ids((3,), n_adapters)
    ys = ops.gated_lora_group(x, ws, bs, lora_a, lora_b, scaling, ids, triton)
    lo = 0
    for s, (w, b, y) in enumerate(zip(ws, bs, ys)):
        hi = lo + w.shape[0]
        ref = float64_ref(x, w, b, lora_a[:, s * r:(s + 1) * r], lora_b[:, lo:hi], scaling[s], ids)
        assert rel_err(y, ref) <= REL_TOL[torch.float32]
        lo = hi
