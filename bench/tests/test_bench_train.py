"""bench/bench_train.py: its measured peak memory (bench.common.peak_memory) and a whole run on a
tiny random model, on CPU."""

import json

import torch

from bench import bench_train
from bench.common import peak_memory

CPU = torch.device("cpu")
MIB = 2 ** 20


def test_peak_memory_counts_live_storages_once():
    def allocations():
        a = torch.empty(MIB // 4)            # 1 MiB
        b = torch.empty(MIB // 4)
        del a
        c = torch.empty(MIB // 4)            # a's bytes were freed: the peak stays at 2 MiB
        c.add_(1)                            # in place: no new storage
        torch.mul(c, 2, out=c)               # out=: no new storage
        c.view(2, -1).t()                    # views: no new storage
        return b, c
    assert peak_memory(allocations, CPU) == 2 * MIB


def test_peak_memory_sees_the_backward():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(MIB // 64, 256, requires_grad=True)     # 4 MiB: w.grad too

    def step():
        (x @ w.t()).sum().backward()
    # The forward holds only the 1 MiB product; w.grad (4 MiB) and x.grad exist only from the
    # backward on, so a peak of at least their sum proves the backward's ops are counted.
    peak = peak_memory(step, CPU)
    assert w.numel() * 4 + x.numel() * 4 <= peak <= w.numel() * 4 + x.numel() * 4 + MIB, peak


def test_bench_train_runs_and_measures(tmp_path):
    stem = tmp_path / "train"
    bench_train.main(["--model", "tiny", "--resp", "8", "--prompt", "8", "--reps", "1",
                      "--head-shapes", "smollm2-135m", "--out", str(stem)])
    data = json.loads(stem.with_suffix(".json").read_text())
    (step,) = data["stage_b"]
    assert step["official_s_per_sample"] > 0 and step["prism_fast_mb8_s_per_sample"] > 0
    assert step["official_peak_mib"] > 0
    (loss,) = data["loss"]
    # The official loss holds one sample's fp32 [T, V] logits at once: a floor the measured peak
    # must reach. The top-k loss's peak is its one chunk of gathered head rows plus [N, k] terms.
    assert loss["official_peak_mib"] * MIB >= loss["tokens"] * loss["vocab"] * 4
    assert loss["prism_fast_mb8_peak_mib"] < loss["official_peak_mib"]
    text = stem.with_suffix(".md").read_text()
    assert "CPU: not a GPU result" in text and "Amdahl" not in text   # no tiny-shape head row
