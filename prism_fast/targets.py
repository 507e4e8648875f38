"""Checks of an adapter and a gate against the model they are patched onto (SPEC §5), and of
routes given to a patched model: every error names the argument, what was expected and what was
given, before anything is swapped or routed."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from prism_fast.hf import LAYER_PATH
from prism_fast.kernels.gated_lora import MAX_RANK
from prism_fast.loading import GATE_KEYS, Persona


def check_targets(root, personas: list[Persona], wrapped: dict, n_layers: int,
                  model_type: str) -> dict[str, nn.Linear]:
    """Every persona module exists in this model, is an nn.Linear and has matching shapes."""
    targets: dict[str, nn.Linear] = {}
    for persona in personas:
        for path, lw in persona.modules.items():
            m = LAYER_PATH.match(path)
            if m is None:
                raise ValueError(f"adapter: persona {persona.name!r} targets {path}, expected "
                                 f"modules under model.layers.<i>")
            if int(m.group(1)) >= n_layers:
                raise ValueError(f"adapter: persona {persona.name!r} targets layer {m.group(1)} but "
                                 f"the model has {n_layers} layers (an adapter made for another "
                                 f"model?)")
            if path in wrapped:
                base = wrapped[path].get_base_layer()
            else:
                try:
                    base = root.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"adapter: persona {persona.name!r} targets {path}, which "
                                     f"this {model_type} model does not have") from None
            _check_linear(base, persona.name, path)
            k, n = base.in_features, base.out_features
            if lw.a.shape[1] != k or lw.b.shape[0] != n:
                raise ValueError(f"adapter: persona {persona.name!r} on {path}: expected lora_A "
                                 f"(r, {k}) and lora_B ({n}, r), got {tuple(lw.a.shape)} and "
                                 f"{tuple(lw.b.shape)} (an adapter made for another model?)")
            if lw.a.shape[0] > MAX_RANK:
                raise ValueError(f"adapter: persona {persona.name!r} on {path}: expected rank "
                                 f"≤ {MAX_RANK}, got {lw.a.shape[0]}")
            targets[path] = base
        if persona.model_layers is not None and persona.model_layers != n_layers:
            made_for = f" ({persona.made_for})" if persona.made_for else ""
            raise ValueError(f"adapter: persona {persona.name!r} was made for a model with "
                             f"{persona.model_layers} layers{made_for} (PRISM puts LoRA on layers "
                             f"1…N−1, here 1…{persona.model_layers - 1}), but this model has "
                             f"{n_layers} layers")
    if not targets:
        raise ValueError("adapter: the personas target no module of this model")
    return targets


def _check_linear(base: nn.Module, persona: str, path: str) -> None:
    """A float nn.Linear; anything else is named by its full class."""
    cls = f"{type(base).__module__}.{type(base).__qualname__}"
    weight = getattr(base, "weight", None)
    quantized = "quantized" in type(base).__module__ or (
        isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point)
    if quantized:
        raise ValueError(f"adapter: persona {persona!r} targets {path}, a {cls}: quantized "
                         f"layers are not supported yet (expected a floating-point nn.Linear; "
                         f"patch the unquantized model)")
    if not isinstance(base, nn.Linear):
        raise ValueError(f"adapter: persona {persona!r} targets {path}, a {cls}; only nn.Linear "
                         f"targets are supported (e.g. attention and shared-expert projections of "
                         f"MoE models, not their fused routed experts)")


def check_gate(state: dict, root, n_adapters: int, targets: dict, device, dtype):
    """The gate's (w1, b1, w2, b2) in the model's dtype on layer 0's device."""
    w1, b1, w2, b2 = (state[k] for k in GATE_KEYS)
    hidden = getattr(root.config, "hidden_size", None)
    if hidden is not None and w1.shape[1] != hidden:
        raise ValueError(f"gate: expected gate.0.weight (D, {hidden}) for this model's hidden "
                         f"size, got {tuple(w1.shape)} (a gate made for another model?)")
    if w2.shape[0] != n_adapters + 1:
        raise ValueError(f"gate: expected {n_adapters + 1} classes (base + {n_adapters} "
                         f"personas) in gate.3.weight, got {w2.shape[0]}")
    on_layer0 = [p for p in targets if p.startswith("model.layers.0.")]
    if on_layer0:
        raise ValueError(f"adapter: LoRA on layer 0 ({', '.join(on_layer0)}) changes the gate "
                         f"input, so single-pass routing would be wrong; drop the gate and fix "
                         f"routes with prism_fast.set_routes(model, routes) instead")
    # The official gate runs in the model's dtype on the model's device.
    return tuple(t.detach().to(device=device, dtype=dtype) for t in (w1, b1, w2, b2))


class Given(NamedTuple):
    """Routes a caller gave (set_routes, prism_routes=), checked."""
    ids: torch.Tensor            # [B] int32, a copy on the routes' device
    closed: bool | None          # every id −1, if the host knows (CPU ids); None: on the device


def check_routes(routes, n_adapters: int, device) -> Given:
    """routes (tensor or list) → ([B] int32 copy on the routes' device, all closed if known).

    Ids given on the CPU are range-checked here; ids already on the GPU are not (that would
    need a device sync): the kernels treat an id outside −1…L−1 as a closed gate.
    """
    if isinstance(routes, (list, tuple)):
        routes = torch.tensor(routes)
    if not isinstance(routes, torch.Tensor):
        raise TypeError(f"routes: expected an integer tensor of shape (B,), got "
                        f"{type(routes).__name__}")
    if routes.dtype.is_floating_point or routes.dtype.is_complex \
            or routes.dtype == torch.bool or routes.dim() != 1 or routes.numel() == 0:
        raise ValueError(f"routes: expected an integer tensor of shape (B,) with B ≥ 1, got "
                         f"{routes.dtype} of shape {tuple(routes.shape)}")
    if routes.device.type == "meta":
        raise ValueError("routes: expected ids with values (on the CPU or the model's "
                         "device), got a tensor on the meta device, which holds none")
    closed = None
    if routes.device.type == "cpu":
        lo, hi = int(routes.min()), int(routes.max())
        if lo < -1 or hi >= n_adapters:
            raise ValueError(f"routes: expected values in -1…{n_adapters - 1}, got "
                             f"values in {lo}…{hi}")
        closed = hi < 0
    # Never the caller's tensor.
    return Given(routes.to(device=device, dtype=torch.int32, copy=True), closed)
