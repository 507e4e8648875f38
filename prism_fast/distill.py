"""The PyTorch path of the top-k distillation loss (CPU, `backend="torch"`), memory-bounded.

Same contract as the Triton launchers of `kernels/topk_distill.py`: the student's logits only
at the teacher's top-k tokens, never [N, V]. The gathered head rows W[idx] are [N, k, H] in
full, so positions are processed in chunks whose gathered rows stay under `CHUNK_ELEMS`
elements, in the forward and again in the backward (nothing [N, k, H] is kept for autograd).
`prism_fast.reference.topk_distill_loss` stays the oracle.
"""

from __future__ import annotations

import torch

# Gathered fp32 head rows per chunk: 4 MiB. Measured on this project's 2-core CPU (forward +
# backward, k = 64): 1 << 20 took 55 ms where 1 << 24 (64 MiB) took 122 ms at N = 1024,
# H = 576, and 134 ms vs 365 ms at N = 512, H = 3584 (Qwen2.5-7B): the chunk stays in cache,
# and the loss's transient memory is 16× smaller.
CHUNK_ELEMS = 1 << 20


def _chunks(n: int, k: int, h: int):
    step = max(1, CHUNK_ELEMS // max(1, k * h))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def forward(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
            teacher_values: torch.Tensor, teacher_indices: torch.Tensor, temperature: float,
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


def backward(grad_kl: torch.Tensor, hidden: torch.Tensor, head_weight: torch.Tensor,
             teacher_indices: torch.Tensor, temperature: float, mask: torch.Tensor | None,
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
