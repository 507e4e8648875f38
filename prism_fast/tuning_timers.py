"""What `prism_fast.tune` (tuning.py) times, and how: one projection group's launches at M rows,
every row open, under a CUDA graph. The benchmarks that time the same paths
(bench/tune_gated_lora.py, bench/bench_gated_lora.py) launch them with these functions too, and
bench/timing.py graphs every benchmark's calls with `graph_times_us`.

A timer is `timer(shape, m, path)` → µs per call, or None where the path fails. Its paths:

    "split", "fused", "coop"  the LoRA term alone, by that decode path (kernels/gated_lora.py)
    "linear+<path>"           the whole projection as a fuse_base model's split path runs it:
                              F.linear for every slice, then the LoRA term by <path>
    "fused_base"              the whole projection by the fused base + LoRA kernel
                              (kernels/fused_base_lora.py), one launch
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prism_fast.kernels import gated_lora as gl
from prism_fast.kernels.fused_base_lora import fused_base_lora_triton

GRAPH_REPS = 20      # launches per captured graph: one replay times 20 calls
FUSED_BASE = "fused_base"
LINEAR = "linear+"   # prefix of the split path's whole projection: "linear+<decode path>"

# (K, (N_s, …), R, adapter dtype name, x dtype name): one projection group's shapes
Shape = tuple[int, tuple[int, ...], int, str, str]
Timer = Callable[[Shape, int, str], "float | None"]


def group_inputs(shape: Shape, m: int, device: torch.device, scale: float = 1.0) -> tuple:
    """One group's LoRA operands at M rows, every row open: (x [M, K], lora_a [1, S·R, K],
    lora_b [1, ΣN, R], scaling [S, 1], ids [M], ys S × [M, N_s] zeros)."""
    k, ns, r, adt, xdt = shape
    a_dtype, x_dtype = getattr(torch, adt), getattr(torch, xdt)
    x = torch.randn(m, k, device=device, dtype=x_dtype)
    a = torch.randn(1, len(ns) * r, k, device=device, dtype=a_dtype) / k**0.5
    b = torch.randn(1, sum(ns), r, device=device, dtype=a_dtype) * 0.01
    scaling = torch.full((len(ns), 1), scale, device=device)
    ids = torch.zeros(m, dtype=torch.int32, device=device)
    ys = [torch.zeros(m, n, device=device, dtype=x_dtype) for n in ns]
    return x, a, b, scaling, ids, ys


def forced_launcher(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, m: int,
                    ns: tuple[int, ...], path: str) -> gl.GatedLoraLauncher:
    """The launcher a patched layer uses (GatedLoraLauncher) over these adapters (lora_a
    [L, S·R, K], lora_b [L, ΣN, R], scaling [S, L] fp32), with `path`'s config at M rows
    forced (at M > 64 every path is split's: gl.config_for)."""
    k, r = lora_a.shape[2], lora_a.shape[1] // len(ns)
    cfg = gl.config_for(m, k, ns, r, *gl.device_key(lora_a.device), path=path)
    return gl.GatedLoraLauncher(lora_a, lora_b, scaling, config=cfg)


def path_launcher(shape: Shape, m: int, path: str, device: torch.device, scale: float = 1.0
                  ) -> tuple[gl.GatedLoraLauncher, tuple]:
    """(launcher, operands): `forced_launcher` over one group's operands (`group_inputs`);
    `launcher(ys, x, ids, False)` adds the LoRA term by that path."""
    operands = group_inputs(shape, m, device, scale)
    return forced_launcher(*operands[1:4], m, shape[1], path), operands


def group_runner(path: str, x: torch.Tensor, ws: list[torch.Tensor],
                 biases: list[torch.Tensor | None], lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: torch.Tensor, ids: torch.Tensor,
                 out: list[torch.Tensor] | None = None) -> Callable[[], list[torch.Tensor]]:
    """`run()` returns one group's whole projection, base and LoRA, S × [..., N_s], by `path`:
    "fused_base" (the fused kernel, one launch, into `out` if given, ≤ 64 rows) or
    "linear+<decode path>" (F.linear per slice, then the LoRA term by `forced_launcher`, as
    ops.gated_lora_group runs a fuse_base model's split path). Operands as the kernels take
    them (kernels/gated_lora.py); ids [B] with x [B, T, K] is one id per sequence."""
    if path == FUSED_BASE:
        return lambda: fused_base_lora_triton(x, ws, biases, lora_a, lora_b, scaling, ids,
                                              out=out)
    decode = path.removeprefix(LINEAR)
    if not path.startswith(LINEAR) or decode not in gl.PATHS:
        raise ValueError(f"path: expected {FUSED_BASE!r} or {LINEAR!r} + one of {gl.PATHS}, "
                         f"got {path!r}")
    ns = tuple(w.shape[0] for w in ws)
    launcher = forced_launcher(lora_a, lora_b, scaling, x.numel() // x.shape[-1], ns, decode)
    seq_ids = gl.ids_per_sequence(x, ids)
    pairs = list(zip(ws, biases))

    def run() -> list[torch.Tensor]:
        ys = [F.linear(x, w, b) for w, b in pairs]
        launcher(ys, x, ids, seq_ids)
        return ys

    return run


def projection_runner(shape: Shape, m: int, path: str, device: torch.device,
                      scale: float = 1.0) -> tuple[Callable[[], list[torch.Tensor]], tuple,
                                                   list[torch.Tensor]]:
    """(run, operands, weights): `group_runner(path, ...)` over one group's operands
    (`group_inputs`, fused_base writing into their ys) and weights [N_s, K] in x's dtype, no
    bias."""
    k, ns = shape[0], shape[1]
    operands = group_inputs(shape, m, device, scale)
    x, a, b, scaling, ids, ys = operands
    ws = [torch.randn(n, k, device=device, dtype=x.dtype) / k**0.5 for n in ns]
    run = group_runner(path, x, ws, [None] * len(ns), a, b, scaling, ids, out=ys)
    return run, operands, ws


def graph_times_us(run: Callable[[], object], device: torch.device,
                   replays: int = 3) -> list[float]:
    """µs per call of `run` under a CUDA graph, one value per replay (GRAPH_REPS calls per
    graph), compiled and warmed up on a side stream outside the capture. The one graph timer
    of prism_fast.tune and the benchmarks (bench/timing.py)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPS):
            run()
    graph.replay()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / GRAPH_REPS)
    return times


def graph_time_us(run: Callable[[], object], device: torch.device) -> float:
    """µs per call of `run` under a CUDA graph: the median of 3 replays (`graph_times_us`)."""
    return statistics.median(graph_times_us(run, device))


def graph_timer(device: torch.device) -> Timer:
    """µs per call of one group's launches by one path (the module's docstring) under a CUDA
    graph, every row open; None if the path fails to compile or run. GPU only; written against
    torch 2.11 / Triton 3.6, unrun on a GPU so far."""

    def timer(shape: Shape, m: int, path: str) -> float | None:
        try:
            if path in gl.PATHS:
                launcher, (x, _, _, _, ids, ys) = path_launcher(shape, m, path, device)
                return graph_time_us(lambda: launcher(ys, x, ids, False), device)
            return graph_time_us(projection_runner(shape, m, path, device)[0], device)
        except Exception:   # a config the compiler or the device refuses: not a candidate
            return None

    return timer
