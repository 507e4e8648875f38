"""The benchmarks' models: a random-init Llama of a bench.common.MODELS shape, or the real
SmolLM2-135M-Instruct (prism_fast.testing.smollm2, shared with the tests)."""

from __future__ import annotations

import torch

from bench.common import MODELS, ModelShape
from prism_fast.testing.smollm2 import load_smollm2


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
    """(model, its layer count) for a name of bench.common.MODELS: "smollm2-135m" is the real
    SmolLM2-135M-Instruct at its own depth; any other name a random-init model of that shape
    with `layers` decoder layers (default: the shape's own count)."""
    shape = MODELS[name]
    if name == "smollm2-135m":
        return load_smollm2(dtype, device)[0], shape.layers
    layers = layers or shape.layers
    return build_model(shape, layers, dtype, device), layers
