"""The fast torch path (prism_fast/ops/gated_lora_torch.py) against the reference and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prism_fast import reference
from prism_fast.ops.gated_lora_torch import Prepared, gated_lora_linear_torch, slice_offsets
from tests.helpers import float64_ref, make_ids, make_lora, stack_slices
from tests.tolerances import REL_TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def multi_slice_case(n_out: list[int], k: int, n_adapters: int, rank: int, dtype, bias: bool):
    """Weights per slice and the group's stacked A [L, S·R, K], B [L, ΣN, R], scaling [S, L]."""
    weights = [torch.randn(n, k).div(k**0.5).to(dtype) for n in n_out]
    biases = [torch.randn(n).to(dtype) if bias else None for n in n_out]
    parts = [make_lora(n_adapters, rank, k, n, dtype, ranks=[max(1, rank - i)
                                                             for i in range(n_adapters)])
             for n in n_out]
    lora_a, lora_b, scaling = stack_slices(parts)          # [L, S·R, K], [L, ΣN, R], [S, L]
    return weights, biases, lora_a, lora_b, scaling, parts


def per_slice(x, weights, biases, parts, ids, fn):
    return [fn(x, w, b, a, bb, s, ids) for w, b, (a, bb, s) in zip(weights, biases, parts)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_out,k", [([40, 12, 12], 24), ([33], 19), ([17, 17], 31)])
@pytest.mark.parametrize("ids_kind", ["sequence", "token"])
@pytest.mark.parametrize("n_adapters", [1, 3])
def test_matches_reference_and_float64(dtype, n_out, k, ids_kind, n_adapters):
    torch.manual_seed(len(n_out) * 100 + k + n_adapters)
    x = torch.randn(5, 7, k, dtype=dtype)
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case(n_out, k, n_adapters, 8,
                                                                       dtype, bias=k % 2 == 1)
    ids = make_ids((5,) if ids_kind == "sequence" else (5, 7), n_adapters, p_closed=0.4)
    ids[0] = -1                                       # at least one closed sequence / token row
    ys = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids)
    exact = per_slice(x, weights, biases, parts, ids, float64_ref)
    ref = per_slice(x, weights, biases, parts, ids, reference.gated_lora_linear)
    closed = reference.per_token_ids(x, ids) < 0
    for y, e, r, w, b in zip(ys, exact, ref, weights, biases):
        assert y.dtype == dtype and y.shape == r.shape
        assert torch.equal(y[closed], F.linear(x, w, b)[closed])         # bit-identical
        assert rel_err(y, e) <= REL_TOL[dtype]
        assert rel_err(y, e) <= 2 * rel_err(r, e) + (1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("routes", [[0, 0, 0], [-1, -1, -1], [1, -1, 1], [-1, 5, 0]])
def test_route_mixes(dtype, routes):
    """All open (no gather), all closed (F.linear only), mixed adapters, an out-of-range id."""
    k = 20
    x = torch.randn(3, 4, k, dtype=dtype)
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case([9, 5], k, 2, 4, dtype,
                                                                       bias=True)
    ids = torch.tensor(routes)
    ys = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids)
    for y, e, w, b in zip(ys, per_slice(x, weights, biases, parts, ids, float64_ref), weights,
                          biases):
        base = F.linear(x, w, b)
        for i, r in enumerate(routes):
            if not 0 <= r < 2:
                assert torch.equal(y[i], base[i])
            else:
                assert rel_err(y[i], e[i]) <= REL_TOL[dtype]


def test_odd_shapes_and_non_contiguous():
    k = 13
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case([7, 3, 3], k, 2, 1,
                                                                       torch.float32, bias=False)
    x = torch.randn(k, 6, 2).permute(2, 1, 0)                            # [2, 6, 13], strided
    for ids in (torch.tensor([1, -1]), make_ids((2, 6), 2)):
        ys = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids)
        for y, e in zip(ys, per_slice(x, weights, biases, parts, ids, float64_ref)):
            assert rel_err(y, e) <= REL_TOL[torch.float32]
    x2 = torch.randn(0, k)
    ys = gated_lora_linear_torch(x2, weights, biases, lora_a, lora_b, scaling,
                                 torch.zeros(0, dtype=torch.long))
    assert [tuple(y.shape) for y in ys] == [(0, 7), (0, 3), (0, 3)]
    x1 = torch.randn(1, k)                                               # M = 1, per token
    ids = torch.tensor([1])
    ys = gated_lora_linear_torch(x1, weights, biases, lora_a, lora_b, scaling, ids)
    for y, e in zip(ys, per_slice(x1, weights, biases, parts, ids, float64_ref)):
        assert rel_err(y, e) <= REL_TOL[torch.float32]


def test_many_token_ids_grouped_with_unique():
    """More ids than the host-list limit: the torch.unique grouping gives the same answer."""
    k = 16
    x = torch.randn(600, k)
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case([8], k, 3, 4,
                                                                       torch.float32, bias=True)
    for ids in (make_ids((600,), 3), torch.full((600,), 2)):
        y = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids)[0]
        e = float64_ref(x, weights[0], biases[0], *parts[0], ids)
        assert rel_err(y, e) <= REL_TOL[torch.float32]
        closed = ids < 0
        assert torch.equal(y[closed], F.linear(x, weights[0], biases[0])[closed])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trace_safe_formulation_matches(dtype):
    """Under torch.compile the masked formulation runs: the same results, closed rows exact."""
    k = 24
    x = torch.randn(4, 3, k, dtype=dtype)
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case([16, 8, 8], k, 2, 4, dtype,
                                                                       bias=False)
    ids = torch.tensor([0, -1, 1, 0])
    compiled = torch.compile(gated_lora_linear_torch, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    try:
        ys = compiled(x, weights, biases, lora_a, lora_b, scaling, ids)
    finally:
        torch._dynamo.reset()
    eager = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids)
    for y, ye, e, w in zip(ys, eager, per_slice(x, weights, biases, parts, ids, float64_ref),
                           weights):
        assert torch.equal(y[1], F.linear(x, w)[1])
        assert rel_err(y, e) <= REL_TOL[dtype]
        assert rel_err(y, ye) <= REL_TOL[dtype]


def test_closed_batch_does_no_lora_work(monkeypatch):
    """Every route closed: the only matmuls are the base projections'."""
    k = 12
    weights, biases, lora_a, lora_b, scaling, _ = multi_slice_case([6, 6], k, 1, 4,
                                                                   torch.float32, bias=False)
    calls = []
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **kw: calls.append(a))
    x = torch.randn(2, 3, k)
    ys = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, torch.tensor([-1, -1]))
    assert not calls
    assert all(torch.equal(y, F.linear(x, w)) for y, w in zip(ys, weights))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prepared_group_follows_routes_written_in_place(dtype):
    """A patched layer's Prepared keeps its host-side grouping of the ids until the ids tensor
    changes: in place (copy_, as set_routes does) or another tensor; every answer matches."""
    k = 24
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case([16, 8, 8], k, 2, 4, dtype,
                                                                       bias=True)
    prepared = Prepared(lora_a, lora_b, scaling, slice_offsets(weights))
    ids = torch.tensor([0, 0, 0])
    for routes in ([0, 0, 0], [1, 1, 1], [1, -1, 0], [-1, -1, -1], [0, 0, 0]):
        ids.copy_(torch.tensor(routes))
        x = torch.randn(3, 2, k, dtype=dtype)
        ys = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids, prepared)
        for y, e, w, b in zip(ys, per_slice(x, weights, biases, parts, ids, float64_ref), weights,
                              biases):
            assert y.shape == (3, 2, w.shape[0]) and y.dtype == dtype
            closed = ids < 0
            assert torch.equal(y[closed], F.linear(x, w, b)[closed])
            assert rel_err(y[~closed], e[~closed]) <= REL_TOL[dtype] or not (~closed).any()
    with torch.inference_mode():          # inference tensors have no version: no caching
        ids = torch.tensor([1, 1, 1])
        x = torch.randn(3, 2, k, dtype=dtype)
        y = prepared(x, weights, biases, ids)[0]
    assert rel_err(y, per_slice(x, weights, biases, parts, ids, float64_ref)[0]) <= REL_TOL[dtype]


def test_prepared_extra_bytes_are_the_scaled_b_only_for_fp32():
    k = 20
    for dtype, expected in ((torch.float32, "b"), (torch.bfloat16, "ab")):
        weights, _, lora_a, lora_b, scaling, _ = multi_slice_case([9, 5], k, 2, 4, dtype, False)
        prepared = Prepared(lora_a, lora_b, scaling, slice_offsets(weights))
        want = lora_b.numel() * 4 + (lora_a.numel() * 4 if "a" in expected else 0)
        assert prepared.extra_bytes == want


def test_uniform_route_on_2d_and_strided_input():
    """All rows on one adapter (no gather): per-token ids on [M, K] and strided [B, T, K]."""
    k = 13
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case([7, 3, 3], k, 2, 2,
                                                                       torch.float32, bias=True)
    x2 = torch.randn(5, k)
    x3 = torch.randn(k, 6, 2).permute(2, 1, 0)                           # [2, 6, 13], strided
    for x, ids in ((x2, torch.full((5,), 1)), (x3, torch.tensor([0, 0]))):
        ys = gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids)
        for y, e in zip(ys, per_slice(x, weights, biases, parts, ids, float64_ref)):
            assert y.shape == e.shape
            assert rel_err(y, e) <= REL_TOL[torch.float32]


def test_groups_of_one_forward_share_the_grouping_of_its_ids(monkeypatch):
    """Continuous batching gives every forward new per-token ids: the groups of one forward
    group them once between them, and any write to the ids groups them again."""
    from prism_fast.ops import gated_lora_torch as gt

    k = 12
    calls = []
    real = gt._groups
    monkeypatch.setattr(gt, "_groups", lambda ids, n: calls.append(n) or real(ids, n))
    cases = [multi_slice_case([6, 3], k, 2, 2, torch.float32, bias=False) for _ in range(3)]
    prepared = [Prepared(a, b, s, slice_offsets(w)) for w, _, a, b, s, _ in cases]
    ids = torch.tensor([1, -1, 0, 1])
    for step, routes in enumerate(([1, -1, 0, 1], [0, 0, -1, 1])):
        ids.copy_(torch.tensor(routes))
        x = torch.randn(4, k)
        for (weights, biases, _, _, _, parts), p in zip(cases, prepared):
            ys = p(x, weights, biases, ids)
            for y, e in zip(ys, per_slice(x, weights, biases, parts, ids, float64_ref)):
                assert rel_err(y, e) <= REL_TOL[torch.float32]
        assert len(calls) == step + 1          # once per write, not once per group
    other = multi_slice_case([6, 3], k, 3, 2, torch.float32, bias=False)   # 3 adapters
    Prepared(*other[2:5], slice_offsets(other[0]))(torch.randn(4, k), other[0], other[1], ids)
    assert len(calls) == 3
