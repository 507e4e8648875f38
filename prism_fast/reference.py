"""The ops in plain PyTorch: the spec in code and the oracle of every test; and the official
Stage B loss that the top-k distillation loss replaces.

No data-dependent control flow, so the same code also serves as the `torch` backend under
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                      adapter_ids: torch.Tensor) -> torch.Tensor:
    """y = F.linear(x, W, b) + [id ≥ 0] · scaling[id] · (x A[id]ᵀ) B[id]ᵀ, LoRA term in fp32.

    x [..., K]; weight [N, K]; lora_a [L, R, K]; lora_b [L, N, R]; scaling [L];
    adapter_ids x.shape[:-1] (per token) or [B] for x [B, T, K] (per sequence); −1 = base.
    Closed rows are taken from F.linear untouched (bit-exact passthrough).
    """
    y = F.linear(x, weight, bias)                                       # [..., N]
    ids = per_token_ids(x, adapter_ids)
    acc = torch.promote_types(x.dtype, torch.float32)                  # fp32, or fp64 as oracle
    delta = torch.zeros(y.shape, dtype=acc, device=y.device)            # [..., N]
    for adapter in range(lora_a.shape[0]):
        d = (x.to(acc) @ lora_a[adapter].to(acc).T) @ lora_b[adapter].to(acc).T
        delta = torch.where((ids == adapter)[..., None], d * scaling[adapter].to(acc), delta)
    is_open = ((ids >= 0) & (ids < lora_a.shape[0]))[..., None]
    return torch.where(is_open, (y.to(acc) + delta).to(y.dtype), y)


def per_token_ids(x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """adapter_ids as x.shape[:-1]: one id per sequence ([B] for x [B, T, K]) repeated over T."""
    if adapter_ids.shape == x.shape[:-1]:
        return adapter_ids
    return adapter_ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])


def prism_gate(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor) -> torch.Tensor:
    """routes [B] int32 = argmax(Linear → GELU(erf) → Linear)(h) − 1, in h's dtype as PRISM does.

    h [B, H]; w1 [D, H]; b1 [D]; w2 [C, D]; b2 [C]. Class 0 (base) → −1, class c → adapter c − 1.
    """
    logits = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)             # [B, C]
    return (logits.argmax(dim=-1) - 1).to(torch.int32)


def topk_distill_loss(hidden: torch.Tensor, head_weight: torch.Tensor,
                      head_bias: torch.Tensor | None, teacher_values: torch.Tensor,
                      teacher_indices: torch.Tensor, temperature: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """kl [N]: PRISM's Stage B loss per response position, the student's logits taken only at
    the teacher's top-k tokens (official: gather, log_softmax over the k, kl_div(log_target)
    × T²; `reduction="batchmean"` over one sample's N positions is kl.mean()); 0 where masked.

    hidden [N, H]; head_weight [V, H]; head_bias [V] or None; teacher_values, _indices [N, k].
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)             # fp32, or fp64 as oracle
    idx = teacher_indices.long()
    logits = torch.bmm(head_weight[idx].to(acc), hidden.to(acc)[:, :, None])[..., 0]   # [N, k]
    if head_bias is not None:
        logits = logits + head_bias[idx].to(acc)
    log_ps = F.log_softmax(logits / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_values.to(acc) / temperature, dim=-1)
    kl = temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    return kl if mask is None else torch.where(mask, kl, torch.zeros_like(kl))


def official_stage_b_loss(logits: torch.Tensor, teacher_values: torch.Tensor,
                          teacher_indices: torch.Tensor, temperature: float) -> torch.Tensor:
    """PRISM's `run_gated_lora.py` Stage B loss of one sample, from its full logits [L, V] at
    the positions that predict response tokens: truncated with the teacher's rows [L', k] to
    the shorter of the two, gathered at the teacher's top-k, log-softmax over the k in fp32,
    `kl_div(log_target=True, reduction="batchmean")` · T². Materialises [L, V]: the oracle of
    `topk_distill_loss`'s mean, and the baseline of the training benchmark."""
    n = min(logits.shape[0], teacher_values.shape[0])
    t_log = F.log_softmax(teacher_values[:n].float() / temperature, dim=-1)
    s_at_topk = logits[:n].gather(1, teacher_indices[:n].long())
    s_log = F.log_softmax(s_at_topk.float() / temperature, dim=-1)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * temperature**2
