"""Top-k distillation loss (PRISM Stage B): the student's logits only at the teacher's top-k rows.

    h    [N, H]   final hidden states of the response positions (after the last norm)
    w    [V, H]   LM head weight; b [V] its bias or None
    tv   [N, k]   teacher's top-k logits (the official files store raw logits in fp16)
    ti   [N, k]   their vocabulary indices (duplicates allowed: each entry is its own class)
    mask [N]      rows that count; a masked row gives loss 0 and no gradient
    T             temperature

    z[i, j]   = h[i] · w[ti[i, j]] + b[ti[i, j]]                           (fp32, never [N, V])
    log ps[i] = log_softmax(z[i] / T)        over the k entries only
    log pt[i] = log_softmax(tv[i] / T)       the teacher renormalised over its top-k
    loss[i]   = T² · Σ_j pt[i, j] (log pt[i, j] − log ps[i, j])

`F.kl_div(log ps, log pt, log_target=True, reduction="batchmean") · T²` of the official trainer
is Σ_i loss[i] / N (batchmean divides by the first dimension, the response length).

Backward, with g [N] the incoming gradient of loss[i]:
    dz[i, j] = g[i] · T · (ps[i, j] − pt[i, j])
    dh[i]    = Σ_j dz[i, j] w[ti[i, j]];  dw[ti[i, j]] += dz[i, j] h[i];  db[ti[i, j]] += dz[i, j]
The forward stores T · (ps − pt) [N, k] in fp32 (k floats a row) so the backward need not redo
the softmax; it re-gathers the k head rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_distill_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tv_ptr, ti_ptr, mask_ptr, loss_ptr, coef_ptr,
    H, K, temperature,
    stride_hn, stride_wv, stride_tn, stride_in,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    idx = tl.load(ti_ptr + row * stride_in + offs_k, mask=k_mask, other=0).to(tl.int64)  # [BK]
    z = tl.zeros([BLOCK_K], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        hv = tl.load(h_ptr + row * stride_hn + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + idx[:, None] * stride_wv + offs_h[None, :],
                     mask=k_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)  # [BK, BH]
        z += tl.sum(wt * hv[None, :], axis=1)
    if HAS_BIAS:
        z += tl.load(b_ptr + idx, mask=k_mask, other=0.0).to(tl.float32)
    s = tl.where(k_mask, z / temperature, float("-inf"))
    s = s - tl.max(s, axis=0)
    # Padding lanes hold 0, not -inf, so that no inf − inf is ever formed (masked below).
    log_ps = tl.where(k_mask, s - tl.log(tl.sum(tl.exp(s), axis=0)), 0.0)
    t = tl.load(tv_ptr + row * stride_tn + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    t = tl.where(k_mask, t / temperature, float("-inf"))
    t = t - tl.max(t, axis=0)
    log_pt = tl.where(k_mask, t - tl.log(tl.sum(tl.exp(t), axis=0)), 0.0)
    pt = tl.exp(log_pt)
    kl = tl.sum(tl.where(k_mask, pt * (log_pt - log_ps), 0.0), axis=0) * temperature * temperature
    keep = tl.load(mask_ptr + row) != 0
    tl.store(loss_ptr + row, tl.where(keep, kl, 0.0))
    coef = tl.where(keep & k_mask, temperature * (tl.exp(log_ps) - pt), 0.0)
    tl.store(coef_ptr + row * K + offs_k, coef, mask=k_mask)


@triton.jit
def _topk_distill_bwd_kernel(
    h_ptr, w_ptr, ti_ptr, coef_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
    H, K,
    stride_hn, stride_wv, stride_in,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    idx = tl.load(ti_ptr + row * stride_in + offs_k, mask=k_mask, other=0).to(tl.int64)  # [BK]
    dz = tl.load(coef_ptr + row * K + offs_k, mask=k_mask, other=0.0) * \
        tl.load(g_ptr + row).to(tl.float32)                                             # [BK]
    dtype: tl.constexpr = dh_ptr.dtype.element_ty
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        wt = tl.load(w_ptr + idx[:, None] * stride_wv + offs_h[None, :],
                     mask=k_mask[:, None] & h_mask[None, :], other=0.0).to(tl.float32)  # [BK, BH]
        tl.store(dh_ptr + row * H + offs_h, tl.sum(dz[:, None] * wt, axis=0).to(dtype), mask=h_mask)
        if NEED_DW:
            hv = tl.load(h_ptr + row * stride_hn + offs_h, mask=h_mask, other=0.0).to(tl.float32)
            # Rows shared between positions (and duplicate indices) add up: fp32 atomics.
            tl.atomic_add(dw_ptr + idx[:, None] * H + offs_h[None, :], dz[:, None] * hv[None, :],
                          mask=k_mask[:, None] & h_mask[None, :])
    if NEED_DB:
        tl.atomic_add(db_ptr + idx, dz, mask=k_mask)


def check_topk_distill_args(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                            tv: torch.Tensor, ti: torch.Tensor, mask: torch.Tensor) -> None:
    """TypeError / ValueError naming the argument, what was expected and what was given."""
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t in (("hidden", h), ("weight", w), ("topk_values", tv)):
        if not isinstance(t, torch.Tensor) or t.dtype not in floats:
            raise TypeError(f"{name}: expected a floating tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if h.dim() != 2 or w.dim() != 2 or w.shape[1] != h.shape[1]:
        raise ValueError(f"hidden, weight: expected [N, H] and [V, H], got {tuple(h.shape)} and "
                         f"{tuple(w.shape)}")
    if w.dtype != h.dtype or w.device != h.device:
        raise TypeError(f"weight: expected {h.dtype} on {h.device} like hidden, got {w.dtype} on "
                        f"{w.device}")
    if b is not None and (b.shape != (w.shape[0],) or b.dtype != h.dtype):
        raise ValueError(f"bias: expected ({w.shape[0]},) {h.dtype}, got {tuple(b.shape)} {b.dtype}")
    n = h.shape[0]
    if tv.dim() != 2 or tv.shape[0] != n or ti.shape != tv.shape:
        raise ValueError(f"topk_values, topk_indices: expected equal shapes [{n}, k], got "
                         f"{tuple(tv.shape)} and {tuple(ti.shape)}")
    if ti.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_indices: expected int32 or int64, got {ti.dtype}")
    if not 1 <= tv.shape[1] <= 1024:
        raise ValueError(f"topk_values: expected 1 ≤ k ≤ 1024, got k = {tv.shape[1]}")
    if mask.shape != (n,):
        raise ValueError(f"mask: expected shape ({n},), got {tuple(mask.shape)}")


def _config(k: int, hdim: int) -> tuple[int, int]:
    block_k = max(16, triton.next_power_of_2(k))
    # Keep the [BK, BH] tile at ≤ 8192 elements (64 × 128 for PRISM's k = 64).
    block_h = max(16, min(triton.next_power_of_2(hdim), 8192 // block_k))
    return block_k, block_h


def topk_distill_fwd_triton(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                            tv: torch.Tensor, ti: torch.Tensor, mask: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """loss [N] fp32 and coef = T (ps − pt) [N, k] fp32. Arguments are assumed checked."""
    n, k = tv.shape
    h, w, tv, ti = h.contiguous(), w.contiguous(), tv.contiguous(), ti.contiguous()
    mask = mask.to(torch.int8).contiguous()
    loss = torch.empty(n, dtype=torch.float32, device=h.device)       # [N]
    coef = torch.empty(n, k, dtype=torch.float32, device=h.device)    # [N, k]
    if n == 0:
        return loss, coef
    block_k, block_h = _config(k, h.shape[1])
    _topk_distill_fwd_kernel[(n,)](
        h_ptr=h, w_ptr=w, b_ptr=b if b is not None else w, tv_ptr=tv, ti_ptr=ti, mask_ptr=mask,
        loss_ptr=loss, coef_ptr=coef, H=h.shape[1], K=k, temperature=float(temperature),
        stride_hn=h.stride(0), stride_wv=w.stride(0), stride_tn=tv.stride(0), stride_in=ti.stride(0),
        HAS_BIAS=b is not None, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=4,
    )
    return loss, coef


def topk_distill_bwd_triton(h: torch.Tensor, w: torch.Tensor, ti: torch.Tensor, coef: torch.Tensor,
                            grad: torch.Tensor, need_dw: bool, need_db: bool
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dh [N, H] in h's dtype; dw [V, H] and db [V] in fp32 (atomics) when asked, else None."""
    n, k = coef.shape
    h, w, ti, grad = h.contiguous(), w.contiguous(), ti.contiguous(), grad.contiguous()
    dh = torch.empty_like(h)                                                   # [N, H]
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_db else None
    if n == 0:
        return dh, dw, db
    block_k, block_h = _config(k, h.shape[1])
    _topk_distill_bwd_kernel[(n,)](
        h_ptr=h, w_ptr=w, ti_ptr=ti, coef_ptr=coef, g_ptr=grad, dh_ptr=dh,
        dw_ptr=dw if need_dw else coef, db_ptr=db if need_db else coef,
        H=h.shape[1], K=k, stride_hn=h.stride(0), stride_wv=w.stride(0), stride_in=ti.stride(0),
        NEED_DW=need_dw, NEED_DB=need_db, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=4,
    )
    return dh, dw, db


@torch.library.custom_op("prism_fast::topk_distill_fwd", mutates_args=())
def topk_distill_fwd_op(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tv: torch.Tensor,
                        ti: torch.Tensor, mask: torch.Tensor, temperature: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    check_topk_distill_args(h, w, b, tv, ti, mask)
    return topk_distill_fwd_triton(h, w, b, tv, ti, mask, temperature)


@topk_distill_fwd_op.register_fake
def _(h, w, b, tv, ti, mask, temperature):
    return h.new_empty(h.shape[0], dtype=torch.float32), tv.new_empty(tv.shape, dtype=torch.float32)


@torch.library.custom_op("prism_fast::topk_distill_bwd", mutates_args=())
def topk_distill_bwd_op(h: torch.Tensor, w: torch.Tensor, ti: torch.Tensor, coef: torch.Tensor,
                        grad: torch.Tensor, need_dw: bool, need_db: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dh, dw, db = topk_distill_bwd_triton(h, w, ti, coef, grad, need_dw, need_db)
    # custom_op outputs cannot be None: empty tensors stand for "not asked".
    return dh, dw if dw is not None else coef.new_empty(0), db if db is not None else coef.new_empty(0)


@topk_distill_bwd_op.register_fake
def _(h, w, ti, coef, grad, need_dw, need_db):
    dw = w.new_empty(w.shape, dtype=torch.float32) if need_dw else coef.new_empty(0)
    db = w.new_empty(w.shape[0], dtype=torch.float32) if need_db else coef.new_empty(0)
    return torch.empty_like(h), dw, db
