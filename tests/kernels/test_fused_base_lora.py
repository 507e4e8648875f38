"""fused_base_lora: the opt-in fused base + gated LoRA decode kernel (CPU interpreter in CI)
against the float64 reference, on every row: closed rows are this kernel's x Wᵀ + b, held to
the accuracy bounds (SPEC §1's named exception), not to bit equality with F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prism_fast  # noqa: F401  registers torch.ops.prism_fast.*
from prism_fast.kernels.fused_base_lora import MAX_ROWS, config_for, fused_base_lora_triton
from tests.helpers import float64_ref, make_ids, make_lora, plain_torch, stack_slices
from tests.tolerances import PLAIN_FLOOR, PLAIN_MIN_ELEMS, PLAIN_RATIO, REL_TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Small blocks so that tiny shapes span several row, N and K tiles.
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=16)


def small(rank: int) -> dict:
    return {**SMALL, "BLOCK_R": max(16, 1 << (rank - 1).bit_length())}


def check_rows(x, w, b, a, bb, scaling, ids, y):
    """Every row within the SPEC bound of float64, and ≤ 2× the plain op's error (F.linear for
    closed rows, PEFT's formula in x's dtype for open rows) where enough elements decide it."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    ref = float64_ref(x, w, b, a, bb, scaling, ids)
    err = rel_err(y, ref)
    assert err <= REL_TOL[x.dtype], f"rel err {err:.3g} > {REL_TOL[x.dtype]:g}"
    if y.numel() >= PLAIN_MIN_ELEMS:
        plain = rel_err(plain_torch(x, w, b, a, bb, scaling, ids), ref)
        assert err <= PLAIN_RATIO * plain + PLAIN_FLOOR[x.dtype], \
            f"rel err {err:.3g} > {PLAIN_RATIO}× the plain op's {plain:.3g}"


def run_case(m, k, ns, n_adapters, rank, dtype, *, biases=True, p_closed=0.3, config=None,
             ranks=None, ids=None):
    x = torch.randn(m, k, dtype=dtype)
    ws = [torch.randn(n, k, dtype=dtype) / k**0.5 for n in ns]
    bs = [torch.randn(n, dtype=dtype) if (biases is True or (biases and i in biases)) else None
          for i, n in enumerate(ns)]
    loras = [make_lora(n_adapters, rank, k, n, dtype, ranks) for n in ns]
    a, bb, s = stack_slices(loras)                  # [L, S·R, K], [L, ΣN, R], [S, L]
    ids = make_ids((m,), n_adapters, p_closed) if ids is None else ids
    out = [torch.full((m, n), float("nan"), dtype=dtype) for n in ns]   # poisoned
    ys = fused_base_lora_triton(x, ws, bs, a, bb, s, ids, config=config, out=out)
    assert all(y is o for y, o in zip(ys, out))
    for y, w, bias, (ai, bi, si) in zip(ys, ws, bs, loras):
        check_rows(x, w, bias, ai, bi, si, ids, y)
    return x, ws, bs, a, bb, s, ids, ys


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (1, 37, 50), (5, 44, 40), (17, 70, 33),
                                   (64, 33, 130)])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_odd_shapes(m, k, n, dtype, blocks):
    """K, N not multiples of 16, M = 1, odd, 64; three adapters, about 30 % closed rows."""
    run_case(m, k, [n], 3, 8, dtype, config=small(8) if blocks == "small" else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 7, 16, 33, 64, 128])
def test_ranks(rank, dtype):
    """Ranks 1…128 incl. odd; adapters of smaller ranks zero-padded to R."""
    ranks = [rank, max(1, rank // 2), max(1, rank - 3)]
    run_case(19, 40, [24], 3, rank, dtype, ranks=ranks, config=small(rank))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_slices", [1, 2, 3])
def test_slices_and_biases(n_slices, dtype):
    """q/k/v-like slices (several N tiles in the first, one in the others), a bias on some."""
    run_case(9, 44, [40, 12, 12][:n_slices], 2, 8, dtype, biases={0, 2}, config=small(8))
    run_case(9, 44, [40, 12, 12][:n_slices], 2, 8, dtype, biases=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_adapters_in_one_tile(dtype):
    """Per-token ids with every adapter and −1 inside one row tile: the first adapter rides the
    W loop, the others take their own shrink; also a tile with no open row and one all open."""
    m, n_adapters = 48, 5
    ids = torch.tensor([i % (n_adapters + 1) - 1 for i in range(16)] + [-1] * 16 + [3] * 16)
    run_case(m, 30, [20, 9], n_adapters, 4, dtype, ids=ids, config=small(4))


def test_out_of_range_ids_are_closed():
    """Ids outside 0…L−1 (int64, beyond int32 too) are closed rows: the same output, bit for
    bit, as −1 there (same kernel, same tiles), and never an out-of-bounds read."""
    x, ws, bs, a, bb, s, ids, ys = run_case(12, 24, [20], 2, 4, torch.float32,
                                            ids=torch.zeros(12, dtype=torch.int64))
    bad = torch.tensor([0, -5, 2, 1, 2**33, -1, 7, 0, -2**40, 1, 3, 2], dtype=torch.int64)
    closed = torch.where((bad >= 0) & (bad < 2), bad, -1)
    got = fused_base_lora_triton(x, ws, bs, a, bb, s, bad)[0]
    assert torch.equal(got, fused_base_lora_triton(x, ws, bs, a, bb, s, closed)[0])
    check_rows(x, ws[0], bs[0], a, bb, s[0], closed, got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_on_half_x(dtype):
    """PEFT's fp32 adapters on a half-precision x: within the bound of float64 on every row."""
    m, k, ns = 11, 36, [20, 8]
    x = torch.randn(m, k, dtype=dtype)
    ws = [torch.randn(n, k, dtype=dtype) / k**0.5 for n in ns]
    bs = [torch.randn(n, dtype=dtype) for n in ns]
    loras = [make_lora(2, 8, k, n, torch.float32) for n in ns]
    a, bb, s = stack_slices(loras)
    ids = make_ids((m,), 2)
    ys = fused_base_lora_triton(x, ws, bs, a, bb, s, ids, config=small(8))
    for y, w, bias, (ai, bi, si) in zip(ys, ws, bs, loras):
        assert y.dtype == dtype
        assert rel_err(y, float64_ref(x, w, bias, ai, bi, si, ids)) <= REL_TOL[dtype]


def test_layouts_per_sequence_ids_and_strides():
    """x [B, T, K] with one id per sequence, a non-contiguous x and a weight whose K stride is
    not 1 (copied by the launcher)."""
    k, n = 40, 24
    x = torch.randn(3, 4, 2 * k)[..., ::2]                  # [B, T, K], stride 2 along K
    w = torch.randn(k, n).t()                               # [N, K], stride (1, N)
    b = torch.randn(n)
    a, bb, s = make_lora(2, 8, k, n, torch.float32)
    ids = torch.tensor([1, -1, 0], dtype=torch.int32)
    y = fused_base_lora_triton(x, [w], [b], a, bb, s, ids, config=small(8))[0]
    check_rows(x, w, b, a, bb, s, ids, y)


def test_rows_and_configs():
    """More than 64 rows is refused (callers route it to the split path); M = 0 is empty; every
    heuristic config covers its rank."""
    x = torch.randn(MAX_ROWS + 1, 16)
    w = torch.randn(8, 16)
    a, bb, s = make_lora(1, 4, 16, 8, torch.float32)
    ids = torch.zeros(MAX_ROWS + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="x: the fused base kernel takes at most 64 rows"):
        fused_base_lora_triton(x, [w], [None], a, bb, s, ids)
    assert fused_base_lora_triton(x[:0], [w], [None], a, bb, s, ids[:0])[0].shape == (0, 8)
    for m in (1, 8, 33, 64):
        for r in (1, 16, 65, 128):
            cfg = config_for(m, 4096, (4096, 1024, 1024), r, 132)
            assert cfg["BLOCK_R"] >= r and cfg["BLOCK_M"] >= m


def test_op_routes_large_calls_to_the_split_path():
    """torch.ops.prism_fast.fused_base_lora: ≤ 64 rows fused (every row within bounds),
    more rows the split path (closed rows bit-identical to F.linear there)."""
    for m in (7, 80):
        x = torch.randn(m, 24)
        ws = [torch.randn(16, 24), torch.randn(8, 24)]
        bs = [torch.randn(16), None]
        loras = [make_lora(2, 4, 24, n, torch.float32) for n in (16, 8)]
        a, bb, s = stack_slices(loras)
        ids = make_ids((m,), 2)
        ys = torch.ops.prism_fast.fused_base_lora(x, ws, bs, a, bb, s, ids)
        for y, w, bias, (ai, bi, si) in zip(ys, ws, bs, loras):
            check_rows(x, w, bias, ai, bi, si, ids, y)
            if m > MAX_ROWS:
                assert torch.equal(y[ids < 0], F.linear(x, w, bias)[ids < 0])


def test_opcheck():
    x = torch.randn(2, 5, 24)
    ws = [torch.randn(16, 24), torch.randn(8, 24)]
    bs = [torch.randn(16), torch.randn(8)]
    a = torch.randn(2, 8, 24)
    bb = torch.randn(2, 24, 4)
    ids = torch.tensor([0, -1])
    torch.library.opcheck(torch.ops.prism_fast.fused_base_lora.default,
                          (x, ws, bs, a, bb, torch.rand(2, 2), ids),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_op_refuses_bad_arguments():
    x = torch.randn(3, 24)
    with pytest.raises(ValueError, match="lora_a: expected rank 1 to 128"):
        torch.ops.prism_fast.fused_base_lora(x, [torch.randn(8, 24)], [None],
                                             torch.randn(1, 129, 24), torch.randn(1, 8, 129),
                                             torch.rand(1), torch.zeros(3, dtype=torch.int32))


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiles_fullgraph():
    """The op traces under torch.compile(fullgraph=True) and equals its eager call."""
    x = torch.randn(6, 24)
    ws = [torch.randn(16, 24)]
    a, bb, s = make_lora(2, 4, 24, 16, torch.float32)
    ids = torch.tensor([0, 1, -1, 0, 5, -1])

    def f(x, w, a, bb, s, ids):
        return torch.ops.prism_fast.fused_base_lora(x, [w], [None], a, bb, s, ids)[0] * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ws[0], a, bb, s, ids)
    assert torch.equal(out, f(x, ws[0], a, bb, s, ids))
