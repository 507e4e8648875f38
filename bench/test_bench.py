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

from bench import bench_e2e, bench_gated_lora, bench_prism_gate
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
    benchmark.group = f"{MODEL} {proj} M={m} open 0.5"
    benchmark(synced(bench_gated_lora.case_fn(provider, groups)))


@pytest.mark.parametrize("case", [(8, 0.5, 4), (512, 0.5, 1), (8, 1.0, 1), (512, 0.0, 2)],
                         ids=["decode-mixed-L4", "prefill-half", "decode-open", "prefill-closed"])
def test_providers_agree(factory, case: tuple[int, float, int]):
    """Not a benchmark (skipped by --benchmark-only): the providers compute the same layer, so
    their times compare like with like. peft_style applies adapter 0 to every row, so it is
    compared only where every row is open with one adapter."""
    m, share, n_adapters = case
    layer = bench_gated_lora.LayerCase(MODEL, "layer", m, share, 16, n_adapters, DTYPE)
    groups = bench_gated_lora.case_inputs(factory, layer)

    def out(provider: str) -> torch.Tensor:
        ys = []
        for g in groups:
            y = bench_gated_lora.provider_fn(provider, g)()
            ys += y if isinstance(y, list) else [y]
        return torch.cat([t.reshape(-1).float() for t in ys])

    ref = out("torch_ref")
    tol = 1e-2 if DTYPE == "bf16" else 1e-5
    checked = [p for p in LAYER_PROVIDERS if p not in ("base", "torch_ref")]
    if not (share == 1.0 and n_adapters == 1):
        checked.remove("peft_style")
    for provider in checked:
        assert torch.linalg.norm(out(provider) - ref) <= tol * torch.linalg.norm(ref), provider
    closed_equal = torch.equal(out("base"), ref)
    assert closed_equal == (share == 0.0), "base and torch_ref agree exactly iff all rows closed"


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


@pytest.mark.parametrize("provider", ["base", "peft", "prism_fast_open", "prism_fast_closed"])
def test_e2e_decode(benchmark, models, provider: str):
    import prism_fast

    base, peft_model, gate_state = models
    case = bench_e2e.E2ECase("decode", 1, 512 if GPU else 128)
    ids = torch.randint(0, MODELS[MODEL].vocab, (case.batch, case.tokens), device=DEVICE)
    model = base if provider == "base" else peft_model
    patched = provider.startswith("prism_fast")
    if patched:
        prism_fast.patch_model(peft_model, gate=gate_state)
        route = 0 if provider == "prism_fast_open" else -1
        prism_fast.set_routes(peft_model, torch.full((case.batch,), route, dtype=torch.int32,
                                                     device=DEVICE))
    benchmark.group = f"e2e decode B=1 context {case.tokens} ({MODEL}, 4 layers)"
    try:
        with torch.no_grad():
            # Keyword names from the HF model's own signature (PEFT's forward hides them).
            step = bench_e2e.case_fn(model, bench_e2e.Forward(base), case, ids, {})
            benchmark(synced(step))
    finally:
        if patched:
            prism_fast.unpatch_model(peft_model)


# ---- the command line on bad input and on an interrupt (not benchmarks) --------------------------

def _main(argv):
    from bench.__main__ import main

    return main(argv)


@pytest.mark.parametrize("flag", ["--rank", "--m", "--adapters", "--gate-batch", "--rounds"])
def test_cli_refuses_non_positive_sizes(flag, capsys):
    with pytest.raises(SystemExit):
        _main(["--sweep", flag, "0"])
    assert f"argument {flag}: expected positive integers, got 0" in capsys.readouterr().err


@pytest.mark.skipif(GPU, reason="checks the message given without CUDA")
def test_cli_device_cuda_without_cuda():
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        _main(["--sweep", "--device", "cuda"])


def test_cli_out_unwritable_is_found_before_measuring(tmp_path, monkeypatch):
    import bench.sweep as cli

    monkeypatch.setattr(cli, "device_limits", lambda *a: pytest.fail("measuring started"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--out: cannot write in .*a_file"):
        _main(["--sweep", "--device", "cpu", "--out", str(tmp_path / "a_file" / "out")])


def test_interrupt_in_the_gate_section_keeps_what_was_measured(tmp_path, monkeypatch):
    """Ctrl-C in the middle of the gate section: the gates timed so far are in the JSON, the
    markdown and the plot, and no row is left without a time."""
    import bench.sweep as cli
    from bench.timing import Timing

    gate_calls = []

    def measure_gate(*a, **k):
        gate_calls.append(1)
        if len(gate_calls) == 3:                 # B = 1 timed for both providers, then Ctrl-C
            raise KeyboardInterrupt
        return Timing(10.0 + len(gate_calls), 9.0, 12.0)

    monkeypatch.setattr(cli, "device_limits", lambda *a: {
        "copy_gbps": 1.0, "matmul_tflops": 1.0, "copy_bytes": 1, "matmul_n": 1,
        "matmul_dtype": "float32"})
    monkeypatch.setattr(bench_gated_lora, "measure", lambda *a, **k: Timing(20.0, 19.0, 21.0))
    monkeypatch.setattr(bench_prism_gate, "measure", measure_gate)
    status = _main(["--sweep", "--device", "cpu", "--projections", "layer", "--m", "1,8",
                    "--share", "1", "--no-e2e", "--out", str(tmp_path)])
    assert status == 130
    (md,) = tmp_path.glob("cpu-*.md")
    data = __import__("json").loads(md.with_suffix(".json").read_text())
    gate_rows = [r for r in data["rows"] if r["bench"] == "gate"]
    assert len(gate_rows) == 2 and all(r["median_us"] for r in gate_rows)
    assert all("median_us" in r or r.get("error") for r in data["rows"])
    text = md.read_text()
    assert "interrupted" in text and "PRISM gate" in text and "11.0" in text
    pytest.importorskip("matplotlib")
    assert md.with_suffix(".png").is_file()


def test_serving_crossover_interpolates():
    """Not a benchmark: the crossover C between measured contexts, and where none is reached."""
    from bench.serving_crossover import crossover

    contexts, prism = [256, 512, 1024, 2048], 1.141          # EVIDENCE's B = 1 decode ratios
    at, text = crossover(contexts, [1.016, 1.061, 1.111, 1.241], prism)
    assert at == round(1024 + (prism - 1.111) / (1.241 - 1.111) * 1024) and text == f"≈ {at}"
    assert crossover(contexts, [1.2, 1.3, 1.4, 1.5], prism) == (256, "≤ 256")
    at, text = crossover(contexts, [1.0, 1.0, 1.0, 1.1], prism)
    assert at is None and "PRISM slower at every measured C" in text


@pytest.mark.parametrize("argv, words", [
    (["--attn", "flash"], "--attn"), (["--cases", "nope"], "--cases"),
    (["--crossover-contexts", "1024,200"], "increasing"), (["--requests", "0"], "--requests"),
    (["--rounds", "0"], "--rounds")])
def test_serving_bad_options(argv, words, capsys):
    from bench import bench_serving

    with pytest.raises(SystemExit):
        bench_serving.parse_args(argv)
    assert words in capsys.readouterr().err


def test_serving_rounds_merge_to_medians():
    from bench.bench_serving import median_row

    rows = [{"throughput_tok_s": 10.0, "prompt_tokens": 736, "peak_kv_mb": None, "x": "a"},
            {"throughput_tok_s": 30.0, "prompt_tokens": 736, "peak_kv_mb": None, "x": "a"},
            {"throughput_tok_s": 20.0, "prompt_tokens": 736, "peak_kv_mb": None, "x": "a"}]
    assert median_row(rows) == {"throughput_tok_s": 20.0, "prompt_tokens": 736,
                                "peak_kv_mb": None, "x": "a"}


@pytest.mark.real
def test_serving_quick_report(tmp_path):
    """`python -m bench --serving --quick` on the real SmolLM2: every case, the crossover at
    B = 1 and 8 with its byte floor, the report's sections, no temporary file left."""
    import json

    from bench import __main__ as bench_main
    from prism_fast.testing.smollm2 import smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2-135M-Instruct is not installed")
    assert bench_main.main(["--serving", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("serving-cpu-*.json")).read_text())
    rows = result["rows"]
    assert [r["case"] for r in rows] == ["base", "static_generate", "prompted", "prompted_shared",
                                         "prism_open", "prism_half", "prism_closed"]
    for r in rows:
        assert r["tokens"] == 16 + 48 + 32 + 24 and r["throughput_tok_s"] > 0
        assert (r["peak_kv_blocks"] is None) == (r["case"] == "static_generate")
    assert all(r["peak_kv_blocks"] >= 4 for r in rows if r["peak_kv_blocks"] is not None)
    cross = result["crossover"]
    assert cross["contexts"] == [200] and set(cross["batches"]) == {"1", "8"}
    assert cross["byte_floor"]["floor"] == pytest.approx(1.035, abs=0.005)
    for b in cross["batches"].values():
        assert b["prism_ratio"] > 0 and len(b["prompted_ratio"]) == 1 and b["crossover_text"]
    md = next(tmp_path.glob("serving-cpu-*.md")).read_text()
    for words in ("Decode crossover, measured side by side", "| static_generate |",
                  "byte floor", "peak KV blocks", "GPU rows (configured, not run"):
        assert words in md
    assert next(tmp_path.glob("serving-cpu-*.png")).stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*"))
