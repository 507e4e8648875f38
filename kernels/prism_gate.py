"""PRISM gate: routes = argmax(W2 · GELU(W1 h + b1) + b2) − 1, fused in one kernel.

    h   [B, H]   gate input (decoder layer 0's output at each row's last prompt token)
    w1  [D, H], b1 [D]      (PRISM: D = 256)
    w2  [C, D], b2 [C]      C = L + 1 classes: 0 = base, c = adapter c − 1
    out [B] int32           −1 = base, 0…L−1 = adapter

GELU is the exact (erf) one; dropout is inactive at inference. The official gate runs in the
model's dtype, so the kernel rounds where `nn.Linear`/`nn.GELU` in that dtype round (after
`W1 h + b1`, after GELU and the logits) while accumulating in fp32: decisions match the official
two-pass formula rather than a more precise, different one. Ties go to the lower class, as
`torch.argmax` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_input, check_tensor


@triton.jit
def _prism_gate_kernel(
    h_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    B, H, D, C,
    stride_hb, stride_hh, stride_w1d, stride_w1h, stride_w2c, stride_w2d,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    dtype: tl.constexpr = h_ptr.dtype.element_ty
    cls = tl.arange(0, BLOCK_C)
    cls_mask = cls < C
    logits = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        hid = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            k = h0 + tl.arange(0, BLOCK_H)
            k_mask = k < H
            ht = tl.load(h_ptr + rows[:, None] * stride_hb + k[None, :] * stride_hh,
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)   # [BB, BH]
            w1t = tl.load(w1_ptr + d[None, :] * stride_w1d + k[:, None] * stride_w1h,
                          mask=k_mask[:, None] & d_mask[None, :], other=0.0)   # [BH, BD]
            hid = tl.dot(ht, w1t, hid, input_precision="ieee")
        hid += tl.load(b1_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        hid = hid.to(dtype).to(tl.float32)
        act = (0.5 * hid * (1.0 + tl.math.erf(hid * 0.7071067811865476))).to(dtype)
        w2t = tl.load(w2_ptr + cls[None, :] * stride_w2c + d[:, None] * stride_w2d,
                      mask=d_mask[:, None] & cls_mask[None, :], other=0.0)     # [BD, BC]
        logits = tl.dot(act, w2t, logits, input_precision="ieee")
    logits += tl.load(b2_ptr + cls, mask=cls_mask, other=0.0).to(tl.float32)[None, :]
    logits = logits.to(dtype).to(tl.float32)
    logits = tl.where(cls_mask[None, :], logits, float("-inf"))
    best = tl.argmax(logits, axis=1, tie_break_left=True)
    tl.store(out_ptr + rows, (best - 1).to(tl.int32), mask=row_mask)


def check_prism_gate_args(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                          w2: torch.Tensor, b2: torch.Tensor) -> None:
    """TypeError / ValueError naming the argument, what was expected and what was given."""
    check_input("h", h)
    if h.dim() != 2:
        raise ValueError(f"h: expected shape (B, H), got {tuple(h.shape)}")
    b, hdim = h.shape
    for name, t, nd in (("w1", w1, 2), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1)):
        check_tensor(name, t, h, "h", nd, h.dtype)
    d = w1.shape[0]
    if w1.shape[1] != hdim:
        raise ValueError(f"w1: expected shape (D, {hdim}) to match h (B, {hdim}), got "
                         f"{tuple(w1.shape)}")
    if b1.shape[0] != d:
        raise ValueError(f"b1: expected shape ({d},) to match w1, got {tuple(b1.shape)}")
    c = w2.shape[0]
    if w2.shape[1] != d or not 2 <= c <= 65:
        raise ValueError(f"w2: expected shape (C, {d}) with 2 ≤ C ≤ 65 classes, got "
                         f"{tuple(w2.shape)}")
    if b2.shape[0] != c:
        raise ValueError(f"b2: expected shape ({c},) to match w2, got {tuple(b2.shape)}")


def prism_gate_triton(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                      b2: torch.Tensor) -> torch.Tensor:
    """h [B, H] → routes [B] int32 in one launch. Arguments are assumed checked."""
    b, hdim = h.shape
    d, c = w1.shape[0], w2.shape[0]
    out = torch.empty(b, dtype=torch.int32, device=h.device)  # [B]
    if b == 0:
        return out
    b1, b2 = b1.contiguous(), b2.contiguous()                 # indexed densely by the kernel
    block_b = 16
    _prism_gate_kernel[(triton.cdiv(b, block_b),)](
        h_ptr=h, w1_ptr=w1, b1_ptr=b1, w2_ptr=w2, b2_ptr=b2, out_ptr=out,
        B=b, H=hdim, D=d, C=c,
        stride_hb=h.stride(0), stride_hh=h.stride(1),
        stride_w1d=w1.stride(0), stride_w1h=w1.stride(1),
        stride_w2c=w2.stride(0), stride_w2d=w2.stride(1),
        BLOCK_B=block_b, BLOCK_H=64, BLOCK_D=64,
        BLOCK_C=max(16, triton.next_power_of_2(c)), num_warps=4,
    )
    return out


@torch.library.custom_op("prism_fast::prism_gate", mutates_args=())
def prism_gate_op(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor) -> torch.Tensor:
    check_prism_gate_args(h, w1, b1, w2, b2)   # callable by anyone through torch.ops
    return prism_gate_triton(h, w1, b1, w2, b2)


@prism_gate_op.register_fake
def _(h, w1, b1, w2, b2):
    check_prism_gate_args(h, w1, b1, w2, b2)
    return h.new_empty(h.shape[0], dtype=torch.int32)
