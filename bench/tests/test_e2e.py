"""bench/bench_e2e.py (`python -m bench --e2e`) on a tiny random Llama on CPU: every provider
gets its rows, ratios and floors, the report is written whole, an interrupt keeps the rounds
measured, and bad options are refused before any model is built."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from bench import bench_e2e  # noqa: E402

ALL = ",".join(bench_e2e.PROVIDERS)
TINY = ["--model", "tiny", "--layers", "2", "--device", "cpu", "--steps", "2"]


def run(tmp_path, *extra: str) -> tuple[int, dict, str]:
    status = bench_e2e.main([*TINY, "--out", str(tmp_path), *extra])
    (js,) = tmp_path.glob("decode-floor-tiny*.json")
    assert not list(tmp_path.glob("*.tmp*"))
    return status, json.loads(js.read_text()), js.with_suffix(".md").read_text()


def test_every_provider_has_its_rows(tmp_path):
    status, data, md = run(tmp_path, "--rounds", "1", "--providers", ALL)
    assert status == 0
    rows = {(r["kind"], r["B"], r["provider"]): r for r in data["rows"]}
    cases = {(c.kind, c.batch) for c in bench_e2e.CASES["cpu"]}
    for kind, b in cases:
        for p in bench_e2e.PROVIDERS:
            expected = not (p in bench_e2e.PREFILL_ONLY and kind == "decode") \
                and not (p in ("prism_half", "peft_adapter_names") and b == 1)
            assert ((kind, b, p) in rows) == expected, (kind, b, p)
    floor = data["meta"]["floor"]["floor"]
    assert 1 < floor < 1.2
    for (_, _, p), r in rows.items():
        assert r["ratio"] > 0 and r["samples"] == (2 if r["kind"] == "decode" else 1)
        want = None if p in ("base", "persona_prompt") else 1.0 if p == "prism_closed" else floor
        assert r["floor"] == pytest.approx(want) if want else r["floor"] is None
    assert "prism_merged" in md and "byte floor" in md and "prism_gate − prism_open" in md


def test_an_interrupt_keeps_the_rounds_measured(tmp_path, monkeypatch):
    done = []

    def rounds(calls, n, warmup, after_round, out):
        for r in range(warmup + n):
            if r == 2:
                raise KeyboardInterrupt
            for k, fn in calls.items():
                res = fn()
                if r >= warmup:
                    out[k].append(res)
            after_round(r)
            done.append(r)

    monkeypatch.setattr(bench_e2e, "rounds", rounds)
    status, data, md = run(tmp_path, "--rounds", "3")
    assert status == 130 and done == [0, 1]
    assert all(len(r["round_medians_ms"]) == 1 for r in data["rows"])
    assert "interrupted (SIGINT/SIGTERM) after 1 of 3 measured rounds" in md


@pytest.mark.parametrize("argv, words", [
    (["--providers", "prism_open"], "must be among them"),
    (["--providers", "base,nope"], "--providers: expected names from"),
    (["--modes", "graph"], "--modes: expected names from eager"),
    (["--rounds", "0"], "--rounds: expected a positive integer, got 0")])
def test_bad_options_are_refused(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(bench_e2e, "build", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(SystemExit):
        bench_e2e.main([*TINY, *argv])
    assert words in capsys.readouterr().err


def test_compile_wraps_each_copy_after_it_is_made(monkeypatch):
    """--compile: every copy is compiled after all are made (a deep copy of a compiled model
    keeps the original's forward: the prism rows would time PEFT). torch.compile stubbed."""
    import functools

    import torch

    def fake_compile(fn, **_):
        return functools.wraps(fn)(lambda *a, **k: fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_compile)
    args = bench_e2e.parse_args([*TINY, "--compile", "--providers", ALL], gpu=False)
    ms = bench_e2e.build(args, torch.device("cpu"))
    for model in (ms.base, ms.peft, ms.patched):
        assert model.forward.__wrapped__.__self__ is model


def test_results_named_after_a_dotted_model_keep_their_name(tmp_path):
    from bench import report

    assert report.suffixed(tmp_path / "decode-floor-qwen2.5-7b", ".json").name == \
        "decode-floor-qwen2.5-7b.json"
