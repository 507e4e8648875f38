"""The patched projection: GatedLoraLinear, its projection group and the stacked adapters.

Projections that read the same input (q/k/v, gate/up) form a group: the first one called runs
one multi-slice op for the whole group and hands the others their outputs. Every LoRA call of
a patched layer goes through `ops.gated_lora_group`, in `_Group.run` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from prism_fast import ops
from prism_fast.loading import Persona

if TYPE_CHECKING:
    from prism_fast.routing import Routing


class _Group:
    """Projections reading the same input; adapters stacked once: A [L, S·R, K], B [L, ΣN, R]."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                 rank: int, offsets: list[int]):
        self.members: list[GatedLoraLinear] = []   # filled in slot order by patch_model
        self.lora_a, self.lora_b, self.scaling, self.rank = lora_a, lora_b, scaling, rank
        self.offsets = offsets                      # row offsets of each slice in lora_b
        self.pending_x: torch.Tensor | None = None
        self.pending: list[torch.Tensor | None] = []
        # The lean eager launch path over the stacked tensors (plans resolved once per layout).
        self.launcher = ops.GatedLoraLauncher(lora_a, lora_b, scaling)

    def slice_args(self, s: int):
        r, lo, hi = self.rank, self.offsets[s], self.offsets[s + 1]
        return self.lora_a[:, s * r:(s + 1) * r], self.lora_b[:, lo:hi], self.scaling[s:s + 1]

    def run(self, slot: int, x: torch.Tensor, ids: torch.Tensor, triton: bool) -> torch.Tensor:
        members = self.members
        if slot != 0 and len(members) > 1:
            if self.pending_x is x and self.pending[slot] is not None:
                y, self.pending[slot] = self.pending[slot], None
                if slot == len(members) - 1 or all(p is None for p in self.pending[1:]):
                    self.pending_x, self.pending = None, []
                return y
            # Called without slot 0 before it on this x: this slice alone.
            members = [members[slot]]
            lora_a, lora_b, scaling = self.slice_args(slot)
            launcher = None
        else:
            lora_a, lora_b, scaling = self.lora_a, self.lora_b, self.scaling
            launcher = self.launcher
        weights, biases = [], []
        for m in members:
            w, b = m.weight_bias()
            weights.append(w)
            biases.append(b)
        ys = ops.gated_lora_group(x, weights, biases, lora_a, lora_b, scaling, ids, triton,
                                  launcher)
        if len(members) > 1:
            self.pending_x, self.pending = x, [None, *ys[1:]]
        return ys[0]


class GatedLoraLinear(nn.Module):
    """Drop-in for one nn.Linear: the same `weight` / `bias` parameters, plus gated personas."""

    def __init__(self, base: nn.Linear, group: _Group, slot: int, routing: Routing):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.slot = slot
        # Plain attributes (not submodules / buffers): the state dict stays the model's own.
        self.__dict__["group"] = group
        self.__dict__["routing"] = routing

    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(self.weight, self.bias)` without nn.Module.__getattr__ where they are registered
        parameters: ≈ 1 µs per attribute on this project's CPU, on every decode step."""
        params = self._parameters
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, K] → [B, T, N]
        routing = self.routing
        if routing.skip_lora():
            return F.linear(x, self.weight, self.bias)
        weight = self._parameters["weight"] if "weight" in self._parameters else self.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"x: expected dtype {weight.dtype} (the layer's), got {x.dtype}")
        return self.group.run(self.slot, x, routing.ids_for(x), routing.triton)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"slot={self.slot} of {len(self.group.members)}"


def stack(paths: list[str], bases: list[nn.Linear], personas: list[Persona]) -> _Group:
    """Stack every persona's LoRA of one group once: zero-padded to the group's largest rank."""
    ref = bases[0].weight
    n_adapters, n_slices = len(personas), len(bases)
    rank = max([1] + [p.modules[path].a.shape[0] for p in personas for path in paths
                      if path in p.modules])
    k = bases[0].in_features
    n_total = sum(b.out_features for b in bases)
    lora_a = torch.zeros(n_adapters, n_slices * rank, k, dtype=ref.dtype, device=ref.device)
    lora_b = torch.zeros(n_adapters, n_total, rank, dtype=ref.dtype, device=ref.device)
    scaling = torch.zeros(n_slices, n_adapters, dtype=torch.float32, device=ref.device)
    offsets = [0]
    for s, (path, base) in enumerate(zip(paths, bases)):
        off = offsets[-1]
        for i, persona in enumerate(personas):
            lw = persona.modules.get(path)
            if lw is None:          # persona does not touch this module: a zero term
                continue
            r = lw.a.shape[0]
            lora_a[i, s * rank:s * rank + r] = lw.a.to(ref.dtype)
            lora_b[i, off:off + base.out_features, :r] = lw.b.to(ref.dtype)
            scaling[s, i] = lw.scaling
        offsets.append(off + base.out_features)
    return _Group(lora_a, lora_b, scaling, rank, offsets)
