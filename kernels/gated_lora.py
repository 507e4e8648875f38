"""Gated multi-LoRA linear: the base projection plus a per-row persona adapter.

For every output slice s (1 to 3 projections that read the same input, e.g. q/k/v or gate/up):

    y_s[i] = x[i] W_sᵀ (+ b_s)                                         id[i] ∉ {0…L−1}
    y_s[i] = x[i] W_sᵀ (+ b_s) + scaling[s, id] · (x[i] A_s[id]ᵀ) B_s[id]ᵀ  id[i] ∈ {0…L−1}

Shapes, with M = rows of x after flattening its leading dimensions:
    x        [M, K]          any strides
    W_s      [N_s, K], b_s [N_s] or None
    lora_a   [L, S·R, K]     slice s owns rows s·R … s·R+R−1 (an adapter of rank r < R is zero-padded)
    lora_b   [L, ΣN_s, R]    slice s owns rows N_0+…+N_{s−1} … (+N_s)
    scaling  [S, L] float32
    ids      [M] (one per row) or [B] with x = [B, T, K] (one per sequence);
             −1 is a closed gate, and so is any id outside 0…L−1 (memory safety: never indexed).

The base is `F.linear`, the very computation the unpatched layer does, so a closed row is
bit-identical to it: the kernels never store into closed rows. The LoRA term is added in place:

    u = x A[id]ᵀ       (shrink, fp32 accumulation, the [M, S·R] intermediate stays fp32)
    y += s · u B[id]ᵀ  (expand; for fp16/bf16, u is split into hi + lo halves so that two
                        tensor-core dots keep ≈16 mantissa bits of u, never one rounding to 8)

Paths, one kernel body (`STAGE`), chosen per call by `pick_config`:
  * SPLIT, the default (decode and prefill): SHRINK over every slice of the group, then EXPAND.
    The shrink splits K across programs when the grid is small, each split writing its own
    fp32 partial [SPLIT_K, M, S·R] that the expand sums (no memset, no atomics). With one id
    per sequence, row tiles never straddle sequences, so a tile has one adapter and a closed
    sequence costs its tiles an early exit. Why it is the decode default: see FUSED_MAX_A_ELEMS.
  * FUSED, one launch, selectable at decode (≤ 64 rows): each program owns one N tile of one
    slice, computes its rows' shrink for that slice, then expands it.
  * COOP, one launch, experimental (decode, a table or prism_fast.tune's choice only): SHRINK's
    units spread over EXPAND's grid, a grid barrier, then EXPAND; run as two launches (PHASE
    1, 2) under the interpreter, where programs run one after another.
Tiles whose rows are all closed return before loading x, A or B. A tile with several adapters
(per-token ids) loops over the distinct ids it holds.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._checks import check_input, check_range, check_tensor, expect

STAGE_FUSED = 0
STAGE_SHRINK = 1
STAGE_EXPAND = 2
STAGE_COOP = 3   # experimental: shrink, grid barrier, expand in one launch
MAX_SLICES = 3
MAX_ADAPTERS = 64
MAX_RANK = 128

# ----------------------------------------------------------------------------------------------
# device code
# ----------------------------------------------------------------------------------------------


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
    a_cols = a_ptr + adapter.to(tl.int64) * stride_al + cols[None, :].to(tl.int64) * stride_ar
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_hi
        xt = tl.load(x_rows + k[None, :].to(tl.int64) * stride_xk,
                     mask=sel[:, None] & k_mask[None, :], other=0.0)       # [BM, BK]
        at = tl.load(a_cols + k[:, None].to(tl.int64) * stride_ak,
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BK, BR]
        # fp32 adapters with fp16/bf16 x: x is widened in registers and the dot stays fp32 (ieee)
        acc = tl.dot(xt.to(at.dtype), at, acc, input_precision="ieee")
    return acc


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

    # Loop over the distinct adapters of the tile (once for per-sequence ids or PRISM's L = 1).
    if DO_SHRINK:   # one column tile of u over one K split per program (unit)
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
    if STAGE == 3 and PHASE == 0:
        _grid_barrier(ctr_ptr + 2 * pid_m, tl.num_programs(1))
    if DO_EXPAND:
        # One (slice, N tile) per program: pid_n runs over slice 0's N tiles, then 1's, 2's.
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


# ----------------------------------------------------------------------------------------------
# configs: heuristic defaults, optionally overridden by a per-GPU table from bench/tune_gated_lora
# ----------------------------------------------------------------------------------------------

FUSED_MAX_ROWS = 64   # decode batches (M ≤ 64): the rows where the path is a choice
PATHS = ("split", "fused", "coop")
# The decode path is SPLIT (a shrink launch over every slice of the group, then an expand
# launch), because it is what the only GPU evidence favours (shared/EVIDENCE.md, H200, CUDA
# graphs, bf16, r = 16, Llama-3-8B shapes, M = 1): recomputing the shrink in every N tile, the
# FUSED design, added +9.8 µs to q_proj (1.95×), +8.9 µs to k_proj (2.41×) and +30.3 µs to
# down_proj (1.94×); shrink + expand added +4.3, +3.7 and +6.7 µs. At decode the per-program
# streaming of A and the launch count dominate, not bytes. FUSED stays selectable per GPU
# (table "path:<M>" = "fused", or "fused_max_a_elems": fuse where K·R is at most this) and COOP
# (one launch with a grid barrier, experimental) only by a table or prism_fast.tune's choice.
FUSED_MAX_A_ELEMS = 0


def config_path(device_name: str) -> Path:
    """Where bench/tune_gated_lora.py writes, and pick_config reads, a GPU's tuned table."""
    return Path(__file__).parent / "configs" / (device_name.replace(" ", "_") + ".json")


@functools.lru_cache(maxsize=8)
def _tuned_table(device_name: str) -> dict:
    path = config_path(device_name)
    return json.loads(path.read_text()) if path.exists() else {}


@functools.lru_cache(maxsize=16)
def _device_key(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, props.multi_processor_count
    return "cpu", 4


# Paths chosen at run time (prism_fast.tune, measured on this GPU), by (K, N_s…, R, M bucket):
# they take precedence over the table's "path:<M>" entries.
_CHOSEN_PATHS: dict[tuple[int, tuple[int, ...], int, int], str] = {}


def choose_path(k: int, ns: tuple[int, ...], r: int, m_bucket: int, path: str | None) -> None:
    """Use `path` ("split", "fused" or "coop"; None = the default again) for calls with these
    shapes whose M rounds up to the power of two `m_bucket`. Clears the config and plan caches."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS} or None, got {path!r}")
    key = (k, tuple(ns), r, m_bucket)
    if path is None:
        _CHOSEN_PATHS.pop(key, None)
    else:
        _CHOSEN_PATHS[key] = path
    pick_config.cache_clear()
    _PLANS.clear()
    for launcher in list(_LAUNCHERS):
        launcher.plans.clear()


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, k: int, ns: tuple[int, ...], r: int, device: torch.device) -> dict:
    """Path and block sizes for one call: {"stages": [...], stage: {BLOCK_*, num_warps}, "SPLIT_K"}.

    m rows, k inputs, ns the width of each slice, r the rank. Cached: no work on the hot path.
    See `config_for`.
    """
    m_key = triton.next_power_of_2(max(m, 1))
    return config_for(m, k, ns, r, *_device_key(device),
                      path=_CHOSEN_PATHS.get((k, ns, r, m_key)))


def config_for(m: int, k: int, ns: tuple[int, ...], r: int, device_name: str, sms: int,
               table: dict | None = None, path: str | None = None) -> dict:
    """`pick_config` for a named GPU with `sms` multiprocessors (bench/kernel_resources.py
    compiles these for a GPU that is not here). A per-GPU table (kernels/configs/<GPU name>.json,
    written by bench/tune_gated_lora.py; `table` replaces it) may override any entry, keyed
    "<stage>:<next power of 2 of M>", the decode path, "path:<M>" (split, fused or coop), and
    "fused_max_a_elems" (decode fuses where K·R is at most this; default 0). `path` forces the
    path of a decode call (M ≤ 64); prefill always splits. COOP falls back to SPLIT where its
    grid would exceed one program per SM (its barrier needs every program resident)."""
    table = _tuned_table(device_name) if table is None else table
    m_key = triton.next_power_of_2(max(m, 1))
    sr, n_max = len(ns) * r, max(ns)
    if m > FUSED_MAX_ROWS:
        path = "split"
    elif path is None:
        fused = k * r <= table.get("fused_max_a_elems", FUSED_MAX_A_ELEMS)
        path = table.get(f"path:{m_key}", "fused" if fused else "split")
    # Block sizes and warps keep every variant the sweep's shapes use free of register spills
    # on sm_90 under Triton 3.6 and 3.9 (bench/kernel_resources.py, checked in CI): 64-row
    # tiles with 4 warps spill up to 2.4 KB per thread, and a K tile of 128 in the fused decode
    # kernel takes 233 registers (3.6) against 128 for a K tile of 64.
    if path == "fused":
        br = max(16, triton.next_power_of_2(r))   # one slice's R columns of u per program
        # Every program streams its A slice, whatever its N tile: wider tiles where 64 would
        # take more than one wave (Llama-3-8B gate/up: 448 programs at 64, 224 at 128).
        bn = 128 if br == 16 and sum(triton.cdiv(n, 64) for n in ns) > sms else 64
        cfg = {STAGE_FUSED: dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=64, BLOCK_R=br,
                                 num_warps=4 if br <= 32 else 8)}
        cfg[STAGE_FUSED].update(table.get(f"fused:{m_key}", {}))
        cfg[STAGE_FUSED]["BLOCK_R"] = max(cfg[STAGE_FUSED]["BLOCK_R"], br)   # must cover R
        return {"stages": [STAGE_FUSED], "SPLIT_K": 1, **cfg}
    if path == "coop":
        coop = _coop_config(m, k, ns, r, sms)
        if coop is not None:
            coop[STAGE_COOP].update(table.get(f"coop:{m_key}", {}))
            return coop
    bm = 64 if m >= 256 else 16
    warps = 8 if bm == 64 else 4
    shrink = dict(BLOCK_M=bm, BLOCK_N=16, BLOCK_K=64,
                  BLOCK_R=max(16, min(64, triton.next_power_of_2(sr))), num_warps=warps)
    shrink.update(table.get(f"shrink:{m_key}", {}))
    # Split K until the shrink grid fills the GPU twice over, keeping ≥ 256 of K per split.
    tiles = triton.cdiv(m, shrink["BLOCK_M"]) * triton.cdiv(sr, shrink["BLOCK_R"])
    split = 1
    while tiles * split < 2 * sms and k // (split * 2) >= 256 and split < 16:
        split *= 2
    split = table.get(f"split_k:{m_key}", split)
    # The expand reads u back in chunks of ≤ 32 columns (a rank-64 slice takes two).
    expand = dict(BLOCK_M=bm, BLOCK_N=64 if n_max >= 64 else 32, BLOCK_K=16,
                  BLOCK_R=max(16, min(32, triton.next_power_of_2(r))), num_warps=warps)
    expand.update(table.get(f"expand:{m_key}", {}))
    return {"stages": [STAGE_SHRINK, STAGE_EXPAND], "SPLIT_K": split,
            STAGE_SHRINK: shrink, STAGE_EXPAND: expand}


def _coop_config(m: int, k: int, ns: tuple[int, ...], r: int, sms: int) -> dict | None:
    """COOP blocks: the expand's (slice, N tile) grid, N tiles widened until the whole grid fits
    one program per SM; its programs first share the shrink's (column tile, K split) units.
    None where even 256-wide tiles do not fit."""
    bm = 16
    grid_m = -(-m // bm)
    for bn in (64, 128, 256):
        grid_n = sum(-(-n // bn) for n in ns)
        if grid_m * grid_n <= sms:
            break
    else:
        return None
    br = max(16, min(32, triton.next_power_of_2(r)))
    cols = -(-len(ns) * r // br)
    # As many K splits as the grid has programs for, ≥ 256 of K each, at most 16: the expand
    # sums the partials in an unrolled loop, and 32 of them spilled 20 B on sm_90 (down, M = 1).
    split = 1
    while cols * split * 2 <= grid_n and k // (split * 2) >= 256 and split < 16:
        split *= 2
    # 256-wide N tiles take 8 warps: with 4, R = 32 spilled 416-420 B on sm_90 under Triton 3.6
    # (255 registers; none spill at 8, ≤ 254). One program per SM, so 8 warps cost no residency.
    return {"stages": [STAGE_COOP], "SPLIT_K": split,
            STAGE_COOP: dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, BLOCK_R=br,
                             num_warps=8 if bn == 256 else 4)}


# ----------------------------------------------------------------------------------------------
# checks (shared with the PyTorch backend, so both raise the same errors)
# ----------------------------------------------------------------------------------------------

_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)  # signed: −1 means closed


def check_gated_lora_args(x: torch.Tensor, weights: list[torch.Tensor],
                          biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: torch.Tensor,
                          adapter_ids: torch.Tensor, check_values: bool = True) -> None:
    """Validate the multi-slice op's arguments (the public op's and the registered op's).

    Raises TypeError / ValueError naming the argument, what was expected and what was given.
    The id range is checked only where that needs no device sync (CPU tensors) and never while
    tracing or for fake tensors (`check_values=False`, and under torch.compile): an id outside
    −1…L−1 is then treated as a closed gate, by the kernels and by the reference alike.
    """
    check_input("x", x)
    expect(x.dim() >= 1, ValueError, "x: expected shape (..., K), got a 0-d tensor")
    k = x.shape[-1]
    expect(isinstance(weights, (list, tuple)) and isinstance(biases, (list, tuple)), TypeError,
           lambda: f"weights, biases: expected lists of tensors, got {type(weights).__name__} and "
           f"{type(biases).__name__}")
    s = len(weights)
    expect(1 <= s <= MAX_SLICES, ValueError,
           lambda: f"weights: expected 1 to {MAX_SLICES} projections, got {s}")
    expect(len(biases) == s, ValueError,
           lambda: f"biases: expected {s} entries (one per weight), got {len(biases)}")
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_projection(f"[{i}]" if s > 1 else "", w, b, x)
    check_tensor("lora_a", lora_a, x, "x", 3)
    check_tensor("lora_b", lora_b, x, "x", 3)
    # Adapters in x's dtype, or fp32 on a half-precision x (PEFT keeps LoRA weights in fp32).
    expect(lora_a.dtype in (x.dtype, torch.float32), TypeError,
           lambda: f"lora_a: expected dtype {x.dtype} (the dtype of x) or torch.float32, got "
           f"{lora_a.dtype}")
    expect(lora_b.dtype == lora_a.dtype, TypeError,
           lambda: f"lora_b: expected dtype {lora_a.dtype} (the dtype of lora_a), got {lora_b.dtype}")
    n_adapters, sr, ka = lora_a.shape
    expect(1 <= n_adapters <= MAX_ADAPTERS, ValueError,
           lambda: f"lora_a: expected 1 to {MAX_ADAPTERS} adapters (dim 0), got {n_adapters}")
    expect(sr % s == 0, ValueError,
           lambda: f"lora_a: expected dim 1 = {s}·R (rank R per projection, {s} projections), got {sr}")
    r = sr // s
    expect(1 <= r <= MAX_RANK, ValueError,
           lambda: f"lora_a: expected rank 1 to {MAX_RANK} per projection, got rank {r}"
           + (f" (dim 1 = {sr} for {s} projections)" if s > 1 else ""))
    expect(ka == k, ValueError, lambda: f"lora_a: expected shape (L, R, {k}) to match x, got "
           f"{tuple(lora_a.shape)}")
    n_total = sum(w.shape[0] for w in weights)
    expect(tuple(lora_b.shape) == (n_adapters, n_total, r), ValueError,
           lambda: f"lora_b: expected shape ({n_adapters}, {n_total}, {r}) to match lora_a and weight, "
           f"got {tuple(lora_b.shape)}")
    check_tensor("scaling", scaling, x, "x")
    expect(scaling.dtype.is_floating_point, TypeError,
           lambda: f"scaling: expected a floating-point tensor, got {scaling.dtype}")
    shapes = [(s, n_adapters)] if s > 1 else [(n_adapters,), (1, n_adapters)]
    expect(tuple(scaling.shape) in shapes, ValueError,
           lambda: f"scaling: expected shape {shapes[0]} (one per adapter"
           + (" and projection" if s > 1 else "") + f"), got {tuple(scaling.shape)}")
    check_tensor("adapter_ids", adapter_ids, x, "x")
    expect(adapter_ids.dtype in _INTS, TypeError,
           lambda: f"adapter_ids: expected a signed integer tensor, got {adapter_ids.dtype}")
    per_token = tuple(x.shape[:-1])
    per_seq = tuple(x.shape[:1]) if x.dim() == 3 else None
    shape = tuple(adapter_ids.shape)
    expect(shape == per_token or shape == per_seq, ValueError,
           lambda: f"adapter_ids: expected shape {per_token} (one per token)"
           + (f" or {per_seq} (one per sequence)" if per_seq else "") + f", got {shape}")
    if check_values:
        check_range("adapter_ids", adapter_ids, -1, n_adapters - 1, "-1 = base")


def _check_projection(index: str, w: torch.Tensor, b: torch.Tensor | None,
                      x: torch.Tensor) -> None:
    """One projection's weight [N, K] and bias [N] or None against x [..., K]."""
    k = x.shape[-1]
    check_tensor(f"weight{index}", w, x, "x", 2, x.dtype)
    expect(w.shape[1] == k, ValueError,
           lambda: f"weight: expected shape (N, {k}) to match x (..., {k}), got {tuple(w.shape)}")
    if b is not None:
        check_tensor(f"bias{index}", b, x, "x", 1, x.dtype)
        expect(b.shape[0] == w.shape[0], ValueError,
               lambda: f"bias: expected shape ({w.shape[0]},), got {tuple(b.shape)}")


def ids_per_sequence(x: torch.Tensor, adapter_ids: torch.Tensor) -> bool:
    """True when x is [B, T, K] and adapter_ids is [B]: one id per sequence."""
    return x.dim() == 3 and adapter_ids.dim() == 1


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


class _StagePlan:
    """One launch of a plan: its grid and every non-pointer argument, fixed by the plan's key,
    and the compiled kernels it has launched, by (current device, pointer alignment)."""

    __slots__ = ("grid", "kwargs", "tail", "compiled")

    def __init__(self, grid: tuple[int, int], kwargs: dict):
        self.grid, self.kwargs = grid, kwargs
        self.tail = tuple(kwargs[n] for n in _ARG_NAMES[len(_POINTERS):])   # kernel's order
        self.compiled: dict = {}


class _Plan:
    """Everything a call's shapes and strides decide, resolved once: config, grids, integer
    arguments, the buffers' shapes and (on a GPU) the compiled kernel of each stage."""

    __slots__ = ("stages", "u_shape", "ctr", "aligned", "u", "direct")

    def __init__(self, stages: list[_StagePlan], u_shape: tuple | None,
                 ctr: torch.Tensor | None):
        self.stages, self.u_shape, self.ctr = stages, u_shape, ctr
        # GatedLoraLauncher only: the alignment bits its key fixes, its kept buffer u, and
        # its stages' compiled kernels by (device, alignment), bound for a direct launch.
        self.aligned = 0
        self.u: torch.Tensor | None = None
        self.direct: dict = {}


_POINTERS = ("x_ptr", "a_ptr", "b_ptr", "scale_ptr", "ids_ptr", "buf_ptr", "y0_ptr", "y1_ptr",
             "y2_ptr", "ctr_ptr")
_ARG_NAMES = tuple(_gated_lora_kernel.arg_names)
assert _ARG_NAMES[:len(_POINTERS)] == _POINTERS, "the launcher passes the pointers first"
_PLANS: dict[tuple, _Plan] = {}
_LAUNCHERS: weakref.WeakSet = weakref.WeakSet()
_MISSING = object()
_COUNTERS: dict[tuple, torch.Tensor] = {}   # COOP's barrier counters, zero between launches
_direct: list = []   # [get_current_device, get_current_stream, knobs.runtime] once resolved
# PRISM_FAST_DIRECT_LAUNCH=0 keeps every launch on Triton's own `kernel[grid]` path: the direct
# launch below mirrors Triton 3.6 / 3.9 internals, so a Triton that changes them can be run
# (slower on the host) without waiting for a fix.
_DIRECT_LAUNCH = os.environ.get("PRISM_FAST_DIRECT_LAUNCH", "1") != "0"


def _interpreted() -> bool:
    return not hasattr(_gated_lora_kernel, "device_caches")   # an InterpretedFunction


def _make_plan(m: int, t: int, seq_ids: bool, x2: torch.Tensor, lora_a: torch.Tensor,
               lora_b: torch.Tensor, y2: list[torch.Tensor], config: dict | None) -> _Plan:
    k = x2.shape[1]
    ns = [y.shape[1] for y in y2]
    n_adapters, sr, _ = lora_a.shape
    r = sr // len(ns)
    cfg = config or pick_config(m, k, tuple(ns), r, x2.device)
    if config is not None and STAGE_FUSED in config["stages"]:
        expect(config[STAGE_FUSED]["BLOCK_R"] >= r, ValueError,
               lambda: f"config: the fused stage needs BLOCK_R ≥ rank {r}, got "
               f"{config[STAGE_FUSED]['BLOCK_R']}")
    strides_y = [y.stride(0) for y in y2]
    while len(ns) < MAX_SLICES:
        ns.append(0)
        strides_y.append(strides_y[0])
    split_k = cfg["SPLIT_K"]
    n_rows = m // t if seq_ids else m
    stages = []
    for stage in cfg["stages"]:
        blocks = cfg[stage]
        bm = blocks["BLOCK_M"]
        grid_m = n_rows * -(-t // bm) if seq_ids else -(-m // bm)
        if stage == STAGE_SHRINK:
            grid_n = -(-sr // blocks["BLOCK_R"]) * split_k
        else:   # one program per (slice, N tile)
            bn = blocks["BLOCK_N"]
            grid_n = -(-ns[0] // bn) - (-ns[1] // bn) - (-ns[2] // bn)
            if stage == STAGE_COOP:   # and at least one per shrink unit
                grid_n = max(grid_n, -(-sr // blocks["BLOCK_R"]) * split_k)
        kwargs = dict(
            M=m, K=k, T=t, L=n_adapters, R=r, N0=ns[0], N1=ns[1], N2=ns[2],
            stride_xm=x2.stride(0), stride_xk=x2.stride(1),
            stride_al=lora_a.stride(0), stride_ar=lora_a.stride(1), stride_ak=lora_a.stride(2),
            stride_bl=lora_b.stride(0), stride_bn=lora_b.stride(1), stride_br=lora_b.stride(2),
            stride_y0=strides_y[0], stride_y1=strides_y[1], stride_y2=strides_y[2],
            stride_um=sr, stride_uk=m * sr, STAGE=stage, SEQ_IDS=seq_ids,
            NUM_SLICES=len(y2), SPLIT_K=split_k, PHASE=0, **blocks)
        stages.append(_StagePlan((grid_m, grid_n), kwargs))
    coop = STAGE_COOP in cfg["stages"]
    if coop and _interpreted():   # no barrier under the interpreter: its two halves in turn
        kwargs = stages[0].kwargs
        stages = [_StagePlan(stages[0].grid, {**kwargs, "PHASE": 1}),
                  _StagePlan(stages[0].grid, {**kwargs, "PHASE": 2})]
    needs_u = coop or STAGE_SHRINK in cfg["stages"]
    ctr = _counters(2 * stages[0].grid[0], x2.device) if coop else None
    return _Plan(stages, (split_k, m, sr) if needs_u else None, ctr)


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 barrier counters (2 per row of the grid), shared by launches on `device`:
    stream order keeps two cooperative launches from overlapping, and each resets its own.
    Allocated (and zeroed) at the first call of a shape, which must be eager, before any
    CUDA-graph capture of it, as the warm-up every graph needs is."""
    key = (device, n)
    ctr = _COUNTERS.get(key)
    if ctr is None:
        ctr = _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return ctr


def _hooked(hook) -> bool:
    """A launch hook that does something: a HookChain with calls, or any other callable."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _alignment(ptrs) -> int:
    """One bit per pointer: whether Triton would specialise it as 16-byte aligned."""
    aligned = 0
    for p in ptrs:
        aligned = (aligned << 1) | (p.data_ptr() & 15 == 0)
    return aligned


def _launch(stage: _StagePlan, ptrs: tuple, aligned: int) -> None:
    """Launch one stage. On a GPU, the compiled kernel found by Triton's own `kernel[grid]` path
    the first time is launched directly afterwards (Triton 3.6 and 3.9 expose the same
    `CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
    enter_hook, exit_hook, *args)` and pass it the same arguments), skipping the binder,
    specialisation and cache key (≈ 17 µs of host time per launch with this kernel's 35
    arguments). The compiled kernel depends on what Triton specialises on: every integer
    argument (fixed by the plan's key), the dtypes (in the key) and whether each pointer is
    16-byte aligned (`aligned`, `_alignment`'s mask of `ptrs`), so it is cached by those and the
    current device. Triton's path is kept wherever it does more: the interpreter, launch hooks
    (profilers; Triton 3.6 and 3.9 hold them in HookChains whose empty `calls` the launcher
    would call for nothing, while a None hook it skips), pre-run hooks."""
    if _direct:
        get_device, get_stream, runtime = _direct
        if not _hooked(runtime.launch_enter_hook) and not _hooked(runtime.launch_exit_hook) \
                and not _gated_lora_kernel.pre_run_hooks:
            device = get_device()
            kernel = stage.compiled.get((device, aligned))
            if kernel is not None:
                gx, gy = stage.grid
                kernel.run(gx, gy, 1, get_stream(device), kernel.function, kernel.packed_metadata,
                           None, None, None, *ptrs, *stage.tail)
                return
            kernel = _gated_lora_kernel[stage.grid](*ptrs, **stage.kwargs)
            if all(hasattr(kernel, a) for a in ("function", "packed_metadata", "run")):
                stage.compiled[(device, aligned)] = kernel
            return
    _gated_lora_kernel[stage.grid](*ptrs, **stage.kwargs)
    if not _direct and _DIRECT_LAUNCH and not _interpreted():
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        _direct.extend([active.get_current_device, active.get_current_stream, knobs.runtime])


class GatedLoraLauncher:
    """The lean eager path of one patched projection group, whose adapters never change:
    `launcher(ys, x, ids, seq_ids)` adds the LoRA term into the base outputs `ys` in place, as
    `add_gated_lora_(ys, x, lora_a, lora_b, scaling, ids, seq_ids)` does, at a fraction of the
    host time (bench/bench_host.py). The fixed tensors' layout and alignment are read once;
    a call's plan is keyed by what varies: x's shape, strides and dtype, the ids' shape and
    dtype, and the alignment of every per-call pointer. Decode-sized plans (M ≤ 64) keep their
    fp32 buffer u (≤ 200 KB) instead of allocating it per call: calls run in stream order, so
    one call's expand has read u before the next call's shrink writes it (one stream at a time
    per patched layer, as a model's forward runs). lora_a [L, S·R, K], lora_b [L, ΣN_s, R],
    scaling [S, L] fp32 contiguous; ys contiguous [..., N_s] (F.linear's outputs)."""

    __slots__ = ("lora_a", "lora_b", "scaling", "plans", "__weakref__")
    MAX_PLANS = 64   # distinct layouts kept (prefill lengths vary); beyond, start afresh

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor):
        self.lora_a, self.lora_b, self.scaling = lora_a, lora_b, scaling
        self.plans: dict[tuple, _Plan | None] = {}
        _LAUNCHERS.add(self)   # choose_path drops their plans

    def __reduce__(self):
        """A copy or a pickle keeps the adapters and plans afresh (plans hold compiled kernels
        and buffers of this process)."""
        return GatedLoraLauncher, (self.lora_a, self.lora_b, self.scaling)

    def __call__(self, ys: list[torch.Tensor], x: torch.Tensor, ids: torch.Tensor,
                 seq_ids: bool) -> None:
        n_ys = len(ys)
        y0 = ys[0]
        y1 = ys[1] if n_ys > 1 else y0
        y2 = ys[2] if n_ys > 2 else y0
        key = (x.shape, x.stride(), x.dtype, ids.shape, ids.stride(), ids.dtype, seq_ids, n_ys,
               _alignment((x, ids, y0, y1, y2)))
        plan = self.plans.get(key, _MISSING)
        if plan is _MISSING:
            if len(self.plans) >= self.MAX_PLANS:
                self.plans.clear()
            plan = self.plans[key] = self._plan(ys, x, ids, seq_ids)
        if plan is None:
            add_gated_lora_(ys, x, self.lora_a, self.lora_b, self.scaling, ids, seq_ids)
            return
        scaling = self.scaling
        u = plan.u
        if u is None:
            u = scaling   # placeholder pointer where no stage reads it
            if plan.u_shape is not None:
                u = torch.empty(plan.u_shape, dtype=torch.float32, device=x.device)  # [SK, M, SR]
        ptrs = (x, self.lora_a, self.lora_b, scaling, ids, u, y0, y1, y2,
                plan.ctr if plan.ctr is not None else scaling)
        aligned = plan.aligned | (u.data_ptr() & 15 == 0) << 4   # u's bit (6th of 10)
        if _direct:
            get_device, get_stream, runtime = _direct
            enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
            if (enter is None or not getattr(enter, "calls", True)) \
                    and (leave is None or not getattr(leave, "calls", True)) \
                    and not _gated_lora_kernel.pre_run_hooks:   # _hooked, inlined
                device = get_device()
                launches = plan.direct.get((device, aligned))
                if launches is not None:   # every stage's compiled kernel, resolved
                    stream = get_stream(device)
                    for run, gx, gy, function, metadata, tail in launches:
                        run(gx, gy, 1, stream, function, metadata, None, None, None, *ptrs, *tail)
                    return
                for stage in plan.stages:
                    _launch(stage, ptrs, aligned)
                kernels = [stage.compiled.get((device, aligned)) for stage in plan.stages]
                if all(k is not None for k in kernels):
                    plan.direct[(device, aligned)] = [
                        (k.run, *stage.grid, k.function, k.packed_metadata, stage.tail)
                        for k, stage in zip(kernels, plan.stages)]
                return
        for stage in plan.stages:
            _launch(stage, ptrs, aligned)

    def _plan(self, ys, x, ids, seq_ids) -> _Plan | None:
        """The generic plan for this call's layout, with x as the kernel reads it ([M, K], a
        view of x); None where x is not viewable as [M, K] (the generic path copies it)."""
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.data_ptr() != x.data_ptr() or not ids.is_contiguous() or ids.dim() != 1 \
                or _interpreted():
            return None   # the generic path: it copies x or ids, or runs the interpreter
        if x2.shape[0] == 0:
            return _Plan([], None, None)
        t = x.shape[1] if seq_ids else 1
        if seq_ids and t == 1:
            seq_ids = False
        y2 = [y if y.dim() == 2 else y.view(-1, y.shape[-1]) for y in ys]
        plan = _make_plan(x2.shape[0], t, seq_ids, x2, self.lora_a, self.lora_b, y2, None)
        ctr = plan.ctr if plan.ctr is not None else self.scaling
        y_pad = y2 + [y2[0]] * (MAX_SLICES - len(y2))
        # Every pointer's bit but u's (slot 6 of 10, bit 4), which is allocated per call.
        plan.aligned = _alignment((x, self.lora_a, self.lora_b, self.scaling, ids, ctr,
                                   *y_pad, ctr)) & ~(1 << 4)
        if plan.u_shape is not None and x2.shape[0] <= FUSED_MAX_ROWS:
            plan.u = torch.empty(plan.u_shape, dtype=torch.float32, device=x.device)
        return plan


def add_gated_lora_(ys: list[torch.Tensor], x: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: torch.Tensor, adapter_ids: torch.Tensor,
                    seq_ids: bool, config: dict | None = None) -> None:
    """Add the gated LoRA term into the base outputs `ys` (each [..., N_s], contiguous) in place.

    x [..., K]; lora_a [L, S·R, K]; lora_b [L, ΣN_s, R]; scaling [S, L] fp32;
    adapter_ids [B] (seq_ids, x = [B, T, K]) or x.shape[:-1]. Arguments are assumed checked.
    `config` (pick_config's format) forces a path and block sizes: tests reach every stage.

    Everything the shapes, strides and dtypes decide (config, grids, integer arguments) is
    resolved once per distinct key into a plan (`_PLANS`); a call then costs the key, the
    buffer allocation and the launches.
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])     # [M, K], a view where possible
    m = x2.shape[0]
    if m == 0:
        return
    ids = adapter_ids if adapter_ids.dim() == 1 and adapter_ids.is_contiguous() \
        else adapter_ids.reshape(-1).contiguous()             # the kernels index ids densely
    t = x.shape[1] if seq_ids else 1
    if seq_ids and t == 1:
        seq_ids = False  # decode: one row per sequence, so per-row tiles pack sequences densely
    y2 = [y if y.dim() == 2 else y.view(-1, y.shape[-1]) for y in ys]   # [M, N_s]
    if config is None:
        key = (m, t, seq_ids, x2.stride(), x.dtype, x.device, lora_a.shape, lora_a.stride(),
               lora_a.dtype, lora_b.shape, lora_b.stride(), lora_b.dtype, ids.dtype,
               *[(y.shape[1], y.stride(0)) for y in y2])
        plan = _PLANS.get(key)
        if plan is None:
            if len(_PLANS) >= 4096:   # prefill lengths vary without bound: start afresh
                _PLANS.clear()
            plan = _PLANS[key] = _make_plan(m, t, seq_ids, x2, lora_a, lora_b, y2, None)
    else:
        plan = _make_plan(m, t, seq_ids, x2, lora_a, lora_b, y2, config)
    u = scaling   # placeholder pointer where no stage reads it
    if plan.u_shape is not None:
        u = torch.empty(plan.u_shape, dtype=torch.float32, device=x.device)   # [SK, M, S·R]
    y_pad = y2 + [y2[0]] * (MAX_SLICES - len(y2))
    ptrs = (x2, lora_a, lora_b, scaling, ids, u, *y_pad,
            plan.ctr if plan.ctr is not None else scaling)
    aligned = _alignment(ptrs)
    for stage in plan.stages:
        _launch(stage, ptrs, aligned)


def gated_lora_linear_triton(x: torch.Tensor, weights: list[torch.Tensor],
                             biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                             lora_b: torch.Tensor, scaling: torch.Tensor,
                             adapter_ids: torch.Tensor,
                             config: dict | None = None) -> list[torch.Tensor]:
    """Base projections by `F.linear` (bit-exact for closed rows) + the gated LoRA kernels."""
    seq_ids = ids_per_sequence(x, adapter_ids)
    ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]   # S × [..., N_s]
    if scaling.dim() != 2 or scaling.dtype != torch.float32 or not scaling.is_contiguous():
        scaling = scaling.reshape(len(weights), -1).to(torch.float32).contiguous()  # [S, L]
    add_gated_lora_(ys, x, lora_a, lora_b, scaling, adapter_ids, seq_ids, config)
    return ys


# ----------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), fake impl beside it
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("prism_fast::gated_lora", mutates_args=())
def gated_lora_op(x: torch.Tensor, weights: list[torch.Tensor],
                  biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scaling: torch.Tensor,
                  adapter_ids: torch.Tensor) -> list[torch.Tensor]:
    # Callable by anyone through torch.ops: the op guards its own arguments (SPEC §4). Id values
    # are not read: out-of-range ids are closed rows in the kernels, as in a compiled graph.
    check_gated_lora_args(x, weights, biases, lora_a, lora_b, scaling, adapter_ids,
                          check_values=False)
    return gated_lora_linear_triton(x, weights, biases, lora_a, lora_b, scaling, adapter_ids)


@gated_lora_op.register_fake
def _(x, weights, biases, lora_a, lora_b, scaling, adapter_ids):
    check_gated_lora_args(x, weights, biases, lora_a, lora_b, scaling, adapter_ids,
                          check_values=False)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]
