"""Gated multi-LoRA, device code: the one kernel body of every path and its @triton.jit helpers.

The path is a tl.constexpr, STAGE: FUSED (0), SHRINK (1), EXPAND (2) or COOP (3, shrink, grid
barrier, expand in one launch; PHASE 1 / 2 run its halves as two launches under the
interpreter). The shared pieces exist once: the tile's rows and ids (`_tile_rows`), the K loop
of the shrink (`_shrink`; one block of it, `_shrink_step`, also serves fused_base_lora.py), the
slice and N tile of a program (`_slice_tile`), the expand dot (`_expand`) and the masked add
into y (`_add_into`). The maths and the layout of the operands
are documented in kernels/gated_lora.py; the host side is gated_lora_launch.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

STAGE_FUSED = 0
STAGE_SHRINK = 1
STAGE_EXPAND = 2
STAGE_COOP = 3   # experimental: shrink, grid barrier, expand in one launch
MAX_SLICES = 3   # outputs y0, y1, y2: one to three projections that read the same x


@triton.jit
def _tile_rows(ids_ptr, pid_m, M, T, L, BLOCK_M: tl.constexpr, SEQ_IDS: tl.constexpr):
    """Rows of tile `pid_m` (int64) and their adapter ids: −1 for closed, masked or invalid."""
    if SEQ_IDS:
        # One id per sequence of T rows; tiles never straddle two sequences.
        tiles_per_seq = tl.cdiv(T, BLOCK_M)
        seq = pid_m // tiles_per_seq
        t = (pid_m % tiles_per_seq) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = seq.to(tl.int64) * T + t
        valid = t < T
        ids = tl.load(ids_ptr + seq + tl.zeros([BLOCK_M], tl.int32))
    else:
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < M
        ids = tl.load(ids_ptr + rows, mask=valid, other=-1)
    # Range-check in the ids' own dtype before narrowing, so 2**32 cannot wrap to 0.
    ids = tl.where(valid & (ids >= 0) & (ids < L), ids, -1).to(tl.int32)
    return rows, ids


@triton.jit
def _shrink(x_ptr, a_ptr, rows, sel, adapter, cols, col_mask, k_lo, k_hi,
            stride_xm, stride_xk, stride_al, stride_ar, stride_ak,
            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u[BLOCK_M, BLOCK_R] = x[rows, k_lo:k_hi] · A[adapter, cols, k_lo:k_hi]ᵀ in fp32."""
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    x_rows = x_ptr + rows[:, None] * stride_xm
    a_cols = _a_cols(a_ptr, adapter, cols, stride_al, stride_ar)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_hi
        xt = tl.load(x_rows + k[None, :].to(tl.int64) * stride_xk,
                     mask=sel[:, None] & k_mask[None, :], other=0.0)       # [BM, BK]
        acc = _shrink_step(acc, xt, a_cols, k, k_mask, col_mask, stride_ak)
    return acc


@triton.jit
def _a_cols(a_ptr, adapter, cols, stride_al, stride_ar):
    """Pointers to A[adapter, cols, 0] as a [1, BLOCK_R] row (64-bit offsets)."""
    return a_ptr + adapter.to(tl.int64) * stride_al + cols[None, :].to(tl.int64) * stride_ar


@triton.jit
def _shrink_step(acc, xt, a_cols, k, k_mask, col_mask, stride_ak):
    """One K block of the shrink: acc + xt · A[cols, k]ᵀ, with xt [BM, BK] already loaded (the
    fused base kernel shares its x tile with the base product)."""
    at = tl.load(a_cols + k[:, None].to(tl.int64) * stride_ak,
                 mask=k_mask[:, None] & col_mask[None, :], other=0.0)      # [BK, BR]
    # fp32 adapters with fp16/bf16 x: x is widened in registers and the dot stays fp32 (ieee)
    return tl.dot(xt.to(at.dtype), at, acc, input_precision="ieee")


@triton.jit
def _expand(u_hi, u_lo, b_ptr, adapter, cols, col_lo, col_hi, n_off, n, n_mask,
            stride_bl, stride_bn, stride_br, SPLIT_U: tl.constexpr):
    """u[:, cols] · B[adapter, n_off + n, cols − col_lo]ᵀ over the columns in [col_lo, col_hi).

    Columns outside the range load zeros from B, so one u tile can serve every slice.
    """
    r = cols - col_lo
    r_mask = (cols >= col_lo) & (cols < col_hi)
    bt = tl.load(b_ptr + adapter.to(tl.int64) * stride_bl
                 + (n_off + n)[None, :].to(tl.int64) * stride_bn
                 + r[:, None].to(tl.int64) * stride_br,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)       # [BR, BN]
    if SPLIT_U:
        out = tl.dot(u_hi, bt)
        out = tl.dot(u_lo, bt, out)
    else:
        out = tl.dot(u_hi, bt, input_precision="ieee")
    return out


@triton.jit
def _add_into(y_ptr, stride_ym, rows, sel, n, n_mask, out, scale):
    """y[rows, n] += scale · out for the selected rows only (closed rows are never stored)."""
    ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :]
    mask = sel[:, None] & n_mask[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (y.to(tl.float32) + scale * out).to(y.dtype), mask=mask)


@triton.jit
def _split_u(u, dtype: tl.constexpr, SPLIT_U: tl.constexpr):
    if SPLIT_U:
        hi = u.to(dtype)
        lo = (u - hi.to(tl.float32)).to(dtype)
    else:
        hi = u
        lo = u
    return hi, lo


@triton.jit
def _slice_tile(pid_n, N0, N1, N2, y0_ptr, y1_ptr, y2_ptr, stride_y0, stride_y1, stride_y2,
                BLOCK_N: tl.constexpr, NUM_SLICES: tl.constexpr):
    """The slice a program's pid_n falls in, with its output, row stride, width, row offset in
    lora_b and the N tile within it. One slice per program keeps a single expand in the body
    (unrolling all slices into every program spilled registers on sm_90) and its grid has no
    idle programs where the slices differ in width (q 4096 vs k/v 1024)."""
    if NUM_SLICES == 1:
        return y0_ptr, stride_y0, N0, 0, 0, pid_n
    t0 = tl.cdiv(N0, BLOCK_N)
    t01 = t0 + tl.cdiv(N1, BLOCK_N)
    in1 = pid_n >= t0
    in2 = pid_n >= t01
    y_ptr = tl.where(in2, y2_ptr, tl.where(in1, y1_ptr, y0_ptr))
    stride_ym = tl.where(in2, stride_y2, tl.where(in1, stride_y1, stride_y0))
    n_size = tl.where(in2, N2, tl.where(in1, N1, N0))
    n_off = tl.where(in2, N0 + N1, tl.where(in1, N0, 0))
    tile = pid_n - tl.where(in2, t01, tl.where(in1, t0, 0))
    return y_ptr, stride_ym, n_size, n_off, in1.to(tl.int32) + in2.to(tl.int32), tile


@triton.jit
def _grid_barrier(ctr_ptr, n_programs):
    """Wait until `n_programs` programs have arrived at ctr_ptr[0]; the last to leave resets
    both counters (arrivals, departures) to 0 for the next launch, which stream order keeps
    from starting before this one ends. Needs every program of the row co-resident (the
    cooperative config caps its grid at one program per SM). GPU only: the interpreter runs
    programs one after another, so there the cooperative stage runs as two launches."""
    tl.atomic_add(ctr_ptr, 1, sem="release")
    seen = tl.atomic_add(ctr_ptr, 0, sem="acquire")
    while seen < n_programs:
        seen = tl.atomic_add(ctr_ptr, 0, sem="acquire")
    if tl.atomic_add(ctr_ptr + 1, 1, sem="acq_rel") == n_programs - 1:
        tl.atomic_xchg(ctr_ptr, 0)
        tl.atomic_xchg(ctr_ptr + 1, 0)


@triton.jit
def _shrink_units(x_ptr, a_ptr, buf_ptr, rows, ids, pid_n, K, L, SR,
                  stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_um, stride_uk,
                  SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """SHRINK's work of one program: one column tile of u over one K split (a unit), looping
    over the distinct adapters of the tile (once for per-sequence ids or PRISM's L = 1)."""
    unit_cols = tl.cdiv(SR, BLOCK_R)
    if pid_n < unit_cols * SPLIT_K:   # the cooperative grid may be wider than the units
        remaining = ids >= 0
        while tl.max(remaining.to(tl.int32), axis=0) > 0:
            adapter = tl.min(tl.where(remaining, ids, L), axis=0)
            sel = remaining & (ids == adapter)
            cols = (pid_n // SPLIT_K) * BLOCK_R + tl.arange(0, BLOCK_R)
            col_mask = cols < SR
            k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            k_lo = (pid_n % SPLIT_K) * k_per
            k_hi = tl.minimum(K, k_lo + k_per)
            u = _shrink(x_ptr, a_ptr, rows, sel, adapter, cols, col_mask, k_lo, k_hi,
                        stride_xm, stride_xk, stride_al, stride_ar, stride_ak,
                        BLOCK_M, BLOCK_R, BLOCK_K)
            # Each K split writes its own partial: no memset launch, no atomics, and the
            # expand's sum over partials is deterministic.
            split = (pid_n % SPLIT_K).to(tl.int64)
            tl.store(buf_ptr + split * stride_uk + rows[:, None] * stride_um + cols[None, :],
                     u, mask=sel[:, None] & col_mask[None, :])
            remaining = remaining & (ids != adapter)


@triton.jit
def _expand_tile(x_ptr, a_ptr, b_ptr, scale_ptr, buf_ptr, y0_ptr, y1_ptr, y2_ptr, rows, ids,
                 pid_n, K, L, R, N0, N1, N2,
                 stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_bl, stride_bn,
                 stride_br, stride_y0, stride_y1, stride_y2, stride_um, stride_uk,
                 STAGE: tl.constexpr, NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_R: tl.constexpr, dtype: tl.constexpr, SPLIT_U: tl.constexpr):
    """EXPAND's (or FUSED's) work of one program: one (slice, N tile), pid_n running over slice
    0's N tiles, then 1's, 2's, looping over the distinct adapters of the tile."""
    y_ptr, stride_ym, n_size, n_off, s, tile = _slice_tile(
        pid_n, N0, N1, N2, y0_ptr, y1_ptr, y2_ptr, stride_y0, stride_y1, stride_y2,
        BLOCK_N, NUM_SLICES)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < n_size
    col_lo = s * R
    remaining = ids >= 0
    if STAGE == 3:   # the cooperative grid may be wider than the expand's tiles
        n_tiles = tl.cdiv(N0, BLOCK_N) + tl.cdiv(N1, BLOCK_N) + tl.cdiv(N2, BLOCK_N)
        remaining = remaining & ((ids * 0 + pid_n) < n_tiles)   # as a [BLOCK_M] mask
    while tl.max(remaining.to(tl.int32), axis=0) > 0:
        adapter = tl.min(tl.where(remaining, ids, L), axis=0)
        sel = remaining & (ids == adapter)
        scale = tl.load(scale_ptr + s * L + adapter)
        if STAGE == 0:  # FUSED: this slice's [BM, R] shrink in registers
            cols = col_lo + tl.arange(0, BLOCK_R)
            u = _shrink(x_ptr, a_ptr, rows, sel, adapter, cols, cols < col_lo + R, 0, K,
                        stride_xm, stride_xk, stride_al, stride_ar, stride_ak,
                        BLOCK_M, BLOCK_R, BLOCK_K)
            u_hi, u_lo = _split_u(u, dtype, SPLIT_U)
            out = _expand(u_hi, u_lo, b_ptr, adapter, cols, col_lo, col_lo + R, n_off, n,
                          n_mask, stride_bl, stride_bn, stride_br, SPLIT_U)
        else:  # EXPAND / COOP: read u back in BLOCK_R column chunks of this slice
            out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for c0 in range(col_lo, col_lo + R, BLOCK_R):
                cols = c0 + tl.arange(0, BLOCK_R)
                u_ptrs = buf_ptr + rows[:, None] * stride_um + cols[None, :]
                u_mask = sel[:, None] & (cols < col_lo + R)[None, :]
                u = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                for split in range(SPLIT_K):
                    u += tl.load(u_ptrs + split * stride_uk, mask=u_mask, other=0.0)
                u_hi, u_lo = _split_u(u, dtype, SPLIT_U)
                out += _expand(u_hi, u_lo, b_ptr, adapter, cols, col_lo, col_lo + R, n_off,
                               n, n_mask, stride_bl, stride_bn, stride_br, SPLIT_U)
        _add_into(y_ptr, stride_ym, rows, sel, n, n_mask, out, scale)
        remaining = remaining & (ids != adapter)


@triton.jit
def _gated_lora_kernel(
    x_ptr, a_ptr, b_ptr, scale_ptr, ids_ptr, buf_ptr, y0_ptr, y1_ptr, y2_ptr, ctr_ptr,
    M, K, T, L, R, N0, N1, N2,
    stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_bl, stride_bn, stride_br,
    stride_y0, stride_y1, stride_y2, stride_um, stride_uk,
    STAGE: tl.constexpr, SEQ_IDS: tl.constexpr, NUM_SLICES: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PHASE: tl.constexpr = 0,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, ids = _tile_rows(ids_ptr, pid_m, M, T, L, BLOCK_M, SEQ_IDS)
    if tl.max((ids >= 0).to(tl.int32), axis=0) == 0:
        # Every row of the tile is closed: no load of x, A or B. Every program of this row of
        # the grid sees the same ids, so a cooperative row leaves its barrier together.
        return
    SR = NUM_SLICES * R
    # u meets B in B's dtype: half-precision B takes u as a hi + lo pair, fp32 B (fp32 models,
    # or fp32 adapters on a half model, as PEFT keeps them) a single fp32 "ieee" dot.
    dtype: tl.constexpr = b_ptr.dtype.element_ty
    SPLIT_U: tl.constexpr = dtype != tl.float32
    # COOP (STAGE 3) = SHRINK's work spread over the expand's grid, a grid barrier, then
    # EXPAND's work: PHASE 0 is the one-launch GPU kernel; PHASE 1 / 2 run its halves as two
    # launches (the interpreter runs programs one after another, so a barrier would hang).
    DO_SHRINK: tl.constexpr = STAGE == 1 or (STAGE == 3 and PHASE != 2)
    DO_EXPAND: tl.constexpr = STAGE == 0 or STAGE == 2 or (STAGE == 3 and PHASE != 1)
    if DO_SHRINK:
        _shrink_units(x_ptr, a_ptr, buf_ptr, rows, ids, pid_n, K, L, SR,
                      stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_um,
                      stride_uk, SPLIT_K, BLOCK_M, BLOCK_K, BLOCK_R)
    if STAGE == 3 and PHASE == 0:
        _grid_barrier(ctr_ptr + 2 * pid_m, tl.num_programs(1))
    if DO_EXPAND:
        _expand_tile(x_ptr, a_ptr, b_ptr, scale_ptr, buf_ptr, y0_ptr, y1_ptr, y2_ptr, rows, ids,
                     pid_n, K, L, R, N0, N1, N2,
                     stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_bl,
                     stride_bn, stride_br, stride_y0, stride_y1, stride_y2, stride_um,
                     stride_uk, STAGE, NUM_SLICES, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K,
                     BLOCK_R, dtype, SPLIT_U)


POINTERS = ("x_ptr", "a_ptr", "b_ptr", "scale_ptr", "ids_ptr", "buf_ptr", "y0_ptr", "y1_ptr",
            "y2_ptr", "ctr_ptr")
ARG_NAMES = tuple(_gated_lora_kernel.arg_names)
assert ARG_NAMES[:len(POINTERS)] == POINTERS, "the launcher passes the pointers first"


def interpreted() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not hasattr(_gated_lora_kernel, "device_caches")   # an InterpretedFunction
