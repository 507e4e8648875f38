"""The serving benchmark (`python -m bench --serving`): its crossover, its options, its rounds
and, on the real SmolLM2, its quick report."""

from __future__ import annotations

import pytest


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
    from prism_fast.batching import engine_supported
    from prism_fast.testing.smollm2 import smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2-135M-Instruct is not installed")
    if not engine_supported():
        pytest.skip("the continuous-batching engine prism_fast hooks needs transformers >= 5.25")
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
