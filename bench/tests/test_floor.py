"""The floor printed beside every PRISM ratio (bench.common): its byte counts on a PEFT model, the
roofline ratio, the per-group byte floor of a decode path (bench_gated_lora), and the overhead as
a multiple."""

import pytest
import torch

from bench import bench_gated_lora
from bench.common import (
    byte_floor,
    peft_adapter_bytes,
    peft_byte_floor,
    roofline_floor,
    weight_bytes,
    x_floor,
)
from bench.models import ADAPTER


def _tiny_peft(tied: bool = True):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    base = sum(p.numel() for p in model.parameters()) * 4        # tied: counted once
    base -= 0 if tied else 96 * 64 * 4                           # untied: the embedding unread
    lora = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    return get_peft_model(model, lora, adapter_name=ADAPTER), base


def test_byte_floor_of_a_peft_model():
    model, base = _tiny_peft()
    # layer 1's q_proj (64 → 64) and down_proj (128 → 64) at r = 4: A [4, K] + B [N, 4], fp32
    adapter = 4 * (4 * 64 + 64 * 4) + 4 * (4 * 128 + 64 * 4)
    assert weight_bytes(model) == base           # LoRA parameters and tied copies left out
    assert weight_bytes(_tiny_peft(tied=False)[0]) == _tiny_peft(tied=False)[1]
    assert peft_adapter_bytes(model, ADAPTER) == adapter
    assert peft_adapter_bytes(model, "other") == 0
    assert byte_floor(base, adapter)["floor"] == pytest.approx(1 + adapter / base)
    assert peft_byte_floor(model, ADAPTER)["floor"] == pytest.approx(1 + adapter / base)


def test_roofline_floor_is_the_bound_that_binds():
    limits = {"copy_gbps": 100.0, "matmul_tflops": 1.0}          # 1e5 B/µs, 1e6 FLOP/µs
    # memory-bound: bytes decide (10 µs vs 11 µs); FLOPs far below
    assert roofline_floor((1e6, 1e3), (1.1e6, 2e3), limits) == pytest.approx(1.1)
    # compute-bound: FLOPs decide (100 µs vs 120 µs)
    assert roofline_floor((1e3, 1e8), (2e3, 1.2e8), limits) == pytest.approx(1.2)


def test_x_floor():
    assert x_floor(1.14, 1.035) == pytest.approx(4.0)
    assert x_floor(1.0, 1.035) == 0
    assert x_floor(1.2, 1.0) is None and x_floor(None, 1.1) is None


def test_group_byte_floor_of_the_decode_path_table():
    # tiny's o group: K = N = 256, bf16, M = 1: x, W, y against + A [16, 256] + B [256, 16]
    base = 2 * (256 + 256 * 256 + 256)
    floor = bench_gated_lora.group_byte_floor("tiny", "o", 1)
    assert floor == pytest.approx(1 + 2 * 2 * 16 * 256 / base)
    assert bench_gated_lora.group_byte_floor("llama3-8b", "qkv", 1) < 1.02
