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


def official_gate(w1, b1, w2, b2):
    """PRISM's own gate module in the model's dtype: Linear → GELU → Dropout → Linear."""
    (d, h), c = w1.shape, w2.shape[0]
    gate = torch.nn.Sequential(torch.nn.Linear(h, d), torch.nn.GELU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(d, c)).to(w1.dtype).eval()
    gate.load_state_dict({"0.weight": w1, "0.bias": b1, "3.weight": w2, "3.bias": b2})
    return gate


# Where the inputs sit, as the float64 gap between the two logits over the condition scale of
# check_routes. fp16/bf16: exactly on the boundary; rounding h to the dtype moves each input by
# about one unit roundoff, so every decision is one that the module's roundings (h1, GELU,
# logits) decide. fp32 rounds nowhere, so there a decision within a few ulp of the boundary is
# decided by accumulation order alone (numpy's vs torch's matmul: measured 169 of 512 flips on
# the boundary, 6 at 16 ulp, none at 64 ulp): fp32 inputs sit within ±64 ulp of it.
BOUNDARY_WINDOW = {torch.float32: 64 * 2.0**-24, torch.float16: 0.0, torch.bfloat16: 0.0}


def boundary_inputs(n, w1, b1, w2, b2):
    """n gate inputs at the base/adapter decision boundary (within BOUNDARY_WINDOW): a float64
    bisection between an input the gate sends to the base and one it sends to the adapter, then
    rounded to the gate's dtype."""
    wd = [t.double() for t in (w1, b1, w2, b2)]

    def relative_gap(h):                                     # (logit 1 − logit 0) / scale
        h1 = F.linear(h, wd[0], wd[1])
        act = F.gelu(h1)
        logits = F.linear(act, wd[2], wd[3])
        scale = ((h1.abs() + act.abs()) @ wd[2].abs().T + wd[3].abs()).max(dim=-1).values
        return (logits[:, 1] - logits[:, 0]) / scale

    h = torch.randn(8 * n, w1.shape[1], dtype=torch.float64) * 2
    side = relative_gap(h) > 0
    lo, hi = h[~side][:n], h[side][:n]
    assert len(lo) == len(hi) == n
    target = (torch.rand(n, dtype=torch.float64) * 2 - 1) * BOUNDARY_WINDOW[w1.dtype]
    t0, t1 = torch.zeros(n, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)
    for _ in range(60):
        mid = (t0 + t1) / 2
        up = (relative_gap(lo + mid * (hi - lo)) > target)[:, None]
        t0, t1 = torch.where(up, t0, mid), torch.where(up, mid, t1)
    return (lo + t0 * (hi - lo)).to(w1.dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_boundary_decisions_match_the_official_gate(dtype, backend):
    """512 inputs on the decision boundary: decisions equal those of the official module run in
    the same dtype except where fp32 accumulation order moves a rounding (≤ 1 %), since both
    round where the module rounds and argmax takes the first index on ties. A gate that kept
    fp32 throughout (no module roundings) fails this on fp16/bf16 (measured ≈ 33 %)."""
    w1, b1, w2, b2 = make_gate(64, 256, 2, dtype)
    h = boundary_inputs(512, w1, b1, w2, b2)
    with torch.no_grad():
        expect = (official_gate(w1, b1, w2, b2)(h).argmax(dim=-1) - 1).to(torch.int32)
        if dtype != torch.float32:                       # the test can fail
            f32 = [t.float() for t in (h, w1, b1, w2, b2)]
            unrounded = F.linear(F.gelu(F.linear(*f32[:3])), *f32[3:]).argmax(dim=-1) - 1
            assert (unrounded != expect).float().mean() > 0.1
    routes = prism_fast.prism_gate(h, w1, b1, w2, b2, backend=backend)
    assert 0.2 < (expect >= 0).float().mean() < 0.8, "near-ties of both kinds"
    disagree = (routes != expect).sum().item()
    assert disagree <= 0.01 * len(h), f"{disagree} of {len(h)} decisions differ from the module"


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
