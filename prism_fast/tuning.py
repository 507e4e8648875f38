"""Self-selection of the decode path on the user's GPU: `prism_fast.tune(model)` (this module).

    model = prism_fast.patch_model(model, adapter)
    prism_fast.tune(model)          # ≤ 2 s the first time on a GPU, then read from the cache

For each projection group of the patched model (Llama: q/k/v, o, gate/up, down) and each decode
size M ∈ {1, 8, 32, 64}, times the candidate paths of kernels/gated_lora.py, SPLIT (the
default), FUSED and COOP (experimental), under CUDA graphs (what a graphed decode pays), plus the
split path at one prefill size for the record, and keeps a path other than SPLIT only where it
measured more than 3 % faster. The choices are a tuned table of the GPU
(kernels/gated_lora_config.py, its one format: "key" names the GPU, the group shapes, ranks,
dtypes and the Triton version; "choices" the paths), written to a user cache directory,
`$PRISM_FAST_CACHE_DIR`, else `$XDG_CACHE_HOME/prism_fast`, else `~/.cache/prism_fast`. The
kernels' config reads the tables there for its GPU (the one place that decides the path), and
the next `tune` of the same model reuses its file without timing anything. Nothing is timed
on the hot path (only here, when called), and nothing at all on a CPU (Triton's interpreter
says nothing about a GPU's speed). Explicit rather than inside `patch_model`: it costs seconds
of compilation the first time, which the caller decides to spend. The benchmarks that time the
paths (bench/tune_gated_lora.py, bench/gpu_decode_paths.py) launch them with this module's
`path_launcher` / `group_inputs` and `candidates`, and time graphs with its `graph_time_us`.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from prism_fast.kernels import gated_lora as gl
from prism_fast.kernels import gated_lora_config as configs

DECODE_MS = (1, 8, 32, 64)
PREFILL_M = 512
BUDGET_S = 2.0
MIN_GAIN = 0.03      # a path other than split must beat it by more than this
GRAPH_REPS = 20      # launches per captured graph: one replay times 20 calls

# (K, (N_s, …), R, adapter dtype name, x dtype name): one projection group's shapes
Shape = tuple[int, tuple[int, ...], int, str, str]
Timer = Callable[[Shape, int, str], "float | None"]


def cache_dir() -> Path:
    """Where tuned tables live: $PRISM_FAST_CACHE_DIR, $XDG_CACHE_HOME/prism_fast or
    ~/.cache/prism_fast (where the kernels' config reads them)."""
    return configs.user_cache_dir()


def group_shapes(model) -> list[Shape]:
    """The distinct projection-group shapes of a patched model, in first-seen order."""
    from prism_fast.layer import GatedLoraLinear

    seen: dict[Shape, None] = {}
    for module in model.modules():
        if isinstance(module, GatedLoraLinear) and module.slot == 0:
            group = module.group
            # The sizes the kernels see: this rank's shard under tensor parallelism.
            sizes = tuple(b - a for a, b in zip(group.offsets, group.offsets[1:]))
            shape = (group.lora_a.shape[2], sizes,
                     group.rank, str(group.lora_a.dtype).removeprefix("torch."),
                     str(module.weight.dtype).removeprefix("torch."))
            seen.setdefault(shape, None)
    if not seen:
        raise ValueError("model: expected a model patched by prism_fast.patch_model, found no "
                         "patched projection")
    return list(seen)


def cache_key(device_name: str, shapes: list[Shape]) -> dict:
    import triton

    return {"gpu": device_name, "triton": triton.__version__,
            "groups": [[k, list(ns), r, adt, xdt] for k, ns, r, adt, xdt in shapes]}


def cache_file(key: dict, directory: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (directory or cache_dir()) / f"tune-{configs.file_stem(key['gpu'])}-{digest}.json"


def candidates(shape: Shape, m: int, device_name: str, sms: int) -> list[str]:
    """The paths worth timing for one group at one M: those whose config differs (COOP falls
    back to SPLIT where its grid cannot be co-resident; prefill has only SPLIT)."""
    k, ns, r = shape[0], shape[1], shape[2]
    out, configs = [], []
    for path in gl.PATHS:
        cfg = gl.config_for(m, k, ns, r, device_name, sms, path=path)
        if cfg not in configs:
            out.append(path)
            configs.append(cfg)
    return out


def select(times: dict[str, float | None]) -> str:
    """SPLIT unless another path measured more than MIN_GAIN faster (failures never win)."""
    split = times.get("split")
    best, best_t = "split", split
    for path, t in times.items():
        if t is not None and (best_t is None or t < best_t):
            best, best_t = path, t
    if best != "split" and split is not None and best_t >= (1 - MIN_GAIN) * split:
        return "split"
    return best


def apply(choices: dict[str, str], device: torch.device) -> None:
    """Make the kernels use these choices ({"K|N0,N1|R|M": path}) on `device` in this process
    (the table in the user cache serves the next ones)."""
    configs.use_choices(configs.device_key(device)[0], choices)


def choice_key(shape: Shape, m: int) -> str:
    return configs.choice_key(shape[0], shape[1], shape[2], m)


def tune(model, *, budget_s: float = BUDGET_S, directory: Path | None = None,
         timer: Timer | None = None, device_name: str | None = None, sms: int | None = None,
         progress: bool = True) -> dict[str, str]:
    """Choose the decode path of each projection group of a patched model on this GPU (see the
    module's docstring); returns the choices {"K|N_s,…|R|M": path} now in use.

    On a CPU, with no `timer`, returns {} at once with a warning: nothing is timed there.
    `timer(shape, m, path)` (µs or None for a failure) replaces the CUDA-graph timing, and
    `device_name` / `sms` the GPU's, for tests. Choices are read from the cache file when one
    exists for this GPU, these shapes and this Triton version; a run cut short by `budget_s`
    stores nothing, so that the next run times everything again (Triton's own disk cache makes
    its compiles quick then).
    """
    shapes = group_shapes(model)
    directory = None if directory is None else Path(directory)
    device = next(model.parameters()).device
    if timer is None:
        if device.type != "cuda":
            warnings.warn(f"prism_fast.tune: the model is on {device.type}, not a CUDA GPU: "
                          f"nothing timed, the default paths kept (returns {{}})", stacklevel=2)
            return {}
        props = torch.cuda.get_device_properties(device)
        device_name, sms = props.name, props.multi_processor_count
        timer = _graph_timer(device)
    if device_name is None or sms is None:
        raise ValueError("device_name / sms: expected both with an injected timer, got "
                         f"{device_name!r}, {sms!r}")
    key = cache_key(device_name, shapes)
    path = cache_file(key, directory)
    stored = _read(path, key)
    if stored is not None:
        apply(stored, device)
        return stored
    work = [(shape, m, candidates(shape, m, device_name, sms))
            for shape in shapes for m in DECODE_MS]
    total = sum(len(paths) for _, _, paths in work) + len(shapes)
    start, done, cut = time.monotonic(), 0, False
    choices: dict[str, str] = {}
    prefill: dict[str, float | None] = {}

    def tick() -> bool:
        nonlocal done
        done += 1
        elapsed = time.monotonic() - start
        if progress:
            print(f"\rprism_fast.tune: {done}/{total} timings, {elapsed:.1f} s", end="",
                  file=sys.stderr, flush=True)
        return elapsed > budget_s

    for shape, m, paths in work:
        times: dict[str, float | None] = {}
        for p in paths:
            times[p] = timer(shape, m, p)
            cut = tick() or cut
            if cut:
                break
        if cut:
            break
        choices[choice_key(shape, m)] = select(times)
    if not cut:
        for shape in shapes:   # the prefill size, once: split is its only path
            prefill[choice_key(shape, PREFILL_M)] = timer(shape, PREFILL_M, "split")
            if tick():
                cut = True
                break
    if progress:
        print(f"\rprism_fast.tune: {done}/{total} timings in {time.monotonic() - start:.1f} s"
              + (" (budget spent: defaults kept for the rest, nothing cached)" if cut else
                 f"; cached in {path}"), file=sys.stderr, flush=True)
    apply(choices, device)
    if not cut:
        try:
            _write(path, key, choices, prefill)
        except OSError as e:   # the choices are in use all the same; only the next run re-times
            warnings.warn(f"prism_fast.tune: could not write the cache file {path} ({e}); the "
                          f"choices are in use for this process only", stacklevel=2)
    return choices


def _read(path: Path, key: dict) -> dict[str, str] | None:
    """The stored choices for exactly this key, or None: missing or another key (silently),
    unreadable or malformed (with a warning naming the file; it is timed anew and rewritten)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return _ignore(path, f"unreadable ({e})")
    if not isinstance(data, dict):
        return _ignore(path, f"expected a JSON object, got {type(data).__name__}")
    if data.get("key") != key:
        return None
    choices = data.get("choices")
    if not isinstance(choices, dict):
        return _ignore(path, "no 'choices' object")
    for k, v in choices.items():
        bad = configs.bad_choice(k, v)
        if bad:
            return _ignore(path, bad)
    return choices


def _ignore(path: Path, why: str) -> None:
    warnings.warn(f"prism_fast.tune: ignoring the cache file {path}: {why}; timing anew",
                  stacklevel=3)
    return None


def _write(path: Path, key: dict, choices: dict[str, str], prefill: dict) -> None:
    """The tuned table, written atomically (a concurrent reader sees the old file or the new
    one, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "choices": choices, "prefill_split_us": prefill},
                              indent=1) + "\n")
    os.replace(tmp, path)


def group_inputs(shape: Shape, m: int, device: torch.device, scale: float = 1.0) -> tuple:
    """One group's LoRA operands at M rows, every row open: (x [M, K], lora_a [1, S·R, K],
    lora_b [1, ΣN, R], scaling [S, 1], ids [M], ys S × [M, N_s] zeros). What prism_fast.tune
    and the benchmarks that time paths (bench/tune_gated_lora.py, bench/gpu_decode_paths.py)
    launch."""
    k, ns, r, adt, xdt = shape
    a_dtype, x_dtype = getattr(torch, adt), getattr(torch, xdt)
    x = torch.randn(m, k, device=device, dtype=x_dtype)
    a = torch.randn(1, len(ns) * r, k, device=device, dtype=a_dtype) / k**0.5
    b = torch.randn(1, sum(ns), r, device=device, dtype=a_dtype) * 0.01
    scaling = torch.full((len(ns), 1), scale, device=device)
    ids = torch.zeros(m, dtype=torch.int32, device=device)
    ys = [torch.zeros(m, n, device=device, dtype=x_dtype) for n in ns]
    return x, a, b, scaling, ids, ys


def path_launcher(shape: Shape, m: int, path: str, device: torch.device, scale: float = 1.0
                  ) -> tuple[gl.GatedLoraLauncher, tuple]:
    """(launcher, operands): the launcher a patched layer uses (GatedLoraLauncher) over one
    group's operands (`group_inputs`), with `path`'s config forced; `launcher(ys, x, ids,
    False)` adds the LoRA term by that path."""
    props = torch.cuda.get_device_properties(device)
    k, ns, r = shape[0], shape[1], shape[2]
    cfg = gl.config_for(m, k, ns, r, props.name, props.multi_processor_count, path=path)
    operands = group_inputs(shape, m, device, scale)
    return gl.GatedLoraLauncher(operands[1], operands[2], operands[3], config=cfg), operands


def graph_time_us(run: Callable[[], None], device: torch.device) -> float:
    """µs per call of `run` under a CUDA graph (GRAPH_REPS calls per graph, median of 3
    replays), compiled and warmed up on a side stream outside the capture."""
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
    for _ in range(3):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / GRAPH_REPS)
    return statistics.median(times)


def _graph_timer(device: torch.device) -> Timer:
    """µs per call of one group's LoRA launches by one path under a CUDA graph, every row open;
    None if the path fails to compile or run. GPU only; written against torch 2.11 / Triton
    3.6, unrun on a GPU so far."""

    def timer(shape: Shape, m: int, path: str) -> float | None:
        try:
            launcher, (x, _, _, _, ids, ys) = path_launcher(shape, m, path, device)
            return graph_time_us(lambda: launcher(ys, x, ids, False), device)
        except Exception:   # a config the compiler or the device refuses: not a candidate
            return None

    return timer
