"""bench/bench_topk_distill.py (`python -m bench --topk-distill`): a whole run on CPU at a small
head shape writes its table, and the official loss's peak holds its [T, V] logits."""

import json

from bench import bench_topk_distill

MIB = 2 ** 20


def test_topk_distill_runs_and_measures(tmp_path):
    stem = tmp_path / "topk"
    assert bench_topk_distill.main(["--device", "cpu", "--resp", "8", "--prompt", "8",
                                    "--reps", "1", "--head-shapes", "tiny", "--out",
                                    str(stem)]) == 0
    (row,) = json.loads((tmp_path / "topk.json").read_text())["rows"]
    assert row["official_s_per_sample"] > 0 and row["prism_fast_mb8_s_per_sample"] > 0
    assert row["official_peak_mib"] * MIB >= row["tokens"] * row["vocab"] * 4
    text = (tmp_path / "topk.md").read_text()
    assert "CPU: not a GPU result" in text and "| tiny [" in text


def test_bad_sizes_and_an_unwritable_out_are_refused_before_measuring(tmp_path, capsys,
                                                                      monkeypatch):
    import pytest

    monkeypatch.setattr(bench_topk_distill, "loss_rows", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit):
        bench_topk_distill.main(["--device", "cpu", "--reps", "0"])
    assert "--reps: expected positive integers, got [0]" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="--out: cannot write in"):
        bench_topk_distill.main(["--device", "cpu", "--out", str(tmp_path / "a_file" / "x")])
