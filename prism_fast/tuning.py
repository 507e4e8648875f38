"""Self-selection of the decode path on the user's GPU: `prism_fast.tune(model)` (this module).

    model = prism_fast.patch_model(model, adapter)
    prism_fast.tune(model)          # ≤ 2 s the first time on a GPU, then read from the cache

For each projection group of the patched model (Llama: q/k/v, o, gate/up, down) and each decode
size M ∈ {1, 8, 32, 64}, times the candidate paths of kernels/gated_lora.py, SPLIT (the
default), FUSED and COOP (experimental), under CUDA graphs (what a graphed decode pays), plus the
split path at one prefill size for the record, and keeps a path other than SPLIT only where it
measured more than 3 % faster. For a model patched with fuse_base=True it also times, per group
and M, the whole projection both ways, the fused base + LoRA kernel against F.linear for every
slice plus the LoRA by the path just chosen, and keeps the fused kernel only where it measured
more than 3 % faster than that (the same rule). The choices are a tuned table of the GPU
(kernels/gated_lora_config.py, its one format: "key" names the GPU, the group shapes, ranks,
dtypes, the Triton version and fuse_base; "choices" the paths), written to a user cache
directory, `$PRISM_FAST_CACHE_DIR`, else `$XDG_CACHE_HOME/prism_fast`, else
`~/.cache/prism_fast`. The kernels' config reads the tables there for its GPU (the one place
that decides the path), and the next `tune` of the same model reuses its file without timing
anything. Nothing is timed on the hot path (only here, when called), and nothing at all on a
CPU (Triton's interpreter says nothing about a GPU's speed). Explicit rather than inside
`patch_model`: it costs seconds of compilation the first time, which the caller decides to
spend. What is timed, and how: tuning_timers.py, whose launchers the benchmarks that time the
same paths use too (bench/tune_gated_lora.py, bench/bench_gated_lora.py), with its graph
timer (`graph_time_us`, the median of `graph_times_us`) for graphed times.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from prism_fast.kernels import gated_lora as gl
from prism_fast.kernels import gated_lora_config as configs
from prism_fast.tuning_timers import (  # noqa: F401  (re-exported: the benchmarks' names)
    FUSED_BASE,
    GRAPH_REPS,
    LINEAR,
    Shape,
    Timer,
    graph_time_us,
    graph_timer,
    group_inputs,
    path_launcher,
    projection_runner,
)

DECODE_MS = (1, 8, 32, 64)
PREFILL_M = 512
BUDGET_S = 2.0
MIN_GAIN = 0.03      # a path other than split must beat it by more than this


def cache_dir() -> Path:
    """Where tuned tables live: $PRISM_FAST_CACHE_DIR, $XDG_CACHE_HOME/prism_fast or
    ~/.cache/prism_fast (where the kernels' config reads them)."""
    return configs.user_cache_dir()


def group_shapes(model) -> list[Shape]:
    """The distinct projection-group shapes of a patched model, in first-seen order."""
    return list(_groups(model))


def fuses_base(model) -> bool:
    """Whether the patched model runs the fused base + LoRA kernel (patch_model(...,
    fuse_base=True) on the Triton backend: `Group.fuse_kernel`)."""
    return any(group.fuse_kernel for group in _groups(model).values())


def _groups(model) -> dict:
    """{shape: its first group} of a patched model's projection groups (module order)."""
    from prism_fast.layer import GatedLoraLinear

    seen: dict = {}
    for module in model.modules():
        if isinstance(module, GatedLoraLinear) and module.slot == 0:
            group = module.group
            # The sizes the kernels see: this rank's shard under tensor parallelism.
            sizes = tuple(b - a for a, b in zip(group.offsets, group.offsets[1:]))
            shape = (group.lora_a.shape[2], sizes,
                     group.rank, str(group.lora_a.dtype).removeprefix("torch."),
                     str(module.weight.dtype).removeprefix("torch."))
            seen.setdefault(shape, group)
    if not seen:
        raise ValueError("model: expected a model patched by prism_fast.patch_model, found no "
                         "patched projection")
    return seen


def cache_key(device_name: str, shapes: list[Shape], fuse_base: bool = False) -> dict:
    """What a table was measured for; "fuse_base" only where the base paths were timed too."""
    import triton

    key = {"gpu": device_name, "triton": triton.__version__,
           "groups": [[k, list(ns), r, adt, xdt] for k, ns, r, adt, xdt in shapes]}
    return {**key, "fuse_base": True} if fuse_base else key


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
    """Make the kernels use these choices ({"K|N0,N1|R|M": path, "base|K|N0,N1|R|M": base
    path}) on `device` in this process (the table in the user cache serves the next ones)."""
    configs.use_choices(configs.device_key(device)[0], choices)


def choice_key(shape: Shape, m: int) -> str:
    return configs.choice_key(shape[0], shape[1], shape[2], m)


def base_choice_key(shape: Shape, m: int) -> str:
    return configs.base_choice_key(shape[0], shape[1], shape[2], m)


def tune(model, *, budget_s: float = BUDGET_S, directory: Path | None = None,
         timer: Timer | None = None, device_name: str | None = None, sms: int | None = None,
         progress: bool = True) -> dict[str, str]:
    """Choose the decode path of each projection group of a patched model on this GPU, and for
    a fuse_base=True model its base path too (see the module's docstring); returns the choices
    {"K|N_s,…|R|M": path, "base|K|N_s,…|R|M": "fused_base" | "split"} now in use.

    On a CPU, with no `timer`, returns {} at once with a warning: nothing is timed there.
    `timer(shape, m, path)` (µs or None for a failure; paths: tuning_timers.py) replaces the
    CUDA-graph timing, and `device_name` / `sms` the GPU's, for tests. Choices are read from
    the cache file when one exists for this GPU, these shapes, fuse_base and this Triton
    version; a run cut short by `budget_s` stores nothing, so that the next run times
    everything again (Triton's own disk cache makes its compiles quick then).
    """
    shapes = group_shapes(model)
    fuse = fuses_base(model)
    directory = None if directory is None else Path(directory)
    device = next(model.parameters()).device
    if timer is None:
        if device.type != "cuda":
            warnings.warn(f"prism_fast.tune: the model is on {device.type}, not a CUDA GPU: "
                          f"nothing timed, the default paths kept (returns {{}})", stacklevel=2)
            return {}
        props = torch.cuda.get_device_properties(device)
        device_name, sms = props.name, props.multi_processor_count
        timer = graph_timer(device)
    if device_name is None or sms is None:
        raise ValueError("device_name / sms: expected both with an injected timer, got "
                         f"{device_name!r}, {sms!r}")
    key = cache_key(device_name, shapes, fuse)
    path = cache_file(key, directory)
    stored = _read(path, key)
    if stored is not None:
        apply(stored, device)
        return stored
    work = [(shape, m, candidates(shape, m, device_name, sms))
            for shape in shapes for m in DECODE_MS]
    total = sum(len(paths) + 2 * fuse for _, _, paths in work) + len(shapes)
    clock = _Progress(total, budget_s, progress)
    choices, prefill = _time_all(work, fuse, shapes, timer, clock)
    clock.finish(path)
    apply(choices, device)
    if not clock.cut:
        try:
            _write(path, key, choices, prefill)
        except OSError as e:   # the choices are in use all the same; only the next run re-times
            warnings.warn(f"prism_fast.tune: could not write the cache file {path} ({e}); the "
                          f"choices are in use for this process only", stacklevel=2)
    return choices


class _Progress:
    """Counts timings against the budget, on one progress line (stderr) if `show`."""

    def __init__(self, total: int, budget_s: float, show: bool):
        self.total, self.budget_s, self.show = total, budget_s, show
        self.start, self.done, self.cut = time.monotonic(), 0, False

    def tick(self) -> bool:
        """One timing done; True (and from then on `cut`) once the budget is spent."""
        self.done += 1
        elapsed = time.monotonic() - self.start
        if self.show:
            print(f"\rprism_fast.tune: {self.done}/{self.total} timings, {elapsed:.1f} s", end="",
                  file=sys.stderr, flush=True)
        self.cut = self.cut or elapsed > self.budget_s
        return self.cut

    def finish(self, path: Path) -> None:
        if self.show:
            print(f"\rprism_fast.tune: {self.done}/{self.total} timings in "
                  f"{time.monotonic() - self.start:.1f} s"
                  + (" (budget spent: defaults kept for the rest, nothing cached)" if self.cut
                     else f"; cached in {path}"), file=sys.stderr, flush=True)


def _time_all(work: list, fuse: bool, shapes: list[Shape], timer: Timer,
              clock: _Progress) -> tuple[dict[str, str], dict[str, float | None]]:
    """(choices, prefill split µs): `work`'s (shape, M, candidate paths) timed in order, then
    the prefill size; stops where `clock` says the budget is spent (the entry being timed
    then chooses nothing)."""
    choices: dict[str, str] = {}
    for shape, m, paths in work:
        times: dict[str, float | None] = {}
        for p in paths:
            times[p] = timer(shape, m, p)
            if clock.tick():
                return choices, {}
        chosen = select(times)
        if fuse:   # the whole projection: F.linear + the LoRA by `chosen`, or one kernel
            whole = {"split": timer(shape, m, LINEAR + chosen)}
            if clock.tick():
                return choices, {}
            whole[FUSED_BASE] = timer(shape, m, FUSED_BASE)
            if clock.tick():
                return choices, {}
            choices[base_choice_key(shape, m)] = select(whole)
        choices[choice_key(shape, m)] = chosen
    prefill: dict[str, float | None] = {}
    for shape in shapes:   # the prefill size, once: split is its only path
        prefill[choice_key(shape, PREFILL_M)] = timer(shape, PREFILL_M, "split")
        if clock.tick():
            break
    return choices, prefill


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
