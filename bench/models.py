"""The benchmarks' models: a random-init Llama of a bench.common.MODELS shape, the real
SmolLM2-135M-Instruct (prism_fast.testing.smollm2, shared with the tests), and PRISM's LoRA on
either as a PEFT model."""

from __future__ import annotations

import warnings

import torch

from prism_fast.testing.shapes import MODELS, ModelShape
from prism_fast.testing.smollm2 import load_smollm2

ADAPTER = "persona_expert"


def build_model(shape: ModelShape, layers: int, dtype: torch.dtype, device: torch.device):
    """Random-init LlamaForCausalLM with `shape`'s sizes, created directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         intermediate_size=shape.inter, num_hidden_layers=layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # created in dtype: an fp32 8B model would need 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_model(name: str, layers: int | None, dtype: torch.dtype,
               device: str | torch.device = "cpu"):
    """(model, its layer count) for a name of MODELS: "smollm2-135m" is the real model at its own
    depth; any other name a random-init model of that shape with `layers` decoder layers."""
    shape = MODELS[name]
    if name == "smollm2-135m":
        return load_smollm2(dtype, device)[0], shape.layers
    layers = layers or shape.layers
    return build_model(shape, layers, dtype, device), layers


def add_peft_adapter(model, layers: int | None = None, **lora):
    """PRISM's LoRA as a PEFT model in eval mode: r = 16, α = 32, the seven projections of
    layers 1…N−1, A and B random (`init_lora_weights=False`) unless `lora` says otherwise."""
    from peft import LoraConfig, get_peft_model

    from prism_fast.hf import LORA_TARGETS

    layers = layers or model.config.num_hidden_layers
    config = LoraConfig(**{"r": 16, "lora_alpha": 32, "target_modules": list(LORA_TARGETS),
                           "layers_to_transform": list(range(1, layers)), "lora_dropout": 0.0,
                           "bias": "none", "init_lora_weights": False, "task_type": "CAUSAL_LM",
                           **lora})
    with warnings.catch_warnings():  # PEFT calls deprecated transformers properties: noise
        warnings.simplefilter("ignore")
        return get_peft_model(model, config, adapter_name=ADAPTER).eval()


def smollm2_with_adapter(dtype: torch.dtype = torch.float32, device="cpu"):
    """(SmolLM2, a second copy with PRISM's random LoRA as a PEFT model, the tokenizer)."""
    base, tokenizer = load_smollm2(dtype, device)
    return base, add_peft_adapter(load_smollm2(dtype, device)[0]), tokenizer
