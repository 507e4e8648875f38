"""The patched projection: GatedLoraLinear, its projection group and the stacked adapters.

Projections that read the same input (q/k/v, gate/up) form a group: the first one called runs
one multi-slice op for the whole group and hands the others their outputs. Every LoRA call of
a patched layer goes through `ops.gated_lora_group`, in `Group.run` only, except an eager
decode step whose rows are all open on one adapter: the PyTorch path kept its operands in a
lane (gated_lora_torch.Lane), which the forward calls directly while it fits; and a forward
that runs on merged copies (merge_open=True; ops/gated_lora_merged.py): F.linear alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from prism_fast import ops
from prism_fast.loading import Persona
from prism_fast.ops import gated_lora_fused_base as fused_base
from prism_fast.ops import gated_lora_merged as merged

if TYPE_CHECKING:
    from prism_fast.routing import Routing


class Group:
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
        self._prepared: ops.Prepared | None = None   # the torch path's, on its first eager call
        self.fuse_kernel = False   # patch_model(fuse_base=True): Triton's fused decode kernel
        self.merged: merged.Merged | None = None    # patch_model(merge_open=True)

    def slice_args(self, s: int):
        r, lo, hi = self.rank, self.offsets[s], self.offsets[s + 1]
        return self.lora_a[:, s * r:(s + 1) * r], self.lora_b[:, lo:hi], self.scaling[s:s + 1]

    def run(self, slot: int, x: torch.Tensor, ids: torch.Tensor, triton: bool) -> torch.Tensor:
        """Slot `slot`'s output for x, base + gated LoRA; slot 0 computes the whole group."""
        # Slot 0 runs the whole group; another slot with no output of slot 0's call on this x
        # to take (forward tried) runs its slice alone.
        alone = slot != 0 and len(self.members) > 1
        weights, biases = self.operands([slot] if alone else self.slots)  # weights[0]: slot's
        if x.dtype != weights[0].dtype:
            raise TypeError(f"x: expected dtype {weights[0].dtype} (the layer's), got {x.dtype}")
        if alone:
            ys = ops.gated_lora_group(x, weights, biases, *self.slice_args(slot), ids, triton,
                                      None, self.fuse_kernel)
            return self.finish([slot], ys)[0]
        launcher = self.launcher if triton else self.prepared()
        ys = ops.gated_lora_group(x, weights, biases, self.lora_a, self.lora_b, self.scaling, ids,
                                  triton, launcher, self.fuse_kernel)
        return self.keep(x, ys)

    def lane(self) -> ops.Lane | None:
        """The PyTorch path's kept decode-step operands (gated_lora_torch.Lane), if any."""
        return None if self._prepared is None else self._prepared.lane

    @property
    def slots(self) -> list[int]:
        return list(range(len(self.members)))

    def holds(self, lane: ops.Lane) -> bool:
        """Whether the members' weights and biases are still the tensors the lane was built on
        (a parameter replaced after patching must not be read from the lane)."""
        for m, w, b in zip(self.members, lane.weights, lane.biases):
            params = m._parameters
            if params.get("weight") is not w or params.get("bias") is not b:
                return False
        return True

    def keep(self, x: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
        """Slot 0's layer output; the others' kept for their forward on this same x."""
        ys = self.finish(self.slots, ys)
        if len(ys) > 1:
            self.pending_x, self.pending = x, [None, *ys[1:]]
        return ys[0]

    def prepared(self) -> ops.Prepared | None:
        """The torch path's fp32 operands of the whole group, built on its first eager call
        (never while torch.compile traces: the compiled path does not use them)."""
        if self._prepared is None and not torch.compiler.is_compiling():
            self._prepared = ops.Prepared(self.lora_a, self.lora_b, self.scaling, self.offsets)
        return self._prepared

    @property
    def fused(self) -> fused_base.FusedBase | None:
        """The torch path's shared weight buffer (fuse_cpu_gemm), held by its Prepared."""
        return None if self._prepared is None else self._prepared.fused

    def fuse_cpu_gemm(self) -> None:
        """Move the members' weights and adapter 0's A into one buffer, so that an all-open
        call is one GEMM (ops/gated_lora_fused_base.py); a no-op where the tensors do not qualify."""
        pairs = [m.weight_bias() for m in self.members]
        self.prepared().lane = None              # the fused GEMM takes over all-open calls
        self.prepared().fused = fused_base.fuse([w for w, _ in pairs], [b for _, b in pairs],
                                                self.lora_a, self.rank)

    def merge_open(self) -> None:
        """Keep per adapter a merged copy W + ΔW of the members' weights, which all-open
        forwards then run on (ops/gated_lora_merged.py); built now, where the weights qualify."""
        prepared = self.prepared()
        self.merged = merged.Merged(prepared.a_t, prepared.b_t)
        weights = self.operands(self.slots)[0]
        if all(merged.qualifies(w) for w in weights):
            self.merged.build(weights)

    def unfuse(self) -> None:
        """The members' parameters on storage of their own again, merged copies dropped
        (unpatch_model)."""
        if self._prepared is not None:
            self._prepared.lane = None           # built on the weights being moved
        self.merged = None
        if self.fused is not None:
            self.fused.release()
            self._prepared.fused = None

    def take(self, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        """Slot `slot`'s output computed with slot 0's call on this same x, if there is one."""
        if self.pending_x is not x:
            return None
        pending = self.pending
        y, pending[slot] = pending[slot], None
        if slot == len(pending) - 1:
            self.pending_x, self.pending = None, []
        return y

    # Overridden by sharding.ShardedGroup, where each rank holds a shard of the projections.
    def operands(self, slots: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The weights and biases the op reads for these slots."""
        pairs = [self.members[s].weight_bias() for s in slots]
        return [w for w, _ in pairs], [b for _, b in pairs]

    def finish(self, slots: list[int], ys: list[torch.Tensor]) -> list[torch.Tensor]:
        """The layer outputs from the op's outputs."""
        return ys

    def base(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """The unpatched projection: every route closed or the adapters disabled."""
        member = self.members[slot]
        return F.linear(x, member.weight, member.bias)


class GatedLoraLinear(nn.Module):
    """Drop-in for one nn.Linear: the same `weight` / `bias` parameters, plus gated personas."""

    def __init__(self, base: nn.Linear, group: Group, slot: int, routing: Routing):
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
            return self.group.base(self.slot, x)
        group = self.group
        adapter = routing.merged                  # this forward: all open on one adapter
        if adapter >= 0:
            return F.linear(x, group.merged.copies[adapter][self.slot], self.weight_bias()[1])
        if self.slot:
            y = group.take(self.slot, x)          # slot 0 ran the group on this x
            return group.run(self.slot, x, routing.ids_for(x), routing.triton) if y is None \
                else y
        ids = routing.ids_for(x)
        lane = None if torch.compiler.is_compiling() else group.lane()   # eager only
        if lane is not None and lane.fits(x, ids) and group.holds(lane):
            return group.keep(x, lane(x))         # a decode step, every row open
        return group.run(0, x, ids, routing.triton)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"slot={self.slot} of {len(self.group.members)}"


def stack(paths: list[str], weights: list[torch.Tensor], personas: list[Persona],
          dtype: torch.dtype, shard=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   int, list[int]]:
    """Stack every persona's LoRA of one group once, zero-padded to the group's largest rank:
    (lora_a [L, S·R, K], lora_b [L, ΣN, R], scaling [S, L] fp32, R, row offsets of each slice).

    weights: the projections this process computes ([N_s, K], its shard under tensor
    parallelism); shard(s, a, b) → (a, b) cuts one persona's A [r, K] and B [N, r] of slice s
    to match them (sharding.py); without it they are taken whole.
    """
    device = weights[0].device
    n_adapters, n_slices = len(personas), len(weights)
    rank = max([1] + [p.modules[path].a.shape[0] for p in personas for path in paths
                      if path in p.modules])
    k = weights[0].shape[1]
    offsets = [0]
    for w in weights:
        offsets.append(offsets[-1] + w.shape[0])
    lora_a = torch.zeros(n_adapters, n_slices * rank, k, dtype=dtype, device=device)
    lora_b = torch.zeros(n_adapters, offsets[-1], rank, dtype=dtype, device=device)
    scaling = torch.zeros(n_slices, n_adapters, dtype=torch.float32, device=device)
    for s, path in enumerate(paths):
        for i, persona in enumerate(personas):
            lw = persona.modules.get(path)
            if lw is None:          # persona does not touch this module: a zero term
                continue
            a, b = (lw.a, lw.b) if shard is None else shard(s, lw.a, lw.b)
            r = a.shape[0]
            lora_a[i, s * rank:s * rank + r] = a.to(dtype)
            lora_b[i, offsets[s]:offsets[s + 1], :r] = b.to(dtype)
            scaling[s, i] = lw.scaling
    return lora_a, lora_b, scaling, rank, offsets
