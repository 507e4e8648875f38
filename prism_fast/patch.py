"""patch_model: single-pass PRISM routing inside a Hugging Face decoder (see routing.py).

This file composes the pieces: patch_model resolves the personas (loading.py, peft_loading.py),
checks them against the model (targets.py), groups the projections that share an input (hf.py)
and swaps them for patched ones (layer.py), with the routing state (routing.py), its hooks
(routing_hooks.py) and the Hugging Face / PEFT overrides (overrides.py). unpatch_model undoes
exactly what patch_model did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from prism_fast import batching, sharding
from prism_fast.hf import LAYER_PATH, decoder_and_root, groups_of, is_peft_model
from prism_fast.kernels._checks import FLOATS
from prism_fast.layer import GatedLoraLinear, Group, stack
from prism_fast.loading import Persona, PrismAdapter, load_gate, load_prism
from prism_fast.ops import gated_lora_fused_base as fused_base
from prism_fast.ops import gated_lora_merged as merged
from prism_fast.ops import use_triton
from prism_fast.overrides import ROUTES_KWARG, Overrides, override_methods
from prism_fast.peft_loading import personas_from_peft_model
from prism_fast.routing import Routing
from prism_fast.routing_hooks import install_hooks
from prism_fast.targets import check_gate, check_targets

__all__ = ["GatedLoraLinear", "get_routes", "patch_model", "set_routes", "unpatch_model"]


@dataclass
class _Patch:
    routing: Routing
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]   # parent, attr, original, ours
    overrides: Overrides                                        # with the routing hooks
    unwrapped: list[tuple[nn.Module, str, nn.Module]]           # parent, attr, inert PEFT wrapper


def patch_model(model, adapter=None, *, gate=None, backend: str = "auto",
                adapter_dtype: torch.dtype | None = None, fuse_base: bool = False,
                merge_open: bool = False):
    """Swap the persona-targeted nn.Linear modules of `model` for gated LoRA ones, in place.

    adapter: a PRISM output dir, a PEFT adapter dir, a list of them, a `load_prism` result, or
    None when `model` is a PeftModel (its loaded LoRA adapters become personas 0…L−1).
    gate: a gate.pt path or state dict with L + 1 classes; default: the PRISM dir's gate.pt.
    With no gate and no set_routes, every sequence uses adapter 0.
    adapter_dtype: None stacks the adapters in each layer's dtype; torch.float32 keeps them in
    fp32 as PEFT does (closer to PEFT's outputs in fp16/bf16 models, twice the adapter bytes).
    fuse_base: opt-in. Triton backend: decode calls (≤ 64 rows) compute the base projection
    and the gated LoRA in one kernel (kernels/fused_base_lora.py); closed rows are then within
    the accuracy bounds of open rows, not bit-identical to the unpatched model. PyTorch path
    (fp32 CPU weights): each group's weights move into one buffer with adapter 0's A, so that
    all-open calls are one GEMM (ops/gated_lora_fused_base.py); closed rows stay bit-exact.
    merge_open: opt-in, PyTorch path with fp32 CPU weights. Each group keeps, per adapter, a
    merged copy W + scaling·BA of its weights; an eager forward whose rows are all open on one
    adapter runs F.linear on it (an open route then costs what the base model costs), at the
    memory of one more copy of the targeted weights per adapter (ops/gated_lora_merged.py).
    Closed and mixed forwards are unchanged; closed rows stay bit-exact.
    """
    _check_options(adapter_dtype, fuse_base, merge_open)
    if getattr(model, "_prism_patch", None) is not None:
        raise ValueError("model: already patched by prism_fast; call unpatch_model(model) first")
    root, decoder, layers = decoder_and_root(model)
    personas, wrapped, inert, gate_state = _resolve(model, adapter, gate)
    model_type = getattr(getattr(root, "config", None), "model_type", "default")
    targets, routing = _check(root, layers, personas, wrapped, gate_state, model_type, backend,
                              adapter_dtype)
    _check_fusions(targets, routing, backend, fuse_base, merge_open)
    groups = _group(targets, model_type)
    plan = sharding.tp_plan(root, targets, peft=bool(wrapped))
    if merge_open and plan is not None:
        raise ValueError("merge_open: True is not supported under tensor parallelism (the "
                         "model's projections are sharded); got a sharded model")
    if plan is not None:
        sharding.check_groups(plan, groups)
    # Everything is checked: from here on, nothing can fail half-way.
    swaps = _swap(root, groups, targets, personas, routing, adapter_dtype, plan,
                  fuse_cpu=fuse_base and not routing.triton)
    for _, _, _, ours in swaps:
        ours.group.fuse_kernel = fuse_base and routing.triton
    unwrapped = _unwrap(root, inert)
    if merge_open:
        distinct = list({id(o.group): o.group for *_, o in swaps}.values())
        for group in distinct:
            group.merge_open()
        routing.merging = merged.Merging(distinct)
    _allow_routes_kwarg(model)   # the refusal an earlier unpatch_model left
    overrides = override_methods(model, root, routing, swaps)
    overrides.hooks += install_hooks(routing, decoder, layers[0])
    batching.install(model, root, routing, overrides)
    model.__dict__["_prism_patch"] = _Patch(routing, swaps, overrides, unwrapped)
    return model


def _resolve(model, adapter, gate) -> tuple[list[Persona], dict[str, nn.Module],
                                            dict[str, nn.Module], dict | None]:
    """(personas, PEFT's LoRA-wrapped nn.Linear modules by path and its inert wrappers by path
    (both empty unless a PeftModel; peft_loading.py), gate state)."""
    wrapped: dict[str, nn.Module] = {}
    inert: dict[str, nn.Module] = {}
    if is_peft_model(model):
        if adapter is not None:
            raise ValueError("adapter: expected None for a PeftModel (its loaded adapters are the "
                             "personas); to load other adapters, patch the base model")
        personas, wrapped, inert = personas_from_peft_model(model)
        gate_state = None
    else:
        if adapter is None:
            raise ValueError("adapter: expected a PRISM/PEFT adapter directory, a list of them or "
                             "a load_prism() result (or pass a PeftModel), got None")
        loaded = adapter if isinstance(adapter, PrismAdapter) else load_prism(adapter)
        personas, gate_state = loaded.personas, loaded.gate
        if loaded.gated_sources and gate is None:
            raise ValueError(f"gate: {len(loaded.gated_sources)} PRISM directories each bring a "
                             f"binary gate, which cannot route between {len(personas)} personas; "
                             f"pass gate= with {len(personas) + 1} classes, or pass their "
                             f"persona_expert/ subdirectories and use set_routes")
    if gate is not None:
        gate_state = load_gate(gate)
    return personas, wrapped, inert, gate_state


def _check(root, layers, personas: list[Persona], wrapped: dict, gate_state, model_type: str,
           backend: str, adapter_dtype) -> tuple[dict[str, nn.Linear], Routing]:
    """The targeted projections by path, checked, and the routing (with its checked gate)."""
    targets = check_targets(root, personas, wrapped, len(layers), model_type)
    first = next(iter(targets.values()))
    # The kernels take adapters in x's dtype or fp32 (PEFT's); refuse others before patching.
    odd = {str(t.weight.dtype) for t in targets.values() if t.weight.dtype != adapter_dtype}
    if adapter_dtype not in (None, torch.float32) and odd:
        raise ValueError(f"adapter_dtype: expected None, torch.float32 or the layers' own dtype, "
                         f"got {adapter_dtype} for layers in {', '.join(sorted(odd))}")
    layer0_device = next(layers[0].parameters()).device
    triton = use_triton(backend, first.weight.device)
    checked_gate = None if gate_state is None else check_gate(
        gate_state, root, len(personas), targets, layer0_device, first.weight.dtype)
    return targets, Routing(n_adapters=len(personas), triton=triton, device=layer0_device,
                            gate=checked_gate)


def _check_options(adapter_dtype, fuse_base, merge_open) -> None:
    for name, flag in (("fuse_base", fuse_base), ("merge_open", merge_open)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected True or False, got {flag!r}")
    if fuse_base and merge_open:
        raise ValueError("merge_open: True takes over the all-open calls that fuse_base=True "
                         "fuses; pass one of them, got both")
    if adapter_dtype is not None and adapter_dtype not in FLOATS:
        raise (ValueError if isinstance(adapter_dtype, torch.dtype) else TypeError)(
            f"adapter_dtype: expected None (each layer's dtype) or a floating dtype "
            f"(torch.float16, torch.bfloat16, torch.float32), got {adapter_dtype!r}")


def _check_fusions(targets: dict[str, nn.Linear], routing: Routing, backend: str,
                   fuse_base: bool, merge_open: bool) -> None:
    """The weights fuse_base's PyTorch path and merge_open take (host-side routes, fp32 CPU)."""
    if fuse_base and not routing.triton:
        odd = [(p, t.weight) for p, t in targets.items() if not fused_base.qualifies(t.weight)]
        if odd:
            path, w = odd[0]
            raise ValueError(f"fuse_base: True needs the Triton backend (CUDA tensors, or "
                             f"backend='triton' with TRITON_INTERPRET=1 on CPU), or on the "
                             f"PyTorch path contiguous fp32 CPU weights with rows of a multiple "
                             f"of 16 elements; got backend={backend!r} and {path}.weight "
                             f"{tuple(w.shape)} {w.dtype} on {w.device}")
    if not merge_open:
        return
    odd = [(p, t.weight) for p, t in targets.items()
           if not merged.qualifies(t.weight) or t.weight.device.type != "cpu"]
    if routing.triton or odd:
        path, w = odd[0] if odd else next((p, t.weight) for p, t in targets.items())
        raise ValueError(f"merge_open: True needs the PyTorch path (backend='torch' or 'auto' "
                         f"on the CPU) and fp32 CPU weights; got backend={backend!r} and "
                         f"{path}.weight {w.dtype} on {w.device}")


def _group(targets: dict[str, nn.Linear], model_type: str) -> list[list[str]]:
    """The targets' paths in shared-input groups, layer by layer."""
    by_layer: dict[int, list[str]] = {}
    for path in targets:
        layer, rel = LAYER_PATH.match(path).groups()
        by_layer.setdefault(int(layer), []).append(rel)
    return [[f"model.layers.{idx}.{r}" for r in rel_names]
            for idx, rels in sorted(by_layer.items())
            for rel_names in groups_of(model_type, rels)]


def _swap(root, groups: list[list[str]], targets: dict[str, nn.Linear], personas: list[Persona],
          routing: Routing, adapter_dtype, plan, fuse_cpu: bool = False) -> list:
    """Stack each group's adapters and swap its projections for gated ones; the swaps made."""
    swaps = []
    for full in groups:
        bases = [targets[p] for p in full]
        dtype = adapter_dtype or bases[0].weight.dtype
        if plan is None:
            group = Group(*stack(full, [b.weight for b in bases], personas, dtype))
        else:
            group = sharding.ShardedGroup(full, bases, personas, dtype, plan[full[0]])
        for slot, (path, base) in enumerate(zip(full, bases)):
            module = GatedLoraLinear(base, group, slot, routing)
            group.members.append(module)
            parent_path, _, attr = path.rpartition(".")
            parent = root.get_submodule(parent_path)
            swaps.append((parent, attr, getattr(parent, attr), module))
            setattr(parent, attr, module)
        if fuse_cpu and plan is None:
            group.fuse_cpu_gemm()
    return swaps


def _unwrap(root, inert: dict[str, nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put each inert PEFT wrapper's base layer in its place: it adds exactly zero, and left in
    place it would rebuild its whole (expert) weight in every forward."""
    unwrapped = []
    for path, wrapper in inert.items():
        parent_path, _, attr = path.rpartition(".")
        parent = root.get_submodule(parent_path)
        unwrapped.append((parent, attr, wrapper))
        setattr(parent, attr, wrapper.get_base_layer())
    return unwrapped


def _patch_of(model) -> _Patch:
    patch = getattr(model, "_prism_patch", None)
    if patch is None:
        raise ValueError("model: expected a model patched by prism_fast.patch_model, got an "
                         "unpatched one")
    return patch


def unpatch_model(model):
    """Restore the original modules (the same objects) and remove the hooks, except one: a
    forward pre-hook that refuses prism_routes= (the model's forward would otherwise take it
    into its **kwargs and silently run the base model); patch_model removes it again."""
    patch = _patch_of(model)
    for parent, attr, original, ours in reversed(patch.swaps):
        setattr(parent, attr, original)
        ours.group.unfuse()
    for parent, attr, wrapper in reversed(patch.unwrapped):
        setattr(parent, attr, wrapper)
    patch.overrides.remove()
    del model.__dict__["_prism_patch"]
    model.register_forward_pre_hook(_refuse_routes_kwarg, with_kwargs=True)
    return model


def _refuse_routes_kwarg(module, args, kwargs) -> None:
    if kwargs.get(ROUTES_KWARG) is not None:
        raise ValueError(f"{ROUTES_KWARG}: this model was unpatched (prism_fast.unpatch_model); "
                         f"it runs the base model and cannot take routes. Patch it again with "
                         f"prism_fast.patch_model to route")


def _allow_routes_kwarg(model) -> None:
    hooks = getattr(model, "_forward_pre_hooks", {})
    for key in [k for k, hook in hooks.items() if hook is _refuse_routes_kwarg]:
        del hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


def set_routes(model, routes: torch.Tensor | list[int] | None) -> None:
    """Fix routes [B] (−1 = base, 0…L−1 = persona) for the following forwards, also the decode
    steps in flight; None = the gate (or adapter 0 without one) decides again from the next
    prefill. Routes for B prompts also serve B·k rows (generate's beams / return sequences).
    For one call only, pass `prism_routes=routes` to the model's forward or generate instead.

    Ids given on the CPU are range-checked here; ids already on the GPU are not (that would
    need a device sync): the kernels treat an id outside −1…L−1 as a closed gate.
    """
    routing = _patch_of(model).routing
    if routes is None:
        routing.clear_routes()
    else:
        routing.fix_routes(routes)


def get_routes(model) -> torch.Tensor | None:
    """Routes (B,) int32 decided at the last prefill (or fixed by set_routes): a copy, on the
    model's device; None before the first prefill."""
    routes = _patch_of(model).routing.routes
    return None if routes is None else routes.clone()
