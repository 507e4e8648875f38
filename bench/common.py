"""Shared pieces of the benchmarks: device, timing, measured device limits, shapes, budget.

Timing follows one rule everywhere: on a GPU, `triton.testing.do_bench` (eager, L2 flushed before
every call) or `triton.testing.do_bench_cudagraph` (the same calls captured in one CUDA graph, so
host launch overhead disappears), reporting the median and the 20th / 80th percentiles. On a CPU
the same quantiles come from `time.perf_counter` around each call; such numbers are labelled
"CPU: not a GPU result" wherever they are written.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from prism_fast.training import BinaryGate

CPU_LABEL = "CPU: not a GPU result"
QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80: the order do_bench returns them in
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelShape:
    """The projection sizes of one decoder architecture (and enough to build it with HF)."""

    name: str
    hidden: int
    kv: int           # width of k_proj / v_proj = kv_heads · head_dim
    inter: int        # MLP intermediate size
    qkv_bias: bool    # Qwen2 has biases on q/k/v, Llama has none
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def groups(self, proj: str) -> list[tuple[int, list[int], bool]]:
        """The op calls a projection name stands for: [(K, [N_s per slice], bias)].

        Single projections are one slice; "qkv" / "gate_up" are the shared-input multi-slice
        calls; "layer" is one decoder layer: qkv, o, gate_up, down (the seven projections).
        """
        h, kv, i, qb = self.hidden, self.kv, self.inter, self.qkv_bias
        table = {
            "q": [(h, [h], qb)], "k": [(h, [kv], qb)], "v": [(h, [kv], qb)], "o": [(h, [h], False)],
            "gate": [(h, [i], False)], "up": [(h, [i], False)], "down": [(i, [h], False)],
            "qkv": [(h, [h, kv, kv], qb)], "gate_up": [(h, [i, i], False)],
        }
        table["layer"] = table["qkv"] + table["o"] + table["gate_up"] + table["down"]
        return table[proj]


MODELS = {
    "llama3-8b": ModelShape("llama3-8b", 4096, 1024, 14336, False, 32, 32, 8, 128256),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 3584, 512, 18944, True, 28, 28, 4, 152064),
    # The real model of the CPU runs (bench/models.py): SmolLM2-135M-Instruct, Llama architecture.
    "smollm2-135m": ModelShape("smollm2-135m", 576, 192, 1536, False, 30, 9, 3, 49152),
    # CPU-sized stand-in: same structure (GQA, 7 projections), small enough for 2 cores.
    "tiny": ModelShape("tiny", 256, 64, 704, False, 4, 4, 1, 1024),
}
PROJECTIONS = ("layer", "qkv", "gate_up", "q", "k", "v", "o", "gate", "up", "down")


class Budget:
    """A wall-clock deadline that sections check before starting a new measurement."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def minus(self, reserve: float) -> Budget:
        """A budget that ends `reserve` seconds before this one (kept for the later sections)."""
        return Budget(None if self.deadline is None else max(0.0, self.left() - reserve))


class _LiveStorages(TorchDispatchMode):
    """Bytes of the tensor storages created by ops in this region and still alive, and their
    peak: `torch.cuda.max_memory_allocated`'s meaning, for CPU tensors. Runs on the autograd
    engine's ops too (on CPU the backward runs in the calling thread). Outputs that share an
    input's storage (views, in-place and out= ops) are not new memory."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue          # sparse results (a head gradient) are not strided storage
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key)
        return out


class PeakMemory:
    """Peak bytes above the level at entry, in `peak_bytes` after exit.

    CUDA: the caching allocator's `max_memory_allocated`. CPU, `exact=False`: resident memory
    sampled every 2 ms by a thread, cheap enough to time the same run; `exact=True`: every
    tensor storage the region's ops create, counted while alive (`_LiveStorages`), exact but
    slowing every op, so time such a region separately."""

    def __init__(self, device: torch.device, exact: bool = False):
        self.device, self.exact, self.peak_bytes = device, exact, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif self.exact:
            self.live = _LiveStorages().__enter__()
        else:
            with contextlib.suppress(OSError, AttributeError):   # hand freed pages back first
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.start = self.peak = _rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        elif self.exact:
            self.live.__exit__(*exc)
            self.peak_bytes = self.live.peak
        else:
            self.stop.set()
            self.thread.join()
            self.peak_bytes = max(self.peak, _rss()) - self.start
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Measured peak bytes allocated by one call of `fn` above what was allocated before it
    (`PeakMemory`, exact on CPU)."""
    with PeakMemory(device, exact=True) as mem:
        fn()
    return mem.peak_bytes


@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float


@dataclass
class TimerConfig:
    warmup_ms: float
    rep_ms: float
    graph_rep_ms: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, mode: str, cfg: TimerConfig) -> Timing:
    """Quantiles of one call of `fn` in µs. mode: "eager" or "graph" (CUDA graph, GPU only)."""
    if device.type == "cuda":
        import triton.testing

        if mode == "graph":
            q = triton.testing.do_bench_cudagraph(fn, rep=cfg.graph_rep_ms, quantiles=QUANTILES)
        else:
            q = triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms,
                                        quantiles=QUANTILES)
        return Timing(*(v * 1e3 for v in q))
    if mode != "eager":
        raise ValueError(f"mode: {mode!r} needs a CUDA device; on CPU only 'eager' exists")
    return _cpu_quantiles(fn, cfg)


def _cpu_quantiles(fn: Callable[[], object], cfg: TimerConfig) -> Timing:
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
    q = np.quantile(np.array(times), QUANTILES) * 1e6
    return Timing(*(float(v) for v in q))


def device_limits(device: torch.device, dtype: torch.dtype, cfg: TimerConfig) -> dict:
    """Measured copy bandwidth (GB/s) and dense matmul throughput (TFLOP/s) of this device.

    The achieved GB/s and TFLOP/s of every row are reported as a share of these, so "% of peak"
    means "of what this device did in the same process", not of a datasheet.
    """
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


def make_gate(hidden: int, dtype: torch.dtype, device: torch.device, *,
              always_open: bool = False) -> BinaryGate:
    """A random gate in eval mode. always_open: the lora class wins for every input, so that
    single-pass and two-pass routing do the same work as a forced all-open route."""
    gate = BinaryGate(hidden).to(device=device, dtype=dtype).eval()
    if always_open:
        with torch.no_grad():
            gate.gate[3].weight.mul_(1e-3)
            gate.gate[3].bias.copy_(torch.tensor([-4.0, 4.0]))
    return gate
