"""The one door to the kernels: every gated LoRA, gate and distillation-loss evaluation goes
through here.

`gated_lora_group` and `gate_routes` pick the implementation (the Triton launcher in eager
mode, its registered `torch.ops.prism_fast.*` op under torch.compile, where the launcher is
opaque, or the PyTorch reference); the public ops and the patched layers both call them. The
public ops check their arguments first (the checks live in kernels/, beside the launchers);
the patched layers build their arguments themselves and skip the checks on the hot path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from prism_fast import distill, reference
from prism_fast.kernels.fused_base_lora import MAX_ROWS as FUSED_BASE_MAX_ROWS
from prism_fast.kernels.fused_base_lora import fused_base_lora_triton
from prism_fast.kernels.gated_lora import (
    GatedLoraLauncher,
    check_gated_lora_args,
    gated_lora_linear_triton,
    ids_per_sequence,
    interpreted,
)
from prism_fast.kernels.prism_gate import check_prism_gate_args, prism_gate_triton
from prism_fast.kernels.topk_distill import (
    check_topk_distill_args,
    topk_distill_backward,
    topk_distill_forward,
)
from prism_fast.torch_path import Prepared, gated_lora_linear_torch

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, device: torch.device) -> bool:
    """Resolve a backend name: "auto" runs Triton on CUDA tensors and the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    # Both: kernels built for the interpreter, and TRITON_INTERPRET=1 still set (triton reads
    # it again when it launches).
    if device.type != "cuda" and not (interpreted()
                                      and os.environ.get("TRITON_INTERPRET") == "1"):
        late = " (it is set now, but was not when triton and prism_fast were imported: the " \
            "kernels were compiled for a GPU)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        raise ValueError(f"backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         f"triton is imported to run on CPU{late}; got tensors on {device}")
    return True


def gated_lora_group(x: torch.Tensor, weights: list[torch.Tensor],
                     biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scaling: torch.Tensor, ids: torch.Tensor,
                     triton: bool, launcher: GatedLoraLauncher | Prepared | None = None,
                     fuse_base: bool = False) -> list[torch.Tensor]:
    """S projections reading the same x: ys[s] = F.linear(x, W_s, b_s) + gated LoRA of slice s.

    x [..., K]; weights S × [N_s, K]; lora_a [L, S·R, K]; lora_b [L, ΣN_s, R]; scaling [S, L]
    or [L] (S = 1); ids [B] (x = [B, T, K]) or x.shape[:-1]. Arguments are assumed checked.
    `launcher`: a patched layer's lean eager path over these lora_a, lora_b, scaling ([S, L]
    fp32): its GatedLoraLauncher (triton) or its torch_path.Prepared operands (torch).
    `fuse_base` (Triton only, patch_model's opt-in): calls of ≤ 64 rows run the base projection
    and the LoRA in one kernel (kernels/fused_base_lora.py; closed rows then within the
    accuracy bounds, not bit-identical to F.linear); larger calls keep the split path.
    """
    if triton and fuse_base:
        if torch.compiler.is_compiling():   # the op itself picks fused or split by row count
            return torch.ops.prism_fast.fused_base_lora(x, weights, biases, lora_a, lora_b,
                                                        scaling, ids)
        if x.numel() <= FUSED_BASE_MAX_ROWS * x.shape[-1]:
            return fused_base_lora_triton(x, weights, biases, lora_a, lora_b, scaling, ids)
    if triton:
        if torch.compiler.is_compiling():
            return torch.ops.prism_fast.gated_lora(x, weights, biases, lora_a, lora_b, scaling,
                                                   ids)
        if launcher is not None:
            ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]   # S × [..., N_s]
            launcher(ys, x, ids, ids_per_sequence(x, ids))
            return ys
        return gated_lora_linear_triton(x, weights, biases, lora_a, lora_b, scaling, ids)
    # The fast PyTorch path (prism_fast/torch_path.py), checked against the reference in tests.
    return gated_lora_linear_torch(x, weights, biases, lora_a, lora_b, scaling, ids, launcher)


def gate_routes(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                b2: torch.Tensor, triton: bool) -> torch.Tensor:
    """h [B, H] → routes [B] int32. Arguments are assumed checked."""
    if not triton:
        return reference.prism_gate(h, w1, b1, w2, b2)
    if torch.compiler.is_compiling():
        return torch.ops.prism_fast.prism_gate(h, w1, b1, w2, b2)
    return prism_gate_triton(h, w1, b1, w2, b2)


def gated_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                      adapter_ids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """y = F.linear(x, W, b) + [id ≥ 0] · scaling[id] · (x A[id]ᵀ) B[id]ᵀ.

    x [..., K] fp16/bf16/fp32; weight [N, K]; bias [N] or None; lora_a [L, R, K];
    lora_b [L, N, R]; scaling [L] (a tensor, or a list of floats); adapter_ids x.shape[:-1] or
    [B] for x [B, T, K]; −1 = base.
    Returns [..., N] in x's dtype; rows with id −1 are bit-identical to F.linear.
    """
    if isinstance(scaling, (list, tuple)) and isinstance(x, torch.Tensor):
        scaling = torch.tensor(scaling, dtype=torch.float32, device=x.device)   # [L]
    check_gated_lora_args(x, [weight], [bias], lora_a, lora_b, scaling, adapter_ids)
    triton = use_triton(backend, x.device)
    return gated_lora_group(x, [weight], [bias], lora_a, lora_b, scaling, adapter_ids, triton)[0]


def prism_gate(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """h [B, H] → routes [B] int32: argmax(W2 · GELU(W1 h + b1) + b2) − 1 (−1 = base)."""
    check_prism_gate_args(h, w1, b1, w2, b2)
    return gate_routes(h, w1, b1, w2, b2, use_triton(backend, h.device))


class _TopkDistill(torch.autograd.Function):
    """kl [N] and its gradients for hidden (and the head when it requires grad), by the Triton
    kernels or the PyTorch path; the teacher's values and indices are constants."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, indices, temperature, mask, triton):
        if triton:
            fwd = torch.ops.prism_fast.topk_distill_fwd if torch.compiler.is_compiling() \
                else topk_distill_forward
        else:
            fwd = distill.forward
        kl, p_s, p_t = fwd(hidden, weight, bias, values, indices, temperature, mask)
        ctx.save_for_backward(hidden, weight, indices, mask, p_s, p_t)
        ctx.temperature, ctx.triton = temperature, triton
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, indices, mask, p_s, p_t = ctx.saved_tensors
        if ctx.triton:
            bwd = torch.ops.prism_fast.topk_distill_bwd if torch.compiler.is_compiling() \
                else topk_distill_backward
        else:
            bwd = distill.backward
        grad_h, ds = bwd(grad_kl, hidden, weight, indices, ctx.temperature, mask, p_s, p_t)
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_w, grad_b = distill.head_grads(ds, indices, hidden, weight.shape[0], need_w, need_b)
        return (grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(weight.dtype), None, None, None, None, None)


REDUCTIONS = ("mean", "sum", "none")


def topk_distill_loss(hidden: torch.Tensor, head_weight: torch.Tensor,
                      head_bias: torch.Tensor | None, teacher_values: torch.Tensor,
                      teacher_indices: torch.Tensor, temperature: float = 2.0,
                      mask: torch.Tensor | None = None, *, reduction: str = "mean",
                      backend: str = "auto") -> torch.Tensor:
    """PRISM's Stage B distillation loss with the student's logits only at the teacher's top-k.

    hidden [N, H] (final hidden states of the positions that predict response tokens);
    head_weight [V, H]; head_bias [V] or None; teacher_values [N, k] (the teacher's top-k
    logits, any float dtype); teacher_indices [N, k]; mask [N] bool (False: no loss, no grad).
    Per position kl[n] = T² · KL(softmax(values/T) ‖ softmax(student logits at idx / T)) over
    the k (fp32). reduction "none" → [N]; "sum"; "mean" → the sum over unmasked positions
    divided by their count, the official `kl_div(..., reduction="batchmean") · T²` of one
    sample. Differentiable w.r.t. hidden, head_weight and head_bias.
    """
    check_topk_distill_args(hidden, head_weight, head_bias, teacher_values, teacher_indices,
                            temperature, mask)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    kl = _TopkDistill.apply(hidden, head_weight, head_bias, teacher_values, teacher_indices,
                            float(temperature), mask, use_triton(backend, hidden.device))
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    count = hidden.shape[0] if mask is None else mask.sum()
    return total / (count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1))
