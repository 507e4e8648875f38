"""Fused base + gated LoRA decode kernel (opt-in): y = x Wᵀ (+ b) + gated LoRA in one pass.

For decode batches (M ≤ 64 rows) the step is memory-bound: it reads W once. The split path
(gated_lora.py) runs F.linear, then the LoRA launches, which re-read x and read-modify-write
y. Here each program owns one N tile of one slice (q/k/v …) and, for every row tile:

    K loop:  acc += x[:, k] · W[n, k]ᵀ           (W's tile streamed once, fp32 accumulator)
             u   += x[:, k] · A[first, cols, k]ᵀ  (the shrink of the tile's first adapter rides
                                                  along on the same x tile; A is not read
                                                  when every row is closed)
    then     acc += scaling · u B[first]ᵀ on that adapter's rows, and the same (own K loop
             over x and A, not W) for every other adapter present in the tile (per-token ids
             with mixed adapters); closed rows' u is zeroed: no LoRA term
    store    y = acc (+ b), once.

Layouts and id semantics are gated_lora.py's (lora_a [L, S·R, K], lora_b [L, ΣN, R], scaling
[S, L] fp32; ids outside 0…L−1 are closed). The device helpers (`_tile_rows`, `_slice_tile`,
`_shrink`, `_shrink_step`, `_a_cols`, `_expand`, `_split_u`) are gated_lora_device.py's,
shared, not copied.

Guarantee: closed rows are x Wᵀ + b computed by this kernel, NOT bit-identical to F.linear
(another summation order): within SPEC §2's bounds on every row. Hence opt-in
(`patch_model(..., fuse_base=True)`); the SPEC's passthrough guarantee names this exception.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import expect
from .gated_lora import (
    check_gated_lora_args,
    gated_lora_linear_triton,
    group_outputs_like,
    ids_per_sequence,
)
from .gated_lora_config import FUSED_MAX_ROWS, device_key, pick_base
from .gated_lora_device import (
    _a_cols,
    _expand,
    _shrink,
    _shrink_step,
    _slice_tile,
    _split_u,
    _tile_rows,
)

MAX_ROWS = FUSED_MAX_ROWS   # decode batches only; larger calls take the split path


@triton.jit
def _add_adapter(acc, u, b_ptr, scale_ptr, adapter, s, L, cols, col_lo, R, n_off, n, n_mask,
                 stride_bl, stride_bn, stride_br, dtype: tl.constexpr, SPLIT_U: tl.constexpr):
    """acc + scaling[s, adapter] · u B[adapter, n_off + n]ᵀ (u's rows of other adapters are 0)."""
    scale = tl.load(scale_ptr + s * L + adapter)
    u_hi, u_lo = _split_u(u, dtype, SPLIT_U)
    out = _expand(u_hi, u_lo, b_ptr, adapter, cols, col_lo, col_lo + R, n_off, n, n_mask,
                  stride_bl, stride_bn, stride_br, SPLIT_U)
    return acc + scale * out


@triton.jit
def _fused_base_lora_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, bias0_ptr, bias1_ptr, bias2_ptr, a_ptr, b_ptr, scale_ptr,
    ids_ptr, y0_ptr, y1_ptr, y2_ptr,
    M, K, L, R, N0, N1, N2,
    stride_xm, stride_xk, stride_w0, stride_w1, stride_w2, stride_al, stride_ar, stride_ak,
    stride_bl, stride_bn, stride_br, stride_y0, stride_y1, stride_y2,
    NUM_SLICES: tl.constexpr, BIAS_BITS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, ids = _tile_rows(ids_ptr, pid_m, M, 1, L, BLOCK_M, False)
    valid = rows < M
    # This program's slice s, its output, weight and bias (one selection helper for all three).
    y_ptr, stride_ym, n_size, n_off, s, tile = _slice_tile(
        pid_n, N0, N1, N2, y0_ptr, y1_ptr, y2_ptr, stride_y0, stride_y1, stride_y2,
        BLOCK_N, NUM_SLICES)
    w_ptr, stride_wn, _, _, _, _ = _slice_tile(
        pid_n, N0, N1, N2, w0_ptr, w1_ptr, w2_ptr, stride_w0, stride_w1, stride_w2,
        BLOCK_N, NUM_SLICES)
    bias_ptr, _, _, _, _, _ = _slice_tile(
        pid_n, N0, N1, N2, bias0_ptr, bias1_ptr, bias2_ptr, 0, 0, 0, BLOCK_N, NUM_SLICES)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < n_size
    col_lo = s * R
    cols = col_lo + tl.arange(0, BLOCK_R)
    col_mask = cols < col_lo + R
    dtype: tl.constexpr = b_ptr.dtype.element_ty
    SPLIT_U: tl.constexpr = dtype != tl.float32
    # fp32 models keep ieee fp32 dots (SPEC's fp32 bound, as F.linear without tf32).
    IEEE: tl.constexpr = x_ptr.dtype.element_ty == tl.float32

    is_open = ids >= 0
    any_open = tl.max(is_open.to(tl.int32), axis=0) > 0
    first = tl.min(tl.where(is_open, ids, L), axis=0)   # L when every row is closed
    sel = is_open & (ids == first)

    # The loop body has no branch and no inner loop, so that Triton can pipeline its loads: A's
    # tile is masked off entirely (no memory traffic) when every row is closed, and the shrink
    # shares the x tile of the base product (rows of other adapters are dropped from u after).
    a_cols = _a_cols(a_ptr, tl.minimum(first, L - 1), cols, stride_al, stride_ar)
    a_mask = cols < tl.where(any_open, col_lo + R, col_lo)   # no column when all are closed
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    x_rows = x_ptr + rows[:, None] * stride_xm
    w_cols = w_ptr + n[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        xt = tl.load(x_rows + k[None, :].to(tl.int64) * stride_xk,
                     mask=valid[:, None] & k_mask[None, :], other=0.0)     # [BM, BK]
        wt = tl.load(w_cols + k[:, None].to(tl.int64),
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)    # [BK, BN]
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
        u = _shrink_step(u, xt, a_cols, k, k_mask, a_mask, stride_ak)
    if any_open:
        u = tl.where(sel[:, None], u, 0.0)
        acc = _add_adapter(acc, u, b_ptr, scale_ptr, first, s, L, cols, col_lo, R, n_off, n,
                           n_mask, stride_bl, stride_bn, stride_br, dtype, SPLIT_U)
    # Other adapters in this tile (per-token ids only): their own shrink over K, W not re-read.
    remaining = is_open & (ids != first)
    while tl.max(remaining.to(tl.int32), axis=0) > 0:
        adapter = tl.min(tl.where(remaining, ids, L), axis=0)
        sel = remaining & (ids == adapter)
        u = _shrink(x_ptr, a_ptr, rows, sel, adapter, cols, col_mask, 0, K, stride_xm,
                    stride_xk, stride_al, stride_ar, stride_ak, BLOCK_M, BLOCK_R, BLOCK_K)
        acc = _add_adapter(acc, u, b_ptr, scale_ptr, adapter, s, L, cols, col_lo, R, n_off, n,
                           n_mask, stride_bl, stride_bn, stride_br, dtype, SPLIT_U)
        remaining = remaining & (ids != adapter)
    if (BIAS_BITS >> s) & 1:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


POINTERS = ("x_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "bias0_ptr", "bias1_ptr", "bias2_ptr",
            "a_ptr", "b_ptr", "scale_ptr", "ids_ptr", "y0_ptr", "y1_ptr", "y2_ptr")
assert tuple(_fused_base_lora_kernel.arg_names[:len(POINTERS)]) == POINTERS


# ----------------------------------------------------------------------------------------------
# host side: config, launch, op
# ----------------------------------------------------------------------------------------------


def config_for(m: int, k: int, ns: tuple[int, ...], r: int, sms: int) -> dict:
    """Block sizes of one decode call (heuristic; no GPU timing yet). One row tile covers all
    M ≤ 64 rows, so W is streamed exactly once; every program also streams its slice of A
    (R × K), so N tiles are widened to 128 where that still leaves ≥ 1 program per SM.
    Every choice here compiles for sm_90 without register spills
    (prism_fast.testing.kernel_resources, checked in CI): 64 rows × rank 128 spilled 152 B
    with 64-wide N and K tiles."""
    expect(1 <= m <= MAX_ROWS, ValueError,
           lambda: f"x: the fused base kernel takes 1 to {MAX_ROWS} rows, got {m}")
    bm = max(16, triton.next_power_of_2(m))
    br = max(16, triton.next_power_of_2(r))
    if br <= 32:   # (BLOCK_K 64 with 4 warps spilled up to 64 B once the loop was pipelined)
        bn, bk, warps = (64, 32, 4) if bm == 16 else (32, 32, 4) if bm == 32 else (64, 64, 8)
        if bm == 16 and br == 16 and sum(triton.cdiv(n, 128) for n in ns) >= sms:
            bn, warps = 128, 8
    elif br == 64:
        bn, bk, warps = 64, 32 if bm == 64 else 64, 8
    else:   # rank 65…128: (16, 64, 64) spilled 4 B with 3 slices
        bn, bk, warps = (64, 32, 8) if bm == 16 else (32, 32, 8)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br, num_warps=warps)


@functools.lru_cache(maxsize=1024)
def _pick(m: int, k: int, ns: tuple[int, ...], r: int, device: torch.device) -> dict:
    return config_for(m, k, ns, r, device_key(device)[1])


def fused_base_lora_triton(x: torch.Tensor, weights: list[torch.Tensor],
                           biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                           lora_b: torch.Tensor, scaling: torch.Tensor,
                           adapter_ids: torch.Tensor, config: dict | None = None,
                           out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """ys[s] = x W_sᵀ (+ b_s) + gated LoRA of slice s, one launch, for x with M ≤ 64 rows.
    Arguments are assumed checked (check_gated_lora_args); `config` forces block sizes; `out`
    (S × contiguous [..., N_s] in x's dtype) receives the outputs, every element written."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)                                    # [M, K], a view where possible
    m = x2.shape[0]
    ns = tuple(w.shape[0] for w in weights)
    ys = out if out is not None else [x.new_empty((*x.shape[:-1], n)) for n in ns]
    if m == 0:
        return ys
    expect(m <= MAX_ROWS, ValueError,
           lambda: f"x: the fused base kernel takes at most {MAX_ROWS} rows, got {m}")
    ids = adapter_ids
    if ids_per_sequence(x, ids):                             # [B] → one id per row
        ids = ids[:, None].expand(x.shape[0], x.shape[1])
    ids = ids.reshape(-1).contiguous()
    s = len(weights)
    r = lora_a.shape[1] // s
    if scaling.dim() != 2 or scaling.dtype != torch.float32 or not scaling.is_contiguous():
        scaling = scaling.reshape(s, -1).to(torch.float32).contiguous()    # [S, L]
    cfg = dict(config or _pick(m, k, ns, r, x.device))
    expect(cfg["BLOCK_R"] >= r, ValueError,
           lambda: f"config: BLOCK_R must cover the rank {r}, got {cfg['BLOCK_R']}")
    warps = cfg.pop("num_warps", 4)
    # The kernel reads W with unit stride along K.
    ws = [w if w.stride(1) == 1 else w.contiguous() for w in weights]
    y2 = [y.view(-1, n) for y, n in zip(ys, ns)]
    pad = 3 - s
    ws_p, ys_p = ws + [ws[0]] * pad, y2 + [y2[0]] * pad
    bs_p = [b if b is not None else ys_p[0] for b in biases] + [ys_p[0]] * pad
    bias_bits = sum(1 << i for i, b in enumerate(biases) if b is not None)
    ns_p = list(ns) + [0] * pad
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),
            sum(triton.cdiv(n, cfg["BLOCK_N"]) for n in ns))
    _fused_base_lora_kernel[grid](
        x2, *ws_p, *bs_p, lora_a, lora_b, scaling, ids, *ys_p,
        m, k, lora_a.shape[0], r, *ns_p,
        x2.stride(0), x2.stride(1), *(w.stride(0) for w in ws_p),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), *(y.stride(0) for y in ys_p),
        NUM_SLICES=s, BIAS_BITS=bias_bits, num_warps=warps, **cfg)
    return ys


def takes_fused(x: torch.Tensor, weights: list[torch.Tensor], lora_a: torch.Tensor) -> bool:
    """Whether a fuse_base call runs this kernel: a decode-sized call (M ≤ 64) whose base path
    on this GPU is "fused_base" (gated_lora_config.pick_base: the tuned table, else fused)."""
    k = x.shape[-1]
    m = x.numel() // max(k, 1)
    if m > MAX_ROWS:
        return False
    ns = tuple(w.shape[0] for w in weights)
    return pick_base(m, k, ns, lora_a.shape[1] // len(weights), x.device) == "fused_base"


def fused_or_split(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                   lora_b: torch.Tensor, scaling: torch.Tensor,
                   adapter_ids: torch.Tensor) -> list[torch.Tensor]:
    """The fused kernel where `takes_fused`, the split path (F.linear + LoRA kernels)
    otherwise."""
    if takes_fused(x, weights, lora_a):
        return fused_base_lora_triton(x, weights, biases, lora_a, lora_b, scaling, adapter_ids)
    return gated_lora_linear_triton(x, weights, biases, lora_a, lora_b, scaling, adapter_ids)


@torch.library.custom_op("prism_fast::fused_base_lora", mutates_args=())
def fused_base_lora_op(x: torch.Tensor, weights: list[torch.Tensor],
                       biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                       lora_b: torch.Tensor, scaling: torch.Tensor,
                       adapter_ids: torch.Tensor) -> list[torch.Tensor]:
    # Guards its own arguments (SPEC §4), ids' values unread: out-of-range ids are closed rows.
    check_gated_lora_args(x, weights, biases, lora_a, lora_b, scaling, adapter_ids,
                          check_values=False)
    return fused_or_split(x, weights, biases, lora_a, lora_b, scaling, adapter_ids)


fused_base_lora_op.register_fake(group_outputs_like)
