"""What prism_fast knows of Hugging Face architectures: which projections share an input, where
the decoder layers live, whether a model is a PeftModel. (PEFT adapters → personas is loading:
peft_loading.py; the method overrides of a patched model: overrides.py.)"""

from __future__ import annotations

import re

import torch.nn as nn

# model_type → projections of one decoder layer that read the same input, in call order (the
# first of a group runs the group's shared shrink). Types not listed use "default"; a targeted
# nn.Linear outside every group is patched on its own. Anything that is not an nn.Linear
# (Qwen2-MoE's routed experts are fused 3-D parameters in transformers 5, its router a
# TopKRouter) is refused by the checks, never patched half-way.
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
SHARED_INPUT: dict[str, tuple[tuple[str, ...], ...]] = {
    "default": (_ATTN, ("mlp.gate_proj", "mlp.up_proj")),
    "phi3": (),  # qkv_proj and gate_up_proj are fused nn.Linear already: one slice each
    "qwen2_moe": (_ATTN, ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
}
# The seven projections of a Llama-style decoder layer that PRISM's LoRA adapts (paths end in
# these names): one list for the trainer, the benchmarks and the tests.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def lora_targets(model: nn.Module) -> list[str]:
    """LORA_TARGETS as PEFT's target_modules for `model`, so that PEFT adapts its nn.Linear
    projections of those names and nothing else. Where a non-Linear module holds a parameter
    of such a name (transformers 5's fused MoE experts: gate_up_proj, down_proj), PEFT ≥ 0.22
    would also put a LoRA on that parameter, which the kernels cannot route: there the names
    are qualified by their parent ("shared_expert.down_proj"), which PEFT matches as a suffix."""
    fused = {name for m in model.modules() if not isinstance(m, nn.Linear)
             for name, _ in m.named_parameters(recurse=False)}
    if not fused & {*LORA_TARGETS, "gate_up_proj"}:
        return list(LORA_TARGETS)
    return sorted({".".join(path.split(".")[-2:]) for path, m in model.named_modules()
                   if isinstance(m, nn.Linear) and path.rpartition(".")[2] in LORA_TARGETS})


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def decoder_and_root(model):
    """(the transformers model, its decoder, the decoder's layers)."""
    root = model.base_model.model if is_peft_model(model) else model
    decoder = getattr(root, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"model: expected a decoder with model.model.layers (Llama, Mistral, "
                         f"Qwen2, Qwen2-MoE, Gemma, Phi-3, …), got {type(root).__name__}")
    return root, decoder, layers


def groups_of(model_type: str, rels: list[str]) -> list[list[str]]:
    """One layer's targeted projections (paths relative to the layer) in shared-input groups."""
    shared = SHARED_INPUT.get(model_type, SHARED_INPUT["default"])
    groups = [[r for r in names if r in rels] for names in shared]
    grouped = {r for g in groups for r in g}
    return [g for g in groups if g] + [[r] for r in rels if r not in grouped]
