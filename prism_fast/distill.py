"""`topk_distill_loss`: PRISM Stage B's loss without the [N, V] logits (autograd + backends)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_fast.kernels import check_topk_distill_args, topk_distill_bwd_op, topk_distill_fwd_op
from prism_fast.ops import use_triton

# The torch path gathers [rows, k, H] head rows at a time; 256 rows × 64 × 576 fp32 ≈ 38 MB.
_TORCH_CHUNK = 256


def _fwd_torch(h, w, b, tv, ti, mask, temperature):
    loss = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)      # [N]
    coef = torch.empty(tv.shape, dtype=torch.float32, device=h.device)        # [N, k]
    for s in range(0, h.shape[0], _TORCH_CHUNK):
        e = s + _TORCH_CHUNK
        idx = ti[s:e].long()
        z = torch.einsum("nh,nkh->nk", h[s:e].float(), w[idx].float())         # [n, k]
        if b is not None:
            z = z + b[idx].float()
        log_ps = F.log_softmax(z / temperature, dim=-1)
        log_pt = F.log_softmax(tv[s:e].float() / temperature, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature ** 2
        keep = mask[s:e, None]
        loss[s:e] = torch.where(mask[s:e], kl, 0.0)
        coef[s:e] = torch.where(keep, temperature * (log_ps.exp() - log_pt.exp()), 0.0)
    return loss, coef


def _bwd_torch(h, w, ti, coef, grad, need_dw, need_db):
    dz = coef * grad.float()[:, None]                                          # [N, k]
    dh = torch.empty_like(h)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None
    db = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_db else None
    for s in range(0, h.shape[0], _TORCH_CHUNK):
        e = s + _TORCH_CHUNK
        idx = ti[s:e].long()
        dh[s:e] = torch.einsum("nk,nkh->nh", dz[s:e], w[idx].float()).to(h.dtype)
        if need_dw:
            dw.index_add_(0, idx.reshape(-1), (dz[s:e, :, None] * h[s:e, None, :].float())
                          .reshape(-1, h.shape[1]))
        if need_db:
            db.index_add_(0, idx.reshape(-1), dz[s:e].reshape(-1))
    return dh, dw, db


class _TopkDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, tv, ti, mask, temperature, triton):
        if triton:
            loss, coef = topk_distill_fwd_op(h, w, b, tv, ti, mask, temperature)
        else:
            loss, coef = _fwd_torch(h, w, b, tv, ti, mask, temperature)
        ctx.save_for_backward(h, w, ti, coef)
        ctx.has_bias, ctx.triton = b is not None, triton
        return loss

    @staticmethod
    def backward(ctx, grad):
        h, w, ti, coef = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.triton:
            dh, dw, db = topk_distill_bwd_op(h, w, ti, coef, grad, need_dw, need_db)
        else:
            dh, dw, db = _bwd_torch(h, w, ti, coef, grad, need_dw, need_db)
        dw = dw.to(w.dtype) if need_dw else None
        db = db.to(w.dtype) if need_db else None
        return dh, dw, db, None, None, None, None, None


def topk_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, topk_values: torch.Tensor,
                      topk_indices: torch.Tensor, *, bias: torch.Tensor | None = None,
                      temperature: float = 2.0, mask: torch.Tensor | None = None,
                      reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """PRISM Stage B's loss: `kl_div(log_softmax(z/T), log_softmax(tv/T), log_target=True,
    reduction="batchmean") · T²` with z the student's logits at the teacher's top-k ids only.

    hidden [N, H] (final hidden states of the response positions); weight [V, H] (LM head);
    topk_values / topk_indices [N, k]; mask [N] bool (default: all rows). Gradients flow to
    hidden, and to weight / bias when they require grad. reduction: "batchmean" (sum over the
    unmasked rows / their count, the official per-sample value), "sum" or "none" ([N] fp32).
    """
    if mask is None:
        mask = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    check_topk_distill_args(hidden, weight, bias, topk_values, topk_indices, mask)
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction: expected 'batchmean', 'sum' or 'none', got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    mask = mask.bool()
    loss = _TopkDistill.apply(hidden, weight, bias, topk_values, topk_indices, mask,
                              float(temperature), use_triton(backend, hidden.device))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / mask.sum().clamp(min=1)
