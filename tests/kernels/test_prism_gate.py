"""prism_gate: the fused gate kernel (CPU interpreter in CI) against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prism_fast
from prism_fast import reference
from prism_fast.kernels.prism_gate import prism_gate_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A decision may differ from the reference only where the two best logits (float64) are closer
# than TIE_TOL × the condition scale Σ|w2|·(|h1| + |gelu(h1)|) + |b2| of the sums behind them:
# a near-tie that rounding order, not the kernel, decides. Scaling by the logits themselves is
# wrong where they cancel: a bf16 row seen with logits ≈ 0.02 built from terms summing to ≈ 15
# flipped between Triton 3.6 and 3.9 interpreters with a float64 gap of 5e-5 of that scale.
# The bound is the unit roundoff of the two roundings the official gate makes (h1, gelu; GELU's
# slope is ≤ 1.13, hence |h1| in the scale). fp32 rounds nowhere: accumulation order only.
TIE_TOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}


def make_gate(h_dim, d, c, dtype):
    w1 = torch.randn(d, h_dim) / h_dim**0.5
    b1 = torch.randn(d) * 0.1
    w2 = torch.randn(c, d) / d**0.5
    b2 = torch.randn(c) * 0.1
    return [t.to(dtype) for t in (w1, b1, w2, b2)]


def check_routes(h, w1, b1, w2, b2, routes):
    assert routes.dtype == torch.int32 and routes.shape == (h.shape[0],)
    ref = reference.prism_gate(h, w1, b1, w2, b2)
    h1 = F.linear(h.double(), w1.double(), b1.double())
    act = F.gelu(h1)
    logits = F.linear(act, w2.double(), b2.double())
    best = logits.max(dim=-1).values
    chosen = logits.gather(1, (routes.long() + 1).clamp(0, w2.shape[0] - 1)[:, None])[:, 0]
    terms = (h1.abs() + act.abs()) @ w2.double().abs().T + b2.double().abs()   # [B, C]
    scale = terms.max(dim=-1).values.clamp_min(1e-6)
    near_tie = (best - chosen) <= TIE_TOL[h.dtype] * scale
    assert ((routes >= -1) & (routes < w2.shape[0] - 1)).all()
    assert ((routes == ref) | near_tie).all(), "gate decision differs from the reference"
    # Almost every decision is exact; near-ties are rare with random inputs.
    assert routes.numel() == 0 or (routes == ref).float().mean() >= 0.97


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [0, 1, 17, 300])
@pytest.mark.parametrize("h_dim,d,c", [(64, 256, 2), (77, 100, 3), (130, 33, 65), (16, 256, 5)])
def test_matches_reference(h_dim, d, c, b, dtype):
    h = torch.randn(b, h_dim, dtype=dtype) * 3
    w1, b1, w2, b2 = make_gate(h_dim, d, c, dtype)
    routes = prism_fast.prism_gate(h, w1, b1, w2, b2, backend="triton")
    check_routes(h, w1, b1, w2, b2, routes)


def test_exact_on_fp32_and_ties_go_to_base():
    h = torch.randn(40, 32)
    w1, b1, w2, b2 = make_gate(32, 256, 2, torch.float32)
    assert torch.equal(prism_gate_triton(h, w1, b1, w2, b2), reference.prism_gate(h, w1, b1, w2, b2))
    w2 = torch.zeros_like(w2)
    b2 = torch.zeros_like(b2)             # every row ties: torch.argmax picks class 0 = base
    assert (prism_gate_triton(h, w1, b1, w2, b2) == -1).all()


def test_non_contiguous_input():
    h = torch.randn(64, 20).T             # [20, 64] column-major
    w1, b1, w2, b2 = make_gate(64, 48, 3, torch.float32)
    b1, b2 = torch.randn(96)[::2], torch.randn(6)[::2]       # strided biases
    assert torch.equal(prism_fast.prism_gate(h, w1, b1, w2, b2, backend="triton"),
                       reference.prism_gate(h, w1, b1, w2, b2))


def _good():
    h = torch.randn(3, 16)
    return dict(zip(("h", "w1", "b1", "w2", "b2"), (h, *make_gate(16, 8, 2, torch.float32))))


BAD = [
    (lambda a: a.update(h=a["h"][0]), ValueError, "h: expected shape"),
    (lambda a: a.update(h=a["h"].long()), TypeError, "h: expected dtype"),
    (lambda a: a.update(w1=a["w1"][:, :5]), ValueError, "w1: expected shape"),
    (lambda a: a.update(w1=a["w1"].half()), TypeError, "w1: expected dtype"),
    (lambda a: a.update(b1=a["b1"][:3]), ValueError, "b1: expected shape"),
    (lambda a: a.update(w2=a["w2"][:, :3]), ValueError, "w2: expected shape"),
    (lambda a: a.update(w2=torch.randn(1, 8), b2=torch.randn(1)), ValueError, "w2: expected"),
    (lambda a: a.update(b2=a["b2"][:1]), ValueError, "b2: expected shape"),
    (lambda a: a.update(w2=a["w2"].to("meta")), ValueError, "w2: expected device (cpu|cuda)"),
    (lambda a: a.update(b2=None), TypeError, "b2: expected a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mutate,exc,msg", BAD)
def test_clear_errors(mutate, exc, msg, backend):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=msg):
        prism_fast.prism_gate(**args, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [1, 32, 256])
def test_gpu_compiled(b, dtype):
    h = torch.randn(b, 4096, dtype=dtype, device="cuda")
    w1, b1, w2, b2 = (t.cuda() for t in make_gate(4096, 256, 2, dtype))
    check_routes(h, w1, b1, w2, b2, prism_gate_triton(h, w1, b1, w2, b2))
