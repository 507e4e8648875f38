"""The benchmarks' one timing module.

Kernel-sized calls: on a GPU `triton.testing.do_bench` (eager, L2 flushed before every call) or
prism_fast.tuning_timers.graph_times_us (CUDA graph, host launch overhead gone: the one graph
timer, the one `prism_fast.tune` decides with), median and 20th / 80th percentiles; on a CPU the
same quantiles of `time.perf_counter` (labelled "CPU: not a GPU result" wherever written).
Whole forwards and generations: `rounds`, interleaved so that the machine's drift falls on every
case alike, and medians of what each round measured.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80: the order do_bench returns them in
GRAPH_REPLAYS = 10           # graph replays per measurement: enough values for p20 / p80


@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float


@dataclass
class TimerConfig:
    warmup_ms: float
    rep_ms: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, mode: str, cfg: TimerConfig) -> Timing:
    """Quantiles of one call of `fn` in µs. mode: "eager" or "graph" (CUDA graph, GPU only)."""
    if device.type == "cuda":
        if mode == "graph":   # lazily: the PyTorch-only benchmarks run without prism_fast
            from prism_fast.tuning_timers import graph_times_us

            return quantiles(graph_times_us(fn, device, GRAPH_REPLAYS))
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, quantiles=QUANTILES)
        return Timing(*(v * 1e3 for v in q))
    if mode != "eager":
        raise ValueError(f"mode: {mode!r} needs a CUDA device; on CPU only 'eager' exists")
    fn()
    t0 = time.perf_counter()
    fn()
    estimate = max(time.perf_counter() - t0, 1e-7)
    for _ in range(max(1, int(cfg.warmup_ms * 1e-3 / estimate))):
        fn()
    times = []
    # At least 5 samples so that p20/p80 mean something, at most 10k so tiny ops stay bounded.
    for _ in range(min(10_000, max(5, int(cfg.rep_ms * 1e-3 / estimate)))):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return quantiles_us(times)


def quantiles_us(seconds: list[float]) -> Timing:
    return quantiles(np.array(seconds) * 1e6)


def quantiles(us) -> Timing:
    """Median, p20 and p80 of times already in µs."""
    return Timing(*(float(v) for v in np.quantile(np.asarray(us), QUANTILES)))


def seconds(fn: Callable[[], object], device: torch.device | None = None) -> Callable[[], float]:
    """`fn` made to return its wall seconds (the GPU synchronised before the clock stops)."""
    def timed() -> float:
        t = time.perf_counter()
        fn()
        if device is not None:
            sync(device)
        return time.perf_counter() - t
    return timed


class TokenStamps:
    """A logits processor that only records when `generate` reaches each token's logits (after
    `sync`, e.g. the GPU's)."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        if self.sync is not None:
            self.sync()
        self.times.append(time.perf_counter())
        return scores


def rounds(calls: dict[Hashable, Callable[[], object]], n: int, warmup: int = 1,
           after_round: Callable[[int], None] | None = None,
           out: dict[Hashable, list] | None = None) -> dict[Hashable, list]:
    """Interleaved rounds: each runs every call once, in order; the first `warmup` rounds are
    dropped. Returns what each call returned, per measured round (appended to `out` as they
    come, if given: an interrupted run keeps its rounds)."""
    out = {k: [] for k in calls} if out is None else out
    for r in range(warmup + n):
        for k, fn in calls.items():
            result = fn()
            if r >= warmup:
                out[k].append(result)
        if after_round is not None:
            after_round(r)
    return out


def device_limits(device: torch.device, dtype: torch.dtype, cfg: TimerConfig) -> dict:
    """Measured copy bandwidth (GB/s) and dense matmul throughput (TFLOP/s) of this device: the
    denominators of every row's "% of peak" (what this device did in this process)."""
    gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if gpu else (64 << 20)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src), device, "eager", cfg).median_us
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t_mm = measure(lambda: a @ b, device, "eager", cfg).median_us
    return {
        "copy_gbps": 2 * copy_bytes / t_copy / 1e3,  # read + write
        "matmul_tflops": 2 * n**3 / t_mm / 1e6,
        "copy_bytes": copy_bytes, "matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
    }


def medians(calls: dict[Hashable, Callable[[], object]], reps: int,
            device: torch.device | None = None) -> dict[Hashable, float]:
    """Median seconds of each call over `reps` interleaved rounds, after a warm-up round."""
    runs = rounds({name: seconds(fn, device) for name, fn in calls.items()}, reps)
    return {name: statistics.median(ts) for name, ts in runs.items()}
