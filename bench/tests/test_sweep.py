"""The per-op sweep (`python -m bench --sweep`): its layer providers compute the same layer,
its command line refuses bad input before measuring, and an interrupt keeps what was measured."""

from __future__ import annotations

import json

import pytest
import torch

from bench import bench_gated_lora, bench_prism_gate

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
MODEL = "llama3-8b" if GPU else "tiny"
DTYPE = "bf16" if GPU else "fp32"
LAYER_PROVIDERS = [p for p in bench_gated_lora.PROVIDERS if GPU or p not in bench_gated_lora.GPU_ONLY]


@pytest.fixture(scope="module")
def factory() -> bench_gated_lora.InputFactory:
    return bench_gated_lora.InputFactory(DEVICE)


@pytest.mark.parametrize("case", [(8, 0.5, 4), (512, 0.5, 1), (8, 1.0, 1), (512, 0.0, 2)],
                         ids=["decode-mixed-L4", "prefill-half", "decode-open", "prefill-closed"])
def test_providers_agree(factory, case: tuple[int, float, int]):
    """Not a benchmark (skipped by --benchmark-only): the providers compute the same layer, so
    their times compare like with like. peft_style applies adapter 0 to every row, so it is
    compared only where every row is open with one adapter; a provider the sweep skips on a
    case (bench_gated_lora.skip_reason) is not compared there. The sweep's own check
    (check_providers) passes too."""
    m, share, n_adapters = case
    layer = bench_gated_lora.LayerCase(MODEL, "layer", m, share, 16, n_adapters, DTYPE)
    groups = bench_gated_lora.case_inputs(factory, layer)
    ref = bench_gated_lora.case_output("torch_ref", groups)
    tol = 1e-2 if DTYPE == "bf16" else 1e-5
    checked = [p for p in LAYER_PROVIDERS if p not in ("base", "torch_ref")
               and not bench_gated_lora.skip_reason(p, groups)]
    if not (share == 1.0 and n_adapters == 1):
        checked.remove("peft_style")
    for provider in checked:
        got = bench_gated_lora.case_output(provider, groups)
        assert bench_gated_lora.relative_error(got, ref) <= tol, provider
    assert bench_gated_lora.check_providers(checked, groups, DTYPE) == {}
    base = bench_gated_lora.case_output("base", groups)
    closed_equal = all(torch.equal(a, b) for a, b in zip(base, ref))
    assert closed_equal == (share == 0.0), "base and torch_ref agree exactly iff all rows closed"


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
                    "--share", "1", "--out", str(tmp_path)])
    assert status == 130
    (md,) = tmp_path.glob("cpu-*.md")
    data = json.loads(md.with_suffix(".json").read_text())
    gate_rows = [r for r in data["rows"] if r["bench"] == "gate"]
    assert len(gate_rows) == 2 and all(r["median_us"] for r in gate_rows)
    assert all("median_us" in r or r.get("error") for r in data["rows"])
    text = md.read_text()
    assert "interrupted" in text and "PRISM gate" in text and "11.0" in text
    pytest.importorskip("matplotlib")
    assert md.with_suffix(".png").is_file()
