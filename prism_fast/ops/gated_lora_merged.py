"""Merged copies for all-open forwards (torch path, fp32, opt-in: patch_model(merge_open=True)).

An open route's decode step reads every base weight and then the adapter: the adapter's bytes
are its floor (≈ 3.5 % on SmolLM2), but at batch 1 its small ops cost several times that
(bench/results/cpu/decode-floor*.md). When every row of a forward is open on one adapter l, the
LoRA term can be folded into the weights instead, once:

    W'_s[l] = W_s + scaling[s, l] · B_s[l] A_s[l]      [N_s, K], formed in float64, rounded once
    y_s     = F.linear(x, W'_s[l], b_s)                 (no shrink, no expand)

so such a forward costs what the base model costs. `Merging` decides it once per forward, after
layer 0 and its gate (routing_hooks.py), from the routes on the host; the projections then read
one int (`Routing.merged`). The price is memory: one more copy of the targeted weights per
adapter, built at patch time, and again when a weight was replaced or written in place since.

Guarantees: closed and mixed forwards never come here (F.linear on W_s for closed rows,
bit-identical). Open rows are within the accuracy bounds (W'_s is W_s + ΔW_s rounded once to
fp32, a relative error of 2⁻²⁴ per weight). fp32 weights only: rounding W + ΔW to bf16/fp16
would lose most of ΔW. Never with autograd into the weights (the copies carry no gradient to
W), nor while torch.compile or a CUDA graph traces (the decision reads route values).
"""

from __future__ import annotations

import torch

from prism_fast.ops.gated_lora_torch import shared_plan, tracing, version_of


def qualifies(weight: torch.Tensor) -> bool:
    """A projection weight a merged copy can stand in for: a 2-D fp32 tensor."""
    return weight.dim() == 2 and weight.dtype == torch.float32


class Merged:
    """Per adapter l, the merged weights W'_s[l] of one group; rebuilt when the weights change."""

    def __init__(self, a_t: list[torch.Tensor], b_t: list[list[torch.Tensor]]):
        self.a_t, self.b_t = a_t, b_t          # the group's Prepared operands (scaled fp32 Bᵀ)
        self.sources: tuple = ()               # (weight, its version) the copies were made of
        self.copies: list[list[torch.Tensor]] = []   # L × S × [N_s, K]

    def weights(self, adapter: int, weights: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Adapter `adapter`'s merged weights for these base weights, or None where the call must
        take the LoRA path (autograd on, or a weight not fp32)."""
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return None
        if not self.fresh(weights):
            if not all(qualifies(w) for w in weights):
                return None
            self.build(weights)
        return self.copies[adapter]

    def fresh(self, weights: list[torch.Tensor]) -> bool:
        """The copies were made of these tensors, not written in place since."""
        sources = self.sources
        return len(sources) == len(weights) and all(
            w is s and w._version == v for w, (s, v) in zip(weights, sources))

    def build(self, weights: list[torch.Tensor]) -> None:
        """W'_s[l] = W_s + (A_s[l]ᵀ B_s[l]ᵀ)ᵀ for every adapter, in float64, rounded once."""
        self.copies = []                       # the old copies go before the new ones are made
        r = self.b_t[0][0].shape[0]
        # Normal tensors even when rebuilt under inference_mode: a later forward with autograd
        # on for x (weights frozen) saves them for backward, which inference tensors refuse.
        with torch.inference_mode(False), torch.no_grad():
            for a_t, b_ts in zip(self.a_t, self.b_t):
                per_slice = []
                for s, (w, b_t) in enumerate(zip(weights, b_ts)):
                    delta = a_t[:, s * r:(s + 1) * r].double() @ b_t.double()   # [K, N_s]
                    per_slice.append((w.double() + delta.T).to(torch.float32).contiguous())
                self.copies.append(per_slice)
        self.sources = tuple((w, w._version) for w in weights)

    @property
    def extra_bytes(self) -> int:
        """The copies' bytes (reported by the benchmarks)."""
        return sum(c.numel() * c.element_size() for per in self.copies for c in per)

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) rebuild theirs on first use: their weights are new tensors."""
        return {**self.__dict__, "sources": (), "copies": []}


class Merging:
    """A patched model's merged groups and, per forward, the one decision whether they run on
    copies: after layer 0 (routing_hooks), when every row of the forward is open on one
    adapter. The projections then read only `Routing.merged` (one int) and their copy."""

    def __init__(self, groups: list):
        self.groups = groups                   # layer.Group objects with a Merged each

    def adapter_for(self, ids: torch.Tensor, hidden: torch.Tensor) -> int:
        """The adapter every entry of ids [B] or [1, T] opens, where this forward can run on
        its merged copies (fp32, nothing traced, no autograd into the weights); else −1."""
        if hidden.dtype != torch.float32 or ids.device.type != "cpu" or tracing(hidden):
            return -1
        adapter = self._uniform(ids)
        if adapter < 0:
            return -1
        for group in self.groups:
            weights = group.operands(group.slots)[0]
            copies = group.merged.weights(adapter, weights)
            if copies is None:                 # autograd on, or a weight no longer fp32
                return -1
        return adapter

    def _uniform(self, ids: torch.Tensor) -> int:
        """The one adapter of ids, or −1 (mixed, closed, or none). The grouping is kept where
        the groups of this forward look for it (gated_lora_torch.shared_plan)."""
        plan = shared_plan(ids, self.groups[0].lora_a.shape[0], version_of(ids))
        return plan[0][0] if len(plan) == 1 and plan[0][1] is None else -1
