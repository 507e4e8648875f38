"""Shared pieces of the benchmarks: labels, the --device rule and run metadata, a time budget,
the gate, peak memory (shapes: prism_fast.testing.shapes; timing: bench/timing.py; reports:
bench/report.py)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench import report
from prism_fast.training import BinaryGate

CPU_LABEL = "CPU: not a GPU result"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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


def pick_device(choice: str) -> torch.device:
    """--device: "auto" is CUDA where there is one, else the CPU; "cuda" needs one."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch "
                         "(torch.cuda.is_available() is False); use --device cpu or auto")
    return torch.device(choice)


def device_meta(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        from prism_fast.kernels import gated_lora

        tuned = gated_lora.config_path(props.name)
        return dict(device=props.name, slug=props.name.replace(" ", "_"), gpu=True,
                    label="GPU", capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count,
                    tuned_config=str(tuned) if tuned.exists() else None)
    return dict(device=f"CPU ({platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} threads)",
                slug="cpu", gpu=False, label=CPU_LABEL, tuned_config=None)


def run_meta(args, device: torch.device, prefix: str, argv: list[str] | None
             ) -> tuple[Path, dict]:
    """(results' path stem, metadata) of a `python -m bench` run: --out (default bench/results,
    or its cpu/ folder off a GPU), checked writable before anything is measured."""
    out_dir = args.out or (report.RESULTS if device.type == "cuda" else report.RESULTS / "cpu")
    report.check_writable(out_dir)
    dev = device_meta(device)
    meta = {**dev, **report.run_meta("python -m bench", argv)}
    return out_dir / f"{prefix}{dev['slug']}-{meta['date'].replace('-', '')}", meta


# ---- the floor printed beside every PRISM ratio ------------------------------------------------


def weight_bytes(model) -> int:
    """Bytes of the weights a forward reads: unique storages, LoRA parameters left out, and an
    input embedding table not tied to the LM head (a forward reads only its B·T rows)."""
    storages = {p.data_ptr(): p.numel() * p.element_size()
                for name, p in model.named_parameters() if "lora_" not in name}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        storages.pop(emb.weight.data_ptr(), None)
    return sum(storages.values())


def peft_adapter_bytes(model, adapter: str) -> int:
    """Bytes of one PEFT adapter's LoRA A and B (what an open route reads once per step)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if ("lora_A." in name or "lora_B." in name) and f".{adapter}." in name)


def byte_floor(weights: int, adapter: int) -> dict:
    """The byte floor of an open route: 1 + adapter bytes / weight bytes read per step (the
    adapter is read once per batch, so the same at every B; KV-cache reads left out)."""
    return dict(weight_bytes=weights, adapter_bytes=adapter, floor=1 + adapter / weights)


def peft_byte_floor(model, adapter: str) -> dict:
    """byte_floor of a PEFT model's adapter `adapter` over its base weights."""
    return byte_floor(weight_bytes(model), peft_adapter_bytes(model, adapter))


def patched_groups(patched) -> list:
    """The gated-LoRA groups of a patched model, each once."""
    from prism_fast.layer import GatedLoraLinear

    return list({id(m.group): m.group for m in patched.modules()
                 if isinstance(m, GatedLoraLinear)}.values())


def patched_byte_floor(base, patched) -> dict:
    """byte_floor of a patched model's open route: per LoRA group one adapter's A [S·R, K] and
    B [ΣN, R], at the stacked dtype, over the base model's weight bytes."""
    groups = patched_groups(patched)
    adapter = sum((g.lora_a[0].numel() + g.lora_b[0].numel()) * g.lora_a.element_size()
                  for g in groups)
    return {**byte_floor(weight_bytes(base), adapter), "groups": len(groups)}


def roofline_floor(base: tuple[float, float], prism: tuple[float, float], limits: dict) -> float:
    """The floor of a (bytes, FLOPs) workload over the base one on this device: the ratio of
    their roofline times max(bytes / copy GB/s, FLOPs / matmul TFLOP/s), i.e. the byte floor
    where both are memory-bound (decode) and the FLOP floor where compute-bound (prefill)."""
    def t(work):
        return max(work[0] / limits["copy_gbps"], work[1] / (limits["matmul_tflops"] * 1e3))
    return t(prism) / t(base)


def x_floor(ratio: float | None, floor: float | None) -> float | None:
    """A ratio's overhead above 1 as a multiple of its floor's (None where the floor is 1)."""
    if ratio is None or floor is None or floor <= 1:
        return None
    return (ratio - 1) / (floor - 1)
