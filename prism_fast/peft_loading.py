"""A PeftModel's loaded LoRA adapters as personas: what patch_model stacks when it is given a
PeftModel instead of adapter directories (loading.py reads those)."""

from __future__ import annotations

import torch

from prism_fast.loading import LoraWeights, Persona


def personas_from_peft_model(peft_model) -> tuple[list[Persona], dict[str, torch.nn.Module]]:
    """A PeftModel's loaded LoRA adapters → personas (in load order), plus the LoRA-wrapped
    modules by path (relative to the causal-LM root) so that patch_model can swap them."""
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
    for path, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            raise ValueError(f"model: LoRA on {path} wraps {type(module.get_base_layer()).__name__}"
                             f", expected nn.Linear")
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
    return personas, wrapped
