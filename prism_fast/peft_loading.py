"""A PeftModel's loaded LoRA adapters as personas: what patch_model stacks when it is given a
PeftModel instead of adapter directories (loading.py reads those)."""

from __future__ import annotations

import torch

from prism_fast.loading import LoraWeights, Persona


def personas_from_peft_model(peft_model) -> tuple[list[Persona], dict[str, torch.nn.Module],
                                                  dict[str, torch.nn.Module]]:
    """A PeftModel's loaded LoRA adapters → (personas in load order, the LoRA-wrapped
    nn.Linear modules by path (relative to the causal-LM root) that patch_model swaps, and the
    inert wrappers by path that it unwraps).

    Inert: a LoRA on something other than an nn.Linear whose every lora_B is exactly zero, so it
    adds exactly nothing. PEFT ≥ 0.22 makes these when it loads an adapter whose target_modules
    name MoE projections (gate_proj, up_proj, down_proj) onto transformers 5's fused experts: it
    adds target_parameters for them that the adapter's weights never held (B stays at its zero
    init). Any other non-Linear LoRA is refused: the kernels route nn.Linear projections only."""
    from peft.tuners.lora import LoraLayer

    root = peft_model.base_model.model
    names = list(peft_model.peft_config)
    for n in names:
        cfg = peft_model.peft_config[n]
        if getattr(cfg, "peft_type", None) is None or cfg.peft_type.value != "LORA":
            raise ValueError(f"model: adapter {n!r} is {cfg.peft_type}, expected LoRA")
        if getattr(cfg, "modules_to_save", None):
            raise ValueError(f"model: adapter {n!r} has modules_to_save, which a per-row gate "
                             f"cannot route; not supported")
    personas = [Persona(name=n, modules={}, source="PeftModel") for n in names]
    wrapped: dict[str, torch.nn.Module] = {}
    inert: dict[str, torch.nn.Module] = {}
    for path, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            _check_inert(module, path)
            if not any(path.startswith(f"{outer}.") for outer in inert):   # nested wrappers
                inert[path] = module
            continue
        wrapped[path] = module
        for persona in personas:
            if persona.name not in module.lora_A:
                continue
            if module.use_dora.get(persona.name):
                raise ValueError(f"model: adapter {persona.name!r} uses DoRA on {path}; not "
                                 f"supported")
            persona.modules[path] = LoraWeights(
                a=module.lora_A[persona.name].weight.detach(),
                b=module.lora_B[persona.name].weight.detach(),
                scaling=float(module.scaling[persona.name]))
    if not wrapped:
        raise ValueError("model: expected a PeftModel with LoRA adapters, found no LoRA layers")
    return personas, wrapped, inert


def _check_inert(module, path: str) -> None:
    """A LoRA on a non-Linear layer: fine only if it is PEFT's ParamWrapper (a LoRA on a
    parameter, whose only B is lora_B) and it adds exactly zero for every adapter."""
    from peft.tuners.lora import ParamWrapper

    base = type(module.get_base_layer()).__name__
    if not isinstance(module, ParamWrapper):
        raise ValueError(f"model: LoRA on {path} wraps {base}, expected nn.Linear")
    for name, b in module.lora_B.items():
        tensors = [t for t in (getattr(b, "weight", None), getattr(b, "bias", None))
                   if t is not None]
        if any(bool(t.detach().ne(0).any()) for t in tensors):
            what = getattr(module, "parameter_name", None)
            on = f"{path}.{what}" if what else path
            raise ValueError(f"model: adapter {name!r} has a trained LoRA on {on}, a {base} "
                             f"(PEFT target_parameters, e.g. MoE experts), expected LoRA on "
                             f"nn.Linear projections only; train the adapter without "
                             f"target_parameters on those layers")
