"""One GEMM for an open group's base projections and its LoRA shrink (torch path, fp32, CPU).

A decode step at batch 1 is a row of small products: per projection group (q/k/v, o,
gate/up, down) S base GEMMs, one shrink and S expands, each with a fixed dispatch cost that
dwarfs its bytes. When every row of a call is open on adapter 0 (PRISM's common case: one
persona, gate open) the base rows and the shrink read the same x, so they can be one GEMM:

    G = [W_0; …; W_{S−1}; A_0]  [ΣN_s + S·R, K]   (b = [b_0; …; b_{S−1}; 0] where any bias)
    out = x Gᵀ + b              [..., ΣN_s + S·R]  →  y_s = out[..., N-slice s] (views)
    y_s += u_s · (scaling_s B_s)ᵀ   with u = out[..., S·R tail]   (one `addmm_` per slice)

Opt-in (`patch_model(..., fuse_base=True)` on the PyTorch path): interleaved decode steps of
SmolLM2 on this project's 2-core CPU showed no gain beyond the noise (±3 %) at 2 threads, a
gain only in single-thread CPU time (bench/results/cpu/decode-floor*.md).

No extra memory: at patch time G takes the weights over and the layer's parameters become
views of its rows (the same Parameter objects, the same values; unpatch gives each its own
storage back). Only A_0 is held twice (also in the stacked adapters).

Guarantees: rows of a mixed or closed batch never come here: they keep `F.linear(x, W_s)` on
the same (now viewed) weight, bit-identical. Open rows are within the accuracy bounds (a
different GEMM forms their base part). Only plain contiguous fp32 CPU tensors with rows of a
multiple of 64 bytes are fused, so a viewed weight has the alignment of its own storage.
Anything that re-points a parameter later (`model.to(...)`, `param.data = …`) is noticed
before each call (`valid`), and the group runs unfused.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_PLAIN = (torch.Tensor, nn.Parameter)


def qualifies(weight: torch.Tensor) -> bool:
    """A projection weight this path can take: plain, contiguous, fp32, CPU, 64-byte rows."""
    return weight.dim() == 2 and (weight.shape[1] * 4) % 64 == 0 \
        and _fusable(weight, weight.shape[1])


def _fusable(t: torch.Tensor | None, k: int) -> bool:
    return t is None or (type(t) in _PLAIN and t.dtype == torch.float32
                         and t.device.type == "cpu" and t.is_contiguous()
                         and (t.dim() == 1 or t.shape[1] == k))


class FusedBase:
    """G and the parameters viewing it; `__call__` runs an all-open-on-adapter-0 group."""

    def __init__(self, weights: list[nn.Parameter], biases: list[nn.Parameter | None],
                 lora_a0: torch.Tensor, rank: int):
        k = weights[0].shape[1]
        sizes = [w.shape[0] for w in weights]
        with torch.no_grad():
            self.g = torch.cat([w.data for w in weights] + [lora_a0])       # [ΣN + S·R, K]
            self.bias = None
            if any(b is not None for b in biases):
                parts = [torch.zeros(n) if b is None else b.data for b, n in zip(biases, sizes)]
                self.bias = torch.cat(parts + [torch.zeros(lora_a0.shape[0])])  # [ΣN + S·R]
        self.weights, self.biases, self.lora_a0 = list(weights), list(biases), lora_a0
        self.params = list(weights) + [b for b in biases if b is not None]
        self.offsets = []                  # element offset of each parameter in its buffer
        lo = 0
        for w, n in zip(weights, sizes):
            w.data = self.g[lo:lo + n]
            self.offsets.append(lo * k)
            lo += n
        lo = 0
        for b, n in zip(biases, sizes):
            if b is not None:
                b.data = self.bias[lo:lo + n]
                self.offsets.append(lo)
            lo += n
        # Where each parameter's data must start: the buffers are ours and never move.
        size, n_w = self.g.element_size(), len(weights)
        self.expected = [(self.g if i < n_w else self.bias).data_ptr() + off * size
                         for i, off in enumerate(self.offsets)]
        self.sizes = sizes + [lora_a0.shape[0]]        # the split of out's last dim
        self.extra_bytes = lora_a0.numel() * size       # A_0 held twice (here and stacked)
        self.rank, self.rank_sizes = rank, [rank] * len(weights)

    def __reduce__(self):
        # copy.deepcopy and pickle: Parameter copies get storage of their own, so the copy
        # is fused anew over the copied parameters (the memo hands over the model's copies).
        return FusedBase, (self.weights, self.biases, self.lora_a0, self.rank)

    def valid(self) -> bool:
        """Every parameter still a view of its buffer at its place (not re-pointed since: a new
        dtype or device also means new storage). S + biases pointer reads per call."""
        return bool(self.params) and all(p.data_ptr() == e
                                         for p, e in zip(self.params, self.expected))

    def __call__(self, x: torch.Tensor, b_t: list[torch.Tensor]) -> list[torch.Tensor]:
        """x [..., K] → S × y_s [..., N_s] (views of one buffer); b_t: scaled B_sᵀ [R, N_s]."""
        # split_with_sizes, not Tensor.split: that Python wrapper costs ≈ 3 µs per call here.
        out = F.linear(x, self.g, self.bias)                               # [..., ΣN + S·R]
        ys = out.split_with_sizes(self.sizes, -1)
        rows = ys if out.dim() == 2 else \
            out.view(-1, out.shape[-1]).split_with_sizes(self.sizes, -1)   # 2-D views of ys
        us = rows[-1:] if len(b_t) == 1 else rows[-1].split_with_sizes(self.rank_sizes, -1)
        for y, u, bt in zip(rows, us, b_t):
            y.addmm_(u, bt)                                                # y_s += u_s B_sᵀ
        return list(ys[:-1])

    def release(self) -> None:
        """Give every parameter its own storage again (unpatch_model); values unchanged."""
        with torch.no_grad():
            for p in self.params:
                if p.untyped_storage().data_ptr() in (self.g.untyped_storage().data_ptr(),
                                                      None if self.bias is None else
                                                      self.bias.untyped_storage().data_ptr()):
                    p.data = p.data.clone()
        self.params, self.weights, self.biases, self.expected = [], [], [], []


def fuse(weights: list[nn.Parameter], biases: list[nn.Parameter | None],
         lora_a: torch.Tensor, rank: int) -> FusedBase | None:
    """A FusedBase over these projections and adapter 0's A [S·R, K], or None where the
    tensors are not plain contiguous fp32 CPU ones with 64-byte rows (then nothing changes)."""
    k = weights[0].shape[1]
    if lora_a.dtype != torch.float32 or lora_a.shape[-1] != k:
        return None
    if not all(qualifies(w) and w.shape[1] == k for w in weights) \
            or not all(_fusable(b, k) for b in biases):
        return None
    if len({id(w) for w in weights}) != len(weights):
        return None
    return FusedBase(weights, biases, lora_a[0].contiguous(), rank)
