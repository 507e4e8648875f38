"""pytest-benchmark versions of a few sweep cases: `pytest bench/ --benchmark-only`.

Without a GPU: the tiny shape in fp32 with the PyTorch providers (a harness check, not a speed
result). With one: Llama-3-8B shapes in bf16 with every provider, and a 4-layer Llama-3-8B-shaped
model for the end-to-end decode step. `pytest` alone never collects this file (testpaths =
tests and bench/tests in pyproject.toml).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench import bench_gated_lora, bench_prism_gate, e2e_steps
from bench.common import DTYPES, make_gate
from bench.models import add_peft_adapter, build_model
from prism_fast.testing.shapes import MODELS

pytest.importorskip("pytest_benchmark")

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
MODEL = "llama3-8b" if GPU else "tiny"
DTYPE = "bf16" if GPU else "fp32"
LAYER_PROVIDERS = [p for p in bench_gated_lora.PROVIDERS if GPU or p not in bench_gated_lora.GPU_ONLY]
GATE_PROVIDERS = [p for p in bench_prism_gate.PROVIDERS if GPU or p not in bench_prism_gate.GPU_ONLY]


def synced(fn):
    """pytest-benchmark times on the host: wait for the GPU inside the timed call."""
    if not GPU:
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.fixture(scope="module")
def factory() -> bench_gated_lora.InputFactory:
    return bench_gated_lora.InputFactory(DEVICE)


@pytest.mark.parametrize("provider", LAYER_PROVIDERS)
@pytest.mark.parametrize("m", [1, 64, 4096 if GPU else 512])
@pytest.mark.parametrize("proj", ["layer", "qkv"])
def test_layer(benchmark, factory, proj: str, m: int, provider: str):
    case = bench_gated_lora.LayerCase(MODEL, proj, m, 0.5, 16, 1, DTYPE)
    groups = bench_gated_lora.case_inputs(factory, case)
    bench_gated_lora.check_inputs(groups)
    reason = bench_gated_lora.skip_reason(provider, groups)
    if reason:   # fused_base above 64 rows, or a path repeating another's config
        pytest.skip(reason)
    benchmark.group = f"{MODEL} {proj} M={m} open 0.5"
    benchmark(synced(bench_gated_lora.case_fn(provider, groups)))


@pytest.mark.parametrize("provider", GATE_PROVIDERS)
@pytest.mark.parametrize("batch", [1, 32, 256])
def test_gate(benchmark, batch: int, provider: str):
    hidden = MODELS[MODEL].hidden
    gate = make_gate(hidden, DTYPES[DTYPE], DEVICE)
    h = torch.randn(batch, hidden, dtype=DTYPES[DTYPE], device=DEVICE)   # [B, H]
    benchmark.group = f"gate H={hidden} B={batch}"
    benchmark(synced(bench_prism_gate.gate_fn(provider, h, gate)))


@pytest.fixture(scope="module")
def models():
    """(base model, PEFT model with the PRISM adapter): 4 decoder layers keep it quick."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    layers = 4
    dtype = torch.bfloat16 if GPU else torch.float32
    base = build_model(MODELS[MODEL], layers, dtype, DEVICE)
    peft_model = add_peft_adapter(copy.deepcopy(base), layers)
    gate = make_gate(MODELS[MODEL].hidden, dtype, DEVICE, always_open=True)
    return base, peft_model, gate.state_dict()


@pytest.mark.parametrize("provider", ["base", "peft", "prism_open", "prism_closed"])
def test_e2e_decode(benchmark, models, provider: str):
    import prism_fast

    base, peft_model, gate_state = models
    case = e2e_steps.E2ECase("decode", 1, 512 if GPU else 128)
    ids = torch.randint(0, MODELS[MODEL].vocab, (case.batch, case.tokens), device=DEVICE)
    model = base if provider == "base" else peft_model
    patched = provider.startswith("prism_")
    if patched:
        prism_fast.patch_model(peft_model, gate=gate_state)
        route = 0 if provider == "prism_open" else -1
        prism_fast.set_routes(peft_model, torch.full((case.batch,), route, dtype=torch.int32,
                                                     device=DEVICE))
    benchmark.group = f"e2e decode B=1 context {case.tokens} ({MODEL}, 4 layers)"
    try:
        with torch.no_grad():
            # Keyword names from the HF model's own signature (PEFT's forward hides them).
            step = e2e_steps.case_fn(model, e2e_steps.Forward(base), case, ids, {})
            benchmark(synced(step))
    finally:
        if patched:
            prism_fast.unpatch_model(peft_model)
