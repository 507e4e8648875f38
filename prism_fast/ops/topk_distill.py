"""The top-k distillation loss: its public op (`topk_distill_loss`, an autograd function over
the Triton launchers of kernels/topk_distill.py or the PyTorch path below) and that PyTorch path
(CPU, `backend="torch"`), memory-bounded. `prism_fast.reference.topk_distill_loss` is the oracle.

The PyTorch path has the launchers' contract: the student's logits only at the teacher's top-k
tokens, never [N, V]. The gathered head rows W[idx] are [N, k, H] in full, so positions are
processed in chunks whose gathered rows stay under `CHUNK_ELEMS` elements, in the forward and
again in the backward (nothing [N, k, H] is kept for autograd).
"""

from __future__ import annotations

import torch

from prism_fast.kernels.topk_distill import (
    check_topk_distill_args,
    topk_distill_backward,
    topk_distill_forward,
)
from prism_fast.ops.backend import pick, use_triton

# Gathered fp32 head rows per chunk: 4 MiB. Measured on this project's 2-core CPU (forward +
# backward, k = 64): 1 << 20 took 55 ms where 1 << 24 (64 MiB) took 122 ms at N = 1024,
# H = 576, and 134 ms vs 365 ms at N = 512, H = 3584 (Qwen2.5-7B): the chunk stays in cache,
# and the loss's transient memory is 16× smaller.
CHUNK_ELEMS = 1 << 20


def _chunks(n: int, k: int, h: int):
    step = max(1, CHUNK_ELEMS // max(1, k * h))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def topk_distill_forward_torch(hidden: torch.Tensor, head_weight: torch.Tensor,
                               head_bias: torch.Tensor | None, teacher_values: torch.Tensor,
                               teacher_indices: torch.Tensor, temperature: float,
                               mask: torch.Tensor | None):
    """kl [N], p_s, p_t [N, k] (fp32). An index outside 0…V−1 is dropped from both softmaxes
    and reads nothing, as in the Triton kernel (the host range check is skipped under
    torch.compile and for device tensors)."""
    n, h = hidden.shape
    k = teacher_indices.shape[1]
    valid, idx = _valid(teacher_indices, head_weight.shape[0])               # [N, k]
    logits = torch.empty(n, k, dtype=torch.float32, device=hidden.device)   # [N, k]
    for lo, hi in _chunks(n, k, h):
        rows = head_weight[idx[lo:hi]].float()                                # [c, k, H]
        torch.bmm(rows, hidden[lo:hi].float()[:, :, None], out=logits[lo:hi, :, None])
        del rows                          # one chunk alive at a time, not the next one beside it
    if head_bias is not None:
        logits += head_bias[idx].float()
    log_ps = _masked_log_softmax(logits / temperature, valid)
    log_pt = _masked_log_softmax(teacher_values.float() / temperature, valid)
    p_t = log_pt.exp()
    kl = temperature**2 * torch.where(valid, p_t * (log_pt - log_ps), 0.0).sum(dim=-1)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl, log_ps.exp(), p_t


def _valid(teacher_indices: torch.Tensor, n_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [N, k] bool, indices [N, k] int64 with the invalid ones replaced by row 0)."""
    idx = teacher_indices.long()
    valid = (idx >= 0) & (idx < n_vocab)
    return valid, torch.where(valid, idx, 0)


def _masked_log_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log_softmax over the valid entries: −inf elsewhere (p = 0), and a row with none valid
    gives −inf everywhere rather than NaN (its KL is 0, as in the kernel)."""
    x = torch.where(valid, x, float("-inf"))
    top = x.amax(dim=-1, keepdim=True)
    x = x - torch.where(torch.isfinite(top), top, 0.0)
    return x - torch.logsumexp(x, dim=-1, keepdim=True).nan_to_num(neginf=0.0)


def topk_distill_backward_torch(grad_kl: torch.Tensor, hidden: torch.Tensor,
                                head_weight: torch.Tensor, teacher_indices: torch.Tensor,
                                temperature: float, mask: torch.Tensor | None,
                                p_s: torch.Tensor, p_t: torch.Tensor):
    """(grad_hidden [N, H] fp32, ds [N, k] fp32): ds = T (p_s − p_t) · grad_kl."""
    n, h = hidden.shape
    k = teacher_indices.shape[1]
    g = grad_kl.float() if mask is None else torch.where(mask, grad_kl.float(), 0.0)
    ds = (p_s - p_t) * (g * temperature)[:, None]                            # [N, k]
    _, idx = _valid(teacher_indices, head_weight.shape[0])   # dropped entries: p_s = p_t = 0
    grad_h = torch.empty(n, h, dtype=torch.float32, device=hidden.device)   # [N, H]
    for lo, hi in _chunks(n, k, h):
        rows = head_weight[idx[lo:hi]].float()                                # [c, k, H]
        torch.bmm(ds[lo:hi, None, :], rows, out=grad_h[lo:hi, None, :])
        del rows
    return grad_h, ds


def head_grads(ds: torch.Tensor, teacher_indices: torch.Tensor, hidden: torch.Tensor,
               n_vocab: int, weight: bool, bias: bool):
    """∂loss/∂W [V, H] = Σ_n Σ_j ds[n, j] e_idx[n,j] hidden[n]ᵀ (a sparse [V, N] × [N, H]
    product: no [N, k, H] intermediate) and ∂loss/∂b [V] = Σ ds at idx; None where not asked."""
    n, k = teacher_indices.shape
    flat_idx = teacher_indices.reshape(-1).long()
    valid = (flat_idx >= 0) & (flat_idx < n_vocab)       # never scatter outside the head
    flat_idx = torch.where(valid, flat_idx, 0)
    flat_ds = torch.where(valid, ds[:, :k].reshape(-1), 0.0)
    grad_w = grad_b = None
    if weight:
        rows = torch.arange(n, device=hidden.device).repeat_interleave(k)
        scatter = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_ds, (n_vocab, n),
                                          check_invariants=False).coalesce()   # [V, N], in range
        grad_w = torch.sparse.mm(scatter, hidden.float())                      # [V, H]
    if bias:
        grad_b = torch.zeros(n_vocab, dtype=torch.float32, device=hidden.device)
        grad_b.index_add_(0, flat_idx, flat_ds)
    return grad_w, grad_b


class _TopkDistill(torch.autograd.Function):
    """kl [N] and its gradients for hidden (and the head when it requires grad), by the Triton
    kernels or the PyTorch path; the teacher's values and indices are constants."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, values, indices, temperature, mask, triton):
        fwd = pick(triton, torch.ops.prism_fast.topk_distill_fwd, topk_distill_forward,
                   topk_distill_forward_torch)
        kl, p_s, p_t = fwd(hidden, weight, bias, values, indices, temperature, mask)
        ctx.save_for_backward(hidden, weight, indices, mask, p_s, p_t)
        ctx.temperature, ctx.triton = temperature, triton
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, indices, mask, p_s, p_t = ctx.saved_tensors
        bwd = pick(ctx.triton, torch.ops.prism_fast.topk_distill_bwd, topk_distill_backward,
                   topk_distill_backward_torch)
        grad_h, ds = bwd(grad_kl, hidden, weight, indices, ctx.temperature, mask, p_s, p_t)
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_w, grad_b = head_grads(ds, indices, hidden, weight.shape[0], need_w, need_b)
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
