"""Top-k distillation loss: the student's logits only at the teacher's top-k tokens.

PRISM's Stage B (official `prism/run_gated_lora.py`) distils with a KL over the teacher's
stored top-k logits per response position, renormalised over those k. Per position n, with
T the temperature and idx[n, j] the teacher's token ids (duplicates kept as gathered):

    s[n, j]  = hidden[n] · W[idx[n, j]] (+ bias[idx[n, j]])              the student's logits
    log p_s  = log_softmax(s[n] / T)        log p_t = log_softmax(values[n] / T)   (over the k)
    kl[n]    = T² · Σ_j p_t[n, j] (log p_t[n, j] − log p_s[n, j])         (0 where masked)
    ∂kl[n] / ∂s[n, j] = T · (p_s[n, j] − p_t[n, j])

so only k rows of the LM head are read per position, never the [N, V] logits.

Shapes: hidden [N, H] (any strides), W [V, H], bias [V] or None, values [N, k], idx [N, k]
(k ≤ 256), mask [N] bool or None. fp32 softmax and accumulation. One program per position:
  * FORWARD: gathers its k head rows chunk by chunk over H, dots them with hidden[n], then the
    two log-softmaxes and the KL in registers; stores kl [N], p_s and p_t [N, k] (fp32).
  * BACKWARD: ds = T (p_s − p_t) · grad_kl[n] (stored, [N, k] fp32, for the head's gradient),
    and grad_hidden[n] = Σ_j ds[n, j] W[idx[n, j]] over the same gathered rows.
Offsets are int64. An index outside 0…V−1 (checked on the host where that needs no device
sync) never reads memory: its entry is dropped from both softmaxes.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import check_input, check_range, check_tensor, expect

MAX_TOPK = 256


@triton.jit
def _gathered_rows(w_ptr, idx, j_mask, h0, H, stride_wv, stride_wh, BLOCK_H: tl.constexpr):
    """W[idx, h0:h0+BLOCK_H] as fp32 [BLOCK_K, BLOCK_H] (zeros outside k and H), and its cols."""
    cols = h0 + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    rows = tl.load(w_ptr + idx[:, None] * stride_wv + cols[None, :].to(tl.int64) * stride_wh,
                   mask=j_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    return rows, cols, col_mask


@triton.jit
def _topk_distill_kernel(
    h_ptr, w_ptr, b_ptr, val_ptr, idx_ptr, mask_ptr, ps_ptr, pt_ptr, kl_ptr, gkl_ptr, ds_ptr,
    gh_ptr, H, V, KTOP, inv_t, t_sq,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_vn, stride_vk, stride_in, stride_ik,
    stride_gn,
    BACKWARD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_K)
    j_mask = j < KTOP
    idx = tl.load(idx_ptr + n * stride_in + j * stride_ik, mask=j_mask, other=0).to(tl.int64)
    # Memory safety: an index outside the head (only checkable on the host) reads nothing.
    j_mask = j_mask & (idx >= 0) & (idx < V)
    live = 1.0
    if HAS_MASK:
        live = (tl.load(mask_ptr + n) != 0).to(tl.float32)
    h_row = h_ptr + n * stride_hn
    if BACKWARD:
        p_s = tl.load(ps_ptr + n * BLOCK_K + j, mask=j_mask, other=0.0)
        p_t = tl.load(pt_ptr + n * BLOCK_K + j, mask=j_mask, other=0.0)
        ds = (p_s - p_t) * (tl.load(gkl_ptr + n) * live * t_sq * inv_t)       # [BK]
        tl.store(ds_ptr + n * BLOCK_K + j, tl.where(j_mask, ds, 0.0), mask=j < KTOP)
        for h0 in range(0, H, BLOCK_H):
            rows, cols, col_mask = _gathered_rows(w_ptr, idx, j_mask, h0, H, stride_wv,
                                                  stride_wh, BLOCK_H)
            gh = tl.sum(ds[:, None] * rows, axis=0)                            # [BH]
            tl.store(gh_ptr + n * stride_gn + cols, gh, mask=col_mask)
    else:
        s = tl.zeros([BLOCK_K], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            rows, cols, col_mask = _gathered_rows(w_ptr, idx, j_mask, h0, H, stride_wv,
                                                  stride_wh, BLOCK_H)
            hv = tl.load(h_row + cols.to(tl.int64) * stride_hh, mask=col_mask,
                         other=0.0).to(tl.float32)                             # [BH]
            s += tl.sum(rows * hv[None, :], axis=1)
        if HAS_BIAS:
            s += tl.load(b_ptr + idx, mask=j_mask, other=0.0).to(tl.float32)
        s = tl.where(j_mask, s * inv_t, float("-inf"))
        t = tl.load(val_ptr + n * stride_vn + j * stride_vk, mask=j_mask, other=0.0)
        t = tl.where(j_mask, t.to(tl.float32) * inv_t, float("-inf"))
        s = s - tl.max(s, axis=0)
        log_ps = s - tl.log(tl.sum(tl.exp(s), axis=0))
        t = t - tl.max(t, axis=0)
        log_pt = t - tl.log(tl.sum(tl.exp(t), axis=0))
        p_t = tl.exp(log_pt)
        kl = t_sq * tl.sum(tl.where(j_mask, p_t * (log_pt - log_ps), 0.0), axis=0) * live
        tl.store(kl_ptr + n, kl)
        tl.store(ps_ptr + n * BLOCK_K + j, tl.exp(log_ps), mask=j_mask)
        tl.store(pt_ptr + n * BLOCK_K + j, p_t, mask=j_mask)


def check_topk_distill_args(hidden: torch.Tensor, head_weight: torch.Tensor,
                            head_bias: torch.Tensor | None, teacher_values: torch.Tensor,
                            teacher_indices: torch.Tensor, temperature: float,
                            mask: torch.Tensor | None) -> None:
    """TypeError / ValueError naming the argument, what was expected and what was given."""
    check_input("hidden", hidden)
    expect(hidden.dim() == 2, ValueError, f"hidden: expected shape (N, H), got {tuple(hidden.shape)}")
    n, h = hidden.shape
    check_tensor("head_weight", head_weight, hidden, "hidden", 2, hidden.dtype)
    expect(head_weight.shape[1] == h, ValueError,
           f"head_weight: expected shape (V, {h}) to match hidden, got {tuple(head_weight.shape)}")
    if head_bias is not None:
        check_tensor("head_bias", head_bias, hidden, "hidden", 1, hidden.dtype)
        expect(head_bias.shape[0] == head_weight.shape[0], ValueError,
               f"head_bias: expected shape ({head_weight.shape[0]},), got {tuple(head_bias.shape)}")
    check_tensor("teacher_values", teacher_values, hidden, "hidden", 2)
    expect(teacher_values.dtype.is_floating_point, TypeError,
           f"teacher_values: expected a floating-point tensor, got {teacher_values.dtype}")
    k = teacher_values.shape[1]
    expect(teacher_values.shape[0] == n and 1 <= k <= MAX_TOPK, ValueError,
           f"teacher_values: expected shape ({n}, k) with 1 ≤ k ≤ {MAX_TOPK}, got "
           f"{tuple(teacher_values.shape)}")
    check_tensor("teacher_indices", teacher_indices, hidden, "hidden", 2)
    expect(not teacher_indices.dtype.is_floating_point and teacher_indices.dtype != torch.bool,
           TypeError, f"teacher_indices: expected an integer tensor, got {teacher_indices.dtype}")
    expect(teacher_indices.shape == teacher_values.shape, ValueError,
           f"teacher_indices: expected shape {tuple(teacher_values.shape)} (that of "
           f"teacher_values), got {tuple(teacher_indices.shape)}")
    expect(isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
           and math.isfinite(temperature) and temperature > 0, ValueError,
           f"temperature: expected a positive finite number, got {temperature!r}")
    if mask is not None:
        check_tensor("mask", mask, hidden, "hidden", 1)
        expect(mask.dtype == torch.bool, TypeError,
               lambda: f"mask: expected a torch.bool tensor (True: the position counts), got "
                       f"{mask.dtype}; pass mask.bool()")
        expect(mask.shape[0] == n, ValueError, f"mask: expected shape ({n},), got {tuple(mask.shape)}")
    check_range("teacher_indices", teacher_indices, 0, head_weight.shape[0] - 1,
                "rows of head_weight")


def _block_k(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def topk_distill_forward(hidden: torch.Tensor, head_weight: torch.Tensor,
                         head_bias: torch.Tensor | None, teacher_values: torch.Tensor,
                         teacher_indices: torch.Tensor, temperature: float,
                         mask: torch.Tensor | None):
    """kl [N], p_s and p_t [N, BLOCK_K] fp32 (columns ≥ k unused). Arguments assumed checked."""
    n, h = hidden.shape
    k = teacher_values.shape[1]
    bk = _block_k(k)
    dev = hidden.device
    kl = torch.empty(n, dtype=torch.float32, device=dev)                     # [N]
    p_s = torch.empty(n, bk, dtype=torch.float32, device=dev)                # [N, BK]
    p_t = torch.empty(n, bk, dtype=torch.float32, device=dev)
    if n:
        _launch(hidden, head_weight, head_bias, teacher_values, teacher_indices, temperature,
                mask, p_s, p_t, kl, None, None, None, backward=False)
    return kl, p_s, p_t


def topk_distill_backward(grad_kl: torch.Tensor, hidden: torch.Tensor, head_weight: torch.Tensor,
                          teacher_indices: torch.Tensor, temperature: float,
                          mask: torch.Tensor | None, p_s: torch.Tensor, p_t: torch.Tensor):
    """(grad_hidden [N, H] fp32, ds [N, BLOCK_K] fp32 = ∂(Σ grad_kl · kl)/∂s)."""
    n, h = hidden.shape
    grad_h = torch.empty(n, h, dtype=torch.float32, device=hidden.device)   # [N, H]
    ds = torch.empty_like(p_s)                                               # [N, BK]
    if n:
        _launch(hidden, head_weight, None, p_s, teacher_indices, temperature, mask, p_s, p_t,
                None, grad_kl.contiguous(), ds, grad_h, backward=True)
    return grad_h, ds


def _launch(hidden, weight, bias, values, indices, temperature, mask, p_s, p_t, kl, grad_kl,
            ds, grad_h, *, backward: bool) -> None:
    n, h = hidden.shape
    k = indices.shape[1]
    bk = p_s.shape[1]
    placeholder = p_s          # never read where its flag is off
    # The kernel reads bias and mask at unit stride: views with gaps are made contiguous here.
    _topk_distill_kernel[(n,)](
        h_ptr=hidden, w_ptr=weight, b_ptr=placeholder if bias is None else bias.contiguous(),
        val_ptr=values, idx_ptr=indices,
        mask_ptr=placeholder if mask is None else mask.contiguous(), ps_ptr=p_s, pt_ptr=p_t,
        kl_ptr=placeholder if kl is None else kl, gkl_ptr=placeholder if grad_kl is None else grad_kl,
        ds_ptr=placeholder if ds is None else ds, gh_ptr=placeholder if grad_h is None else grad_h,
        H=h, V=weight.shape[0], KTOP=k, inv_t=1.0 / temperature, t_sq=float(temperature) ** 2,
        stride_hn=hidden.stride(0), stride_hh=hidden.stride(1),
        stride_wv=weight.stride(0), stride_wh=weight.stride(1),
        stride_vn=values.stride(0), stride_vk=values.stride(1),
        stride_in=indices.stride(0), stride_ik=indices.stride(1),
        stride_gn=h, BACKWARD=backward, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
        BLOCK_K=bk, BLOCK_H=max(16, min(128, 8192 // bk)), num_warps=4,
    )


# ----------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, fake impls beside them
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("prism_fast::topk_distill_fwd", mutates_args=())
def topk_distill_fwd_op(hidden: torch.Tensor, head_weight: torch.Tensor,
                        head_bias: torch.Tensor | None, teacher_values: torch.Tensor,
                        teacher_indices: torch.Tensor, temperature: float,
                        mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_topk_distill_args(hidden, head_weight, head_bias, teacher_values, teacher_indices,
                            temperature, mask)
    return topk_distill_forward(hidden, head_weight, head_bias, teacher_values, teacher_indices,
                                temperature, mask)


@topk_distill_fwd_op.register_fake
def _(hidden, head_weight, head_bias, teacher_values, teacher_indices, temperature, mask):
    n, bk = hidden.shape[0], _block_k(teacher_values.shape[1])
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return hidden.new_empty(n, **f32), hidden.new_empty(n, bk, **f32), hidden.new_empty(n, bk, **f32)


@torch.library.custom_op("prism_fast::topk_distill_bwd", mutates_args=())
def topk_distill_bwd_op(grad_kl: torch.Tensor, hidden: torch.Tensor, head_weight: torch.Tensor,
                        teacher_indices: torch.Tensor, temperature: float,
                        mask: torch.Tensor | None, p_s: torch.Tensor,
                        p_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return topk_distill_backward(grad_kl, hidden, head_weight, teacher_indices, temperature, mask,
                                 p_s, p_t)


@topk_distill_bwd_op.register_fake
def _(grad_kl, hidden, head_weight, teacher_indices, temperature, mask, p_s, p_t):
    return hidden.new_empty(hidden.shape, dtype=torch.float32), torch.empty_like(p_s)
