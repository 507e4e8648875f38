"""gated_lora: the Triton kernels (CPU interpreter in CI) against the float64 reference."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

import prism_fast
from prism_fast import reference
from prism_fast.kernels.gated_lora import (
    STAGE_EXPAND,
    STAGE_FUSED,
    STAGE_SHRINK,
    add_gated_lora_,
    gated_lora_linear_triton,
)
from tests.helpers import (
    compiled_gpu_mode,
    float64_ref,
    make_ids,
    make_lora,
    plain_torch,
    stack_slices,
)
from tests.tolerances import PLAIN_FLOOR, PLAIN_MIN_ELEMS, PLAIN_RATIO, REL_TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Every path with small blocks so that tiny shapes still span several tiles and K splits.
FORCED = {
    "fused": {"stages": [STAGE_FUSED], "SPLIT_K": 1,
              STAGE_FUSED: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=64)},
    "shrink_expand": {"stages": [STAGE_SHRINK, STAGE_EXPAND], "SPLIT_K": 1,
                      STAGE_SHRINK: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=16),
                      STAGE_EXPAND: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=16)},
    "split_k": {"stages": [STAGE_SHRINK, STAGE_EXPAND], "SPLIT_K": 3,
                STAGE_SHRINK: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=16),
                STAGE_EXPAND: dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, BLOCK_R=16)},
}


def check_op(x, w, b, a, bb, scaling, ids, y):
    """Open rows within SPEC bounds and ≤ 2× the plain op's error; closed rows bit-exact."""
    ref = float64_ref(x, w, b, a, bb, scaling, ids)
    full = reference.per_token_ids(x, ids)
    is_open = full >= 0
    base = F.linear(x, w, b)
    assert y.dtype == x.dtype and y.shape == base.shape
    assert torch.equal(y[~is_open], base[~is_open]), "closed rows must be bit-identical to F.linear"
    if is_open.any():
        base64 = float64_ref(x, w, b, a, bb, scaling, torch.full_like(full, -1))
        lora_ref = base.double() + (ref - base64)      # F.linear's output + float64 LoRA term
        err_lora = rel_err(y[is_open], lora_ref[is_open])
        assert err_lora <= REL_TOL[x.dtype], f"LoRA rel err {err_lora:.3g} > {REL_TOL[x.dtype]:g}"
        if y[is_open].numel() >= PLAIN_MIN_ELEMS:
            err = rel_err(y[is_open], ref[is_open])
            plain = rel_err(plain_torch(x, w, b, a, bb, scaling, ids)[is_open], ref[is_open])
            assert err <= REL_TOL[x.dtype], f"rel err {err:.3g} > {REL_TOL[x.dtype]:g}"
            assert err <= PLAIN_RATIO * plain + PLAIN_FLOOR[x.dtype], \
                f"rel err {err:.3g} > {PLAIN_RATIO}× the plain op's {plain:.3g}"


def run_case(m, k, n, n_adapters, rank, dtype, *, bias=True, p_closed=0.3, config=None,
             ranks=None):
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    a, bb, scaling = make_lora(n_adapters, rank, k, n, dtype, ranks)
    ids = make_ids((m,), n_adapters, p_closed)
    y = gated_lora_linear_triton(x, [w], [b], a, bb, scaling, ids, config=config)[0]
    check_op(x, w, b, a, bb, scaling, ids, y)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(FORCED))
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (7, 37, 45), (33, 100, 19), (50, 130, 70)])
def test_paths_match_reference(m, k, n, path, dtype):
    run_case(m, k, n, 3, 8, dtype, config=FORCED[path])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [0, 1, 2, 17, 64, 65, 300])
def test_default_config(m, dtype):
    run_case(m, 48, 40, 2, 16, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_zero_padded(dtype):
    """Adapters of rank 1, 5 and 128 in one stack: padding contributes exactly nothing."""
    run_case(20, 64, 33, 3, 128, dtype, ranks=[1, 5, 128])


@pytest.mark.parametrize("rank", [1, 2, 3, 16, 31, 64, 100, 128])
def test_ranks(rank):
    run_case(9, 40, 24, 2, rank, torch.float16)
    run_case(70, 40, 24, 2, rank, torch.float16)


@pytest.mark.parametrize("n_adapters", [1, 4, 64])
def test_many_adapters(n_adapters):
    run_case(80, 32, 24, n_adapters, 4, torch.bfloat16, p_closed=0.1)
    run_case(10, 32, 24, n_adapters, 4, torch.bfloat16, p_closed=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 40, 90])
def test_all_closed_bit_identical(m, dtype):
    x = torch.randn(m, 50, dtype=dtype)
    w, b = torch.randn(30, 50, dtype=dtype), torch.randn(30, dtype=dtype)
    a, bb, s = make_lora(2, 8, 50, 30, dtype)
    ids = torch.full((m,), -1)
    y = prism_fast.gated_lora_linear(x, w, b, a, bb, s, ids, backend="triton")
    assert torch.equal(y, F.linear(x, w, b))


@pytest.mark.parametrize("path", list(FORCED))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_closed_rows_untouched(path, dtype):
    """The kernels write into the base outputs: closed rows poisoned with NaN must stay NaN,
    open rows must be exactly base + LoRA with the poison never read."""
    m, k, n = 37, 40, 35
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype)
    a, bb, s = make_lora(2, 8, k, n, dtype)
    ids = make_ids((m,), 2, 0.5)
    y = F.linear(x, w)
    is_open = ids >= 0
    y[~is_open] = float("nan")
    add_gated_lora_([y], x, a, bb, s.reshape(1, -1), ids, False, FORCED[path])
    assert torch.isnan(y[~is_open]).all()
    ref = float64_ref(x, w, None, a, bb, s, ids)
    assert rel_err(y[is_open], ref[is_open]) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [1, 5, 20, 40])
@pytest.mark.parametrize("path", [None, "fused", "shrink_expand", "split_k"])
def test_per_sequence_ids(t, path, dtype):
    """x [B, T, K] with ids [B] equals the per-token call with ids repeated over T."""
    bsz, k, n = 3, 36, 29
    x = torch.randn(bsz, t, k, dtype=dtype)
    w, bias = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    a, bb, s = make_lora(2, 8, k, n, dtype)
    seq_ids = torch.tensor([1, -1, 0])
    cfg = FORCED[path] if path else None
    y_seq = gated_lora_linear_triton(x, [w], [bias], a, bb, s, seq_ids, config=cfg)[0]
    tok_ids = seq_ids[:, None].expand(bsz, t)
    y_tok = gated_lora_linear_triton(x, [w], [bias], a, bb, s, tok_ids, config=cfg)[0]
    check_op(x, w, bias, a, bb, s, seq_ids, y_seq)
    check_op(x, w, bias, a, bb, s, tok_ids, y_tok)
    # Per-sequence tiles start at sequence boundaries, per-token tiles do not, so a row sits at
    # another place in its tile. Compiled on a GPU the row's dot is the same; under the
    # interpreter tl.dot is a NumPy matmul whose bits depend on that place (OpenBLAS edge
    # kernels, e.g. with OPENBLAS_CORETYPE=Haswell), so there the two may differ by summation
    # order only: each is within REL_TOL of float64 (checked above), hence within 2× of each
    # other. Closed rows are F.linear's either way, bit for bit.
    if compiled_gpu_mode():
        assert torch.equal(y_seq, y_tok)
    else:
        is_open = seq_ids >= 0
        assert torch.equal(y_seq[~is_open], y_tok[~is_open])
        assert rel_err(y_seq[is_open], y_tok[is_open]) <= 2 * REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_x(dtype):
    big = torch.randn(6, 10, 90, dtype=dtype)
    x = big[:, ::2, 3:80]                       # [6, 5, 77], strided in every dim
    assert not x.is_contiguous()
    w = torch.randn(40, 77, dtype=dtype)
    a, bb, s = make_lora(2, 16, 77, 40, dtype)
    ids = make_ids((6, 5), 2)
    y = prism_fast.gated_lora_linear(x, w, None, a, bb, s, ids, backend="triton")
    check_op(x, w, None, a, bb, s, ids, y)
    xt = torch.randn(64, 30, dtype=dtype).T     # [30, 64], column-major
    w2 = torch.randn(20, 64, dtype=dtype)
    a2, b2, s2 = make_lora(1, 4, 64, 20, dtype)
    ids2 = make_ids((30,), 1)
    check_op(xt, w2, None, a2, b2, s2, ids2,
             prism_fast.gated_lora_linear(xt, w2, None, a2, b2, s2, ids2, backend="triton"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [3, 100])
@pytest.mark.parametrize("n_slices", [2, 3])
@pytest.mark.parametrize("path", [None, "fused", "split_k"])
def test_multi_slice_shares_shrink(n_slices, m, dtype, path):
    """One call over q/k/v-like slices equals one reference call per slice (forced paths: several
    N tiles in the first slice, one in the others, so program → slice mapping is exercised)."""
    k = 44
    ns = [40, 12, 12][:n_slices]
    x = torch.randn(m, k, dtype=dtype)
    ws = [torch.randn(n, k, dtype=dtype) for n in ns]
    bs = [torch.randn(n, dtype=dtype) if i != 1 else None for i, n in enumerate(ns)]
    loras = [make_lora(2, 8, k, n, dtype) for n in ns]
    ids = make_ids((m,), 2)
    a, bb, s = stack_slices(loras)          # [L, S·R, K], [L, ΣN, R], [S, L]
    ys = gated_lora_linear_triton(x, ws, bs, a, bb, s, ids, config=FORCED[path] if path else None)
    for y, w, bias, (ai, bi, si) in zip(ys, ws, bs, loras):
        check_op(x, w, bias, ai, bi, si, ids, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", [None, "fused", "shrink_expand", "split_k"])
@pytest.mark.parametrize("n_slices", [1, 3])
def test_fp32_adapters_on_half_x(n_slices, path, dtype):
    """fp32 A/B (PEFT's adapter dtype) with fp16/bf16 x: x widened in registers, fp32 dots.
    Closed rows stay F.linear's; open rows are within the SPEC bound of float64 and closer to
    PEFT's fp32-adapter formula than the same adapters rounded to x's dtype."""
    m, k = 37, 52
    ns = [40, 12, 12][:n_slices]
    x = torch.randn(m, k, dtype=dtype)
    ws = [torch.randn(n, k, dtype=dtype) / k**0.5 for n in ns]
    bs = [torch.randn(n, dtype=dtype) for n in ns]
    loras = [make_lora(2, 8, k, n, torch.float32) for n in ns]
    a, bb, s = stack_slices(loras)          # [L, S·R, K], [L, ΣN, R] fp32, [S, L]
    ids = make_ids((m,), 2)
    is_open = ids >= 0
    cfg = FORCED[path] if path else None
    ys = gated_lora_linear_triton(x, ws, bs, a, bb, s, ids, config=cfg)
    half = gated_lora_linear_triton(x, ws, bs, a.to(dtype), bb.to(dtype), s, ids, config=cfg)
    for y, y_half, w, bias, (ai, bi, si) in zip(ys, half, ws, bs, loras):
        base = F.linear(x, w, bias)
        assert y.dtype == dtype and torch.equal(y[~is_open], base[~is_open])
        ref = float64_ref(x, w, bias, ai, bi, si, ids)
        assert rel_err(y[is_open], ref[is_open]) <= REL_TOL[dtype]
        # PEFT with fp32 adapters: the LoRA term in fp32 on x.float(), added to the base output
        term = sum(torch.where((ids == i)[:, None], si[i] * (x.float() @ ai[i].T) @ bi[i].T, 0.0)
                   for i in range(ai.shape[0]))
        peft = torch.where(is_open[:, None], (base.float() + term).to(dtype), base)
        assert rel_err(y, peft) < rel_err(y_half, peft)


def test_fp32_adapters_on_fp32_x_and_dtype_errors():
    x = torch.randn(5, 16)
    w = torch.randn(12, 16)
    a, bb, s = make_lora(2, 4, 16, 12, torch.float32)
    ids = torch.tensor([0, -1, 1, 0, 1])
    check_op(x, w, None, a, bb, s, ids,
             prism_fast.gated_lora_linear(x, w, None, a, bb, s, ids, backend="triton"))
    for backend in ("torch", "triton"):
        with pytest.raises(TypeError, match="lora_a: expected dtype torch.float32 .* or "
                                            "torch.float32, got torch.float16"):
            prism_fast.gated_lora_linear(x, w, None, a.half(), bb.half(), s, ids, backend=backend)
        with pytest.raises(TypeError, match="lora_b: expected dtype torch.bfloat16"):
            prism_fast.gated_lora_linear(x.bfloat16(), w.bfloat16(), None, a.bfloat16(), bb, s,
                                         ids, backend=backend)


def test_fused_config_must_cover_the_rank():
    x = torch.randn(4, 32)
    a, bb, s = make_lora(1, 32, 32, 8, torch.float32)
    cfg = {"stages": [STAGE_FUSED], "SPLIT_K": 1,
           STAGE_FUSED: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=16)}
    with pytest.raises(ValueError, match="BLOCK_R ≥ rank 32"):
        add_gated_lora_([torch.zeros(4, 8)], x, a, bb, s.reshape(1, -1), torch.zeros(4), False,
                        cfg)


def test_out_of_range_ids_are_closed_and_safe():
    """Memory safety: ids far outside 0…L−1 (only checkable on the host) never index memory."""
    m, k, n = 20, 32, 24
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    a, bb, s = make_lora(2, 4, k, n, torch.float32)
    ids = torch.tensor([2**40, -5, 2, 3, 1 << 32, -(2**40)] + [0, 1] * 7, dtype=torch.int64)
    base = F.linear(x, w)
    y = base.clone()
    add_gated_lora_([y], x, a, bb, s.reshape(1, -1), ids, False)
    bad = torch.ones(m, dtype=torch.bool)
    bad[6:] = False
    assert torch.equal(y[bad], base[bad])
    check_op(x[6:], w, None, a, bb, s, ids[6:], y[6:])


def test_non_contiguous_ids():
    """Strided, expanded and per-sequence strided ids (SPEC §4: never read past their storage)."""
    x = torch.randn(6, 32)
    w = torch.randn(20, 32)
    a, bb, s = make_lora(3, 4, 32, 20, torch.float32)
    for ids in (torch.tensor([0, 9, 1, 9, -1, 9, 2, 9, 1, 9, -1, 9])[::2],
                torch.tensor([1]).expand(6),
                torch.tensor([[0, 2, 1, 0, -1, 1, 2, 0, 1, 1, -1, 2]]).view(2, 6)[:, ::2].reshape(6)):
        y = prism_fast.gated_lora_linear(x, w, None, a, bb, s, ids, backend="triton")
        check_op(x, w, None, a, bb, s, ids, y)
    x3 = torch.randn(2, 5, 32)
    seq = torch.tensor([1, 5, 0, 5])[::2]                    # [1, 0], stride 2
    y3 = prism_fast.gated_lora_linear(x3, w, None, a, bb, s, seq, backend="triton")
    check_op(x3, w, None, a, bb, s, seq, y3)
    ids2 = torch.tensor([[0, 1], [2, -1], [1, 0], [0, 2], [-1, 1]]).T  # [2, 5], transposed
    y4 = prism_fast.gated_lora_linear(x3, w, None, a, bb, s, ids2, backend="triton")
    check_op(x3, w, None, a, bb, s, ids2, y4)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64, torch.int16, torch.int8])
def test_id_dtypes(id_dtype):
    x = torch.randn(9, 20)
    w = torch.randn(10, 20)
    a, bb, s = make_lora(2, 4, 20, 10, torch.float32)
    ids = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=id_dtype)
    y = prism_fast.gated_lora_linear(x, w, None, a, bb, s, ids, backend="triton")
    check_op(x, w, None, a, bb, s, ids.long(), y)


def test_randomized_sweep():
    """≥ 200 random cases per run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("PRISM_SWEEP_SEED", random.randrange(2**31)))
    print(f"randomized sweep seed: {seed} (replay with PRISM_SWEEP_SEED={seed})")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for case in range(200):
        dtype = rng.choice(DTYPES)
        m = rng.choice([0, 1, 2, rng.randint(3, 40), rng.randint(41, 140)])
        k, n = rng.randint(1, 96), rng.randint(1, 80)
        n_adapters = rng.choice([1, 1, 2, 3, 7])
        rank = rng.choice([1, 2, 4, 8, 13, 16, 32])
        ranks = [rng.randint(1, rank) for _ in range(n_adapters)]
        path = rng.choice([None, None, "fused", "shrink_expand", "split_k"])
        three_d = rng.random() < 0.3 and m > 0
        info = f"case {case}: dtype={dtype} m={m} k={k} n={n} L={n_adapters} R={rank} " \
               f"path={path} 3d={three_d}"
        x = torch.randn(m, k, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype) / k**0.5
        b = torch.randn(n, dtype=dtype) if rng.random() < 0.5 else None
        a, bb, s = make_lora(n_adapters, rank, k, n, dtype, ranks)
        ids = make_ids((m,), n_adapters, rng.choice([0.0, 0.3, 1.0]))
        if three_d:
            x = x.view(1, m, k)
            ids = ids[:1] if rng.random() < 0.5 else ids.view(1, m)
        y = gated_lora_linear_triton(x, [w], [b], a, bb, s, ids,
                                     config=FORCED[path] if path else None)[0]
        try:
            check_op(x, w, b, a, bb, s, ids, y)
        except AssertionError as e:
            raise AssertionError(f"{info}: {e}") from e


# ---- public API: backends and clear errors (SPEC §5) ------------------------------------------


def _good(dtype=torch.float32):
    x = torch.randn(4, 6, 16, dtype=dtype)
    w = torch.randn(12, 16, dtype=dtype)
    b = torch.randn(12, dtype=dtype)
    a, bb, s = make_lora(2, 4, 16, 12, dtype)
    return dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, scaling=s,
                adapter_ids=torch.tensor([0, -1, 1, 0]))


BAD = [
    ("x", lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x: expected dtype"),
    ("x", lambda a: a.update(x=[1.0]), TypeError, "x: expected a torch.Tensor"),
    ("weight", lambda a: a.update(weight=a["weight"][:, :8]), ValueError, "weight: expected shape"),
    ("weight", lambda a: a.update(weight=a["weight"].half()), TypeError, "weight: expected dtype"),
    ("bias", lambda a: a.update(bias=a["bias"][:5]), ValueError, "bias: expected shape"),
    ("lora_a", lambda a: a.update(lora_a=a["lora_a"][0]), ValueError, "lora_a: expected 3"),
    ("lora_a", lambda a: a.update(lora_a=a["lora_a"][..., :7]), ValueError, "lora_a: expected"),
    ("lora_a", lambda a: a.update(lora_a=torch.randn(2, 129, 16), lora_b=torch.randn(2, 12, 129)),
     ValueError, "lora_a: expected rank"),
    ("lora_b", lambda a: a.update(lora_b=a["lora_b"][:, :5]), ValueError, "lora_b: expected shape"),
    ("lora_b", lambda a: a.update(lora_b=a["lora_b"][:1]), ValueError, "lora_b: expected shape"),
    ("scaling", lambda a: a.update(scaling=a["scaling"][:1]), ValueError, "scaling: expected"),
    ("scaling", lambda a: a.update(scaling=torch.tensor([1, 2])), TypeError, "scaling: expected"),
    ("adapter_ids", lambda a: a.update(adapter_ids=torch.tensor([0, 1])), ValueError,
     "adapter_ids: expected shape"),
    ("adapter_ids", lambda a: a.update(adapter_ids=torch.zeros(4)), TypeError,
     "adapter_ids: expected a signed integer"),
    ("adapter_ids", lambda a: a.update(adapter_ids=torch.zeros(4, dtype=torch.uint8)), TypeError,
     "adapter_ids: expected a signed integer"),
    ("adapter_ids", lambda a: a.update(adapter_ids=torch.tensor([0, 2, 0, 0])), ValueError,
     "adapter_ids: expected values in -1…1"),
    ("adapter_ids", lambda a: a.update(adapter_ids=torch.tensor([0, -2, 0, 0])), ValueError,
     "adapter_ids: expected values"),
    ("lora_a", lambda a: a.update(lora_a=torch.randn(65, 4, 16), lora_b=torch.randn(65, 12, 4),
                                  scaling=torch.ones(65)), ValueError, "lora_a: expected 1 to 64"),
    ("device", lambda a: a.update(lora_a=a["lora_a"].to("meta")), ValueError,
     "lora_a: expected device (cpu|cuda)"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_clear_errors(name, mutate, exc, msg, backend):
    args = _good()
    mutate(args)
    if "expected values" in msg and compiled_gpu_mode():
        pytest.skip("ids on the GPU are range-checked by the kernels, not the host (no sync)")
    with pytest.raises(exc, match=msg):
        prism_fast.gated_lora_linear(**args, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 64, 4096])
def test_gpu_compiled(m, dtype):
    """On a GPU the same checks run compiled (no interpreter), at a Llama-like size."""
    with torch.device("cuda"):
        run_case(m, 4096, 1024, 2, 16, dtype)


def test_pick_config_paths_and_tuned_table(monkeypatch):
    from prism_fast.kernels import gated_lora, gated_lora_config

    cpu = torch.device("cpu")
    gated_lora.pick_config.cache_clear()
    # Llama-3-8B down_proj decode: an A slice of 16 × 14336 is too much to re-stream per N tile
    cfg = gated_lora.pick_config(1, 14336, (4096,), 16, cpu)
    assert cfg["stages"] == [STAGE_SHRINK, STAGE_EXPAND] and cfg["SPLIT_K"] > 1
    # Split is the decode default (EVIDENCE.md, H200): one shrink over q/k/v, one expand
    cfg = gated_lora.pick_config(1, 4096, (4096, 1024, 1024), 16, cpu)
    assert cfg["stages"] == [STAGE_SHRINK, STAGE_EXPAND]
    assert gated_lora.pick_config(8, 512, (512,), 16, cpu)["stages"] == [STAGE_SHRINK, STAGE_EXPAND]
    # fused where the table's limit allows it
    fused = gated_lora.config_for(1, 4096, (4096, 1024, 1024), 16, "cpu", 4,
                                  table={"fused_max_a_elems": 64 * 1024})
    assert fused["stages"] == [STAGE_FUSED] and fused[STAGE_FUSED]["BLOCK_R"] == 16
    # prefill never fuses
    assert gated_lora.pick_config(4096, 512, (512,), 16, cpu)["stages"][0] == STAGE_SHRINK
    monkeypatch.setattr(gated_lora_config, "tuned_table", lambda name: {
        "path:1": "fused", "fused:1": {"BLOCK_N": 32}, "split_k:4096": 4})
    gated_lora.pick_config.cache_clear()
    try:
        tuned = gated_lora.pick_config(1, 14336, (4096,), 16, cpu)
        assert tuned["stages"] == [STAGE_FUSED] and tuned[STAGE_FUSED]["BLOCK_N"] == 32
        assert gated_lora.pick_config(4096, 4096, (4096, 1024, 1024), 16, cpu)["SPLIT_K"] == 4
    finally:
        gated_lora.pick_config.cache_clear()


@pytest.mark.parametrize("path", ["fused", "split"])
def test_64bit_offsets(path):
    """Rows whose x offset row·K passes 2³¹ elements (4 GiB of fp16, allocated lazily: only the
    open rows at the end are ever touched) are read from the right place."""
    k = 4096
    m = 2**31 // k + 40
    x = torch.empty(m, k, dtype=torch.float16)
    x[-40:] = torch.randn(40, k, dtype=torch.float16)
    a, bb, s = make_lora(1, 16, k, 16, torch.float16)
    ids = torch.full((m,), -1)
    ids[-7:] = 0
    # Tiles an H100 can hold (256 x 512 needed 272 KiB of shared memory); 128 rows keep the
    # interpreter's program count (4K, nearly all early exits) small.
    blocks = dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=64, BLOCK_R=16)
    cfg = {"stages": [STAGE_FUSED], "SPLIT_K": 1, STAGE_FUSED: blocks} if path == "fused" else {
        "stages": [STAGE_SHRINK, STAGE_EXPAND], "SPLIT_K": 2, STAGE_SHRINK: blocks,
        STAGE_EXPAND: blocks}
    y = torch.zeros(m, 16, dtype=torch.float16)
    add_gated_lora_([y], x, a, bb, s.reshape(1, -1), ids, False, cfg)
    expect = s[0].double() * (x[-7:].double() @ a[0].double().T) @ bb[0].double().T
    assert rel_err(y[-7:], expect) <= REL_TOL[torch.float16]
    assert not y[:-7].any()
