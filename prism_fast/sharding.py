"""Tensor parallelism: patch_model on a model that Hugging Face sharded with its `tp_plan`.

`from_pretrained(..., tp_plan="auto")` under torch.distributed makes each targeted projection a
DTensor parameter and replaces its forward with the plan style's (transformers ≥ 5:
`transformers.distributed.tensor_parallel`). Two styles are handled, read from the model's
`_tp_plan` and checked against the parameters' placements:

    colwise  W [N, K] → Shard(0): x replicated, y = this rank's N/W output columns.
             LoRA: A [R, K] replicated, B [N, R] → this rank's rows (per slice of a fused
             q/k/v or gate/up group), so y_local = x Wᵀ_local + s·(x Aᵀ) Bᵀ_local.
    rowwise  W [N, K] → Shard(1), bias replicated: x = this rank's K/W input columns,
             y = all_reduce(x_local Wᵀ_local) + bias.
             LoRA: A → this rank's K columns, B replicated. x_local Aᵀ_local is this rank's
             partial of x Aᵀ, and the expand is linear, so each rank adds its partial LoRA term
             into its partial base output before the plan's all-reduce: the sum over ranks is
             x Wᵀ + s·(x Aᵀ) Bᵀ, with no extra collective.

Layer 0's output is replicated on every rank (its rowwise projections end in an all-reduce),
so every rank computes the same routes from it with no communication. Anything else (other
styles, sequence parallelism, uneven shards, a PeftModel over a sharded model) is refused.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn as nn

from prism_fast.layer import Group, stack
from prism_fast.loading import Persona

COLWISE, ROWWISE = "colwise", "rowwise"


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # torch built without distributed support
        return None
    return DTensor


def tp_plan(root, targets: dict[str, nn.Linear], peft: bool) -> dict[str, str] | None:
    """None for a model whose targets are plain tensors; else target path → "colwise" or
    "rowwise", after checking everything that sharding relies on."""
    dtensor = _dtensor_type()
    sharded = [p for p, m in targets.items() if dtensor is not None
               and isinstance(m.weight, dtensor)]
    if not sharded:
        for path, m in targets.items():
            if tuple(m.weight.shape) != (m.out_features, m.in_features):
                raise ValueError(f"model: {path} declares ({m.out_features}, {m.in_features}) "
                                 f"but holds a {tuple(m.weight.shape)} weight (sharded without "
                                 f"DTensor parameters?); patch_model handles tensor parallelism "
                                 f"with DTensor weights (transformers ≥ 5 tp_plan)")
        return None
    if peft:
        raise ValueError("model: a PeftModel over a tensor-parallel model is not supported; load "
                         "the base model with tp_plan and pass the adapter directory to "
                         "patch_model")
    if len(sharded) != len(targets):
        plain = sorted(set(targets) - set(sharded))[0]
        raise ValueError(f"model: expected every targeted projection sharded by the tp_plan, "
                         f"got {sharded[0]} sharded and {plain} not")
    plan = dict(getattr(root, "_tp_plan", None) or {})
    seq = sorted(k for k, v in plan.items() if "sequence" in v)
    if seq:
        raise ValueError(f"model: sequence parallelism ({seq[0]}: {plan[seq[0]]}) shards the "
                         f"hidden states that the gate reads; not supported (expected a tp_plan "
                         f"of colwise/rowwise projections)")
    return {path: _check_shard(path, targets[path], plan) for path in targets}


def _style_of(plan: dict[str, str], path: str) -> str | None:
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", path)
    for key in (path, generic, f"{path}.weight", f"{generic}.weight"):
        if key in plan:
            return plan[key]
    return None


def _check_shard(path: str, module: nn.Linear, plan: dict[str, str]) -> str:
    from torch.distributed.tensor import Replicate, Shard

    style = _style_of(plan, path)
    if style not in (COLWISE, ROWWISE):
        raise ValueError(f"model: {path} is sharded with tp_plan style {style!r}; patch_model "
                         f"handles '{COLWISE}' and '{ROWWISE}' projections only")
    weight, bias = module.weight, module.bias
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"model: {path}: expected its weight on a 1-D tensor-parallel mesh, got "
                         f"a {mesh.ndim}-D mesh")
    dim = 0 if style == COLWISE else 1
    want_bias = Shard(0) if style == COLWISE else Replicate()
    bias_ok = bias is None or tuple(bias.placements) == (want_bias,)
    if tuple(weight.placements) != (Shard(dim),) or not bias_ok:
        raise ValueError(f"model: {path}: the tp_plan says {style!r}, expected weight placements "
                         f"(Shard({dim}),), got {tuple(weight.placements)}")
    world, size = mesh.size(), weight.shape[dim]
    if size % world or weight.to_local().shape[dim] != size // world:
        what = "output rows" if style == COLWISE else "input columns"
        raise ValueError(f"model: {path} ({style}): its {size} {what} do not divide evenly over "
                         f"{world} ranks, so its adapters cannot be sharded like it; expected a "
                         f"multiple of {world}")
    return style


def check_groups(plan: dict[str, str], groups: list[list[str]]) -> None:
    for paths in groups:
        styles = {plan[p] for p in paths}
        if len(styles) > 1:
            raise ValueError(f"model: {', '.join(paths)} read the same input but are sharded "
                             f"differently ({', '.join(plan[p] for p in paths)})")


class ShardedGroup(Group):
    """A projection group on one rank: its shard of the weights and of the stacked adapters."""

    def __init__(self, paths: list[str], bases: list[nn.Linear], personas: list[Persona],
                 dtype: torch.dtype, style: str):
        mesh = bases[0].weight.device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        # Local views of the DTensor parameters: in-place weight updates stay visible.
        self.local_weights = [b.weight.to_local() for b in bases]                # [N/W, K] or [N, K/W]
        self.local_biases = [None if b.bias is None else b.bias.to_local() for b in bases]

        def shard(s: int, a: torch.Tensor, b: torch.Tensor):      # a [r, K], b [N, r]
            if style == COLWISE:
                n = b.shape[0] // world
                return a, b[rank * n:(rank + 1) * n]
            k = a.shape[1] // world
            return a[:, rank * k:(rank + 1) * k], b

        super().__init__(*stack(paths, self.local_weights, personas, dtype, shard))
        self.style, self.bases, self.process_group = style, bases, mesh.get_group()

    def operands(self, slots):
        weights = [self.local_weights[s] for s in slots]
        if self.style == ROWWISE:       # the bias is added once, after the all-reduce
            return weights, [None] * len(slots)
        return weights, [self.local_biases[s] for s in slots]

    def finish(self, slots, ys):
        if self.style == COLWISE:
            return ys
        out = []
        for s, y in zip(slots, ys):
            dist.all_reduce(y, group=self.process_group)   # the plan's own all-reduce
            bias = self.local_biases[s]
            out.append(y if bias is None else y + bias)
        return out

    def base(self, slot, x):
        return self.bases[slot].forward(x)     # the plan's own forward, as if unpatched
