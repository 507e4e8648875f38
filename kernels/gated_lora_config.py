"""Gated multi-LoRA, configs: the path and block sizes of one call, and the one owner of the
decode-path choice.

A call's config is the heuristic below, overridden by the **tuned table** of its GPU. A table
is one JSON object, in one format whoever writes it; every entry is optional:

    "choices":           {"K|N0,N1,…|R|M": path}  the decode path of one projection group
                         (K inputs, slice widths N_s, rank R) at M rows rounded up to a power
                         of two; written by `prism_fast.tune(model)`, timed on the user's GPU;
                         and {"base|K|N0,N1,…|R|M": base path} for models patched with
                         fuse_base=True (written by `tune` for those only)
    "path:<M>":          path                     the decode path of every group at M
    "base:<M>":          base path                the base path of every group at M
    "fused_max_a_elems": int                      decode fuses where K·R is at most this
    "fused:<M>", "shrink:<M>", "expand:<M>", "coop:<M>": {BLOCK_*, num_warps}, merged over
                         the heuristic's block sizes; "split_k:<M>": int
                         (these three written by bench/tune_gated_lora.py)
    "key":               {"gpu", "triton", "groups"}: what the table was measured for; a
                         table for another GPU or Triton version is not used
    "prefill_split_us":  for the record only

with path one of PATHS. The decode path (M ≤ FUSED_MAX_ROWS) is, first match wins: the
`path` argument of `config_for` (tuners and tests), "choices", "path:<M>", the
"fused_max_a_elems" rule, SPLIT. Prefill always splits.

A base path, one of BASE_PATHS, is how a call of a model patched with fuse_base=True (Triton)
computes its whole projection: "fused_base", the base GEMM and the LoRA in one kernel
(fused_base_lora.py), or "split", F.linear per slice then the LoRA launches by the decode path
above. At M ≤ FUSED_MAX_ROWS it is, first match wins: "choices"' "base|…|M", "base:<M>",
"fused_base" (what the opt-in asked for); larger calls split. `pick_base` is the one function
that answers it.

A GPU's table is read once per process and merged from two places: the package's
`configs/<GPU name>.json` (shipped as package data: bench/tune_gated_lora.py writes it) and, on
top, the user cache's `tune-<GPU name>-*.json` (`user_cache_dir()`; prism_fast.tune writes
them). `use_choices` adds a process's own choices on top (prism_fast.tune, once it has timed).
Nothing else decides the path.
"""

from __future__ import annotations

import functools
import json
import os
import typing
from pathlib import Path

import torch
import triton

from ._checks import expect
from .gated_lora_device import STAGE_COOP, STAGE_EXPAND, STAGE_FUSED, STAGE_SHRINK

FUSED_MAX_ROWS = 64   # decode batches (M ≤ 64): the rows where the path is a choice
PATHS = ("split", "fused", "coop")
BASE_PATHS = ("fused_base", "split")   # fuse_base=True models: whole projection, one or two steps
BASE_PREFIX = "base|"                  # a "choices" key of a base path: "base|K|N0,…|R|M"
# The decode path is SPLIT (a shrink launch over every slice of the group, then an expand
# launch), because it is what the only GPU evidence favours (shared/EVIDENCE.md, H200, CUDA
# graphs, bf16, r = 16, Llama-3-8B shapes, M = 1): recomputing the shrink in every N tile, the
# FUSED design, added +9.8 µs to q_proj (1.95×), +8.9 µs to k_proj (2.41×) and +30.3 µs to
# down_proj (1.94×); shrink + expand added +4.3, +3.7 and +6.7 µs. At decode the per-program
# streaming of A and the launch count dominate, not bytes. FUSED and COOP are chosen only by a
# table (above).
FUSED_MAX_A_ELEMS = 0
CONFIG_DIR = Path(__file__).parent / "configs"

_TABLES: dict[str, dict] = {}   # GPU name → its merged table, read at its first call
_ON_CHANGE: list[typing.Callable[[], None]] = []   # caches derived from configs (the launch plans)


def file_stem(device_name: str) -> str:
    return device_name.replace(" ", "_").replace("/", "_")


def config_path(device_name: str) -> Path:
    """The packaged table of a GPU: where bench/tune_gated_lora.py writes by default."""
    return CONFIG_DIR / (file_stem(device_name) + ".json")


def user_cache_dir() -> Path:
    """Where prism_fast.tune writes its tables: $PRISM_FAST_CACHE_DIR,
    $XDG_CACHE_HOME/prism_fast or ~/.cache/prism_fast."""
    env = os.environ.get("PRISM_FAST_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "prism_fast"


def choice_key(k: int, ns: tuple[int, ...], r: int, m_bucket: int) -> str:
    return f"{k}|{','.join(map(str, ns))}|{r}|{m_bucket}"


def base_choice_key(k: int, ns: tuple[int, ...], r: int, m_bucket: int) -> str:
    return BASE_PREFIX + choice_key(k, ns, r, m_bucket)


def bad_choice(key: object, path: object) -> str | None:
    """Why one "choices" entry is malformed, or None where it is a valid one."""
    base = isinstance(key, str) and key.startswith(BASE_PREFIX)
    parts = key.removeprefix(BASE_PREFIX).split("|") if isinstance(key, str) else []
    paths = BASE_PATHS if base else PATHS
    if not (len(parts) == 4 and all(p.isdigit() for p in (parts[0], parts[2], parts[3]))
            and all(n.isdigit() for n in parts[1].split(","))) or path not in paths:
        return (f"bad choice {key!r}: {path!r} (expected \"K|N0,N1,…|R|M\": one of "
                f"{', '.join(PATHS)}; or \"base|K|N0,N1,…|R|M\": one of "
                f"{', '.join(BASE_PATHS)})")
    return None


def _read_table(path: Path, device_name: str) -> dict:
    """One table file, or {} where it is missing, malformed or measured elsewhere (silently:
    prism_fast.tune, which reads its own files first, warns about those)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(table, dict):
        return {}
    key = table.get("key")
    if key is not None and (not isinstance(key, dict) or key.get("gpu") != device_name
                            or key.get("triton") != triton.__version__):
        return {}
    choices = table.get("choices", {})
    if not isinstance(choices, dict) or any(bad_choice(k, v) for k, v in choices.items()):
        return {}
    if any(k.startswith("base:") and v not in BASE_PATHS for k, v in table.items()):
        return {}
    return table


def tuned_table(device_name: str) -> dict:
    """The merged table of a GPU (see the module's docstring); read once per process."""
    table = _TABLES.get(device_name)
    if table is None:
        table = _read_table(config_path(device_name), device_name)
        choices = dict(table.get("choices", {}))
        try:
            users = sorted(user_cache_dir().glob(f"tune-{file_stem(device_name)}-*.json"),
                           key=lambda p: p.stat().st_mtime)   # the newest wins
        except OSError:
            users = []
        for path in users:
            user = _read_table(path, device_name)
            choices.update(user.get("choices", {}))
            table = {**table, **user}
        table = _TABLES[device_name] = {**table, "choices": choices}
    return table


def use_choices(device_name: str, choices: dict[str, str | None]) -> None:
    """Add decode-path choices ({"K|N0,…|R|M": path, "base|K|N0,…|R|M": base path}, None = the
    default again) to the table of a GPU for this process (prism_fast.tune's, once timed or
    read from its cache)."""
    for key, path in choices.items():
        paths = BASE_PATHS if isinstance(key, str) and key.startswith(BASE_PREFIX) else PATHS
        expect(path is None or path in paths, ValueError,
               lambda p=path, ps=paths: f"path: expected one of {ps} or None, got {p!r}")
        expect(bad_choice(key, "split") is None, ValueError,   # (split: in both sets)
               lambda key=key: f"choices: expected keys \"K|N0,N1,…|R|M\" or "
                               f"\"base|K|N0,N1,…|R|M\", got {key!r}")
    table = tuned_table(device_name)
    for key, path in choices.items():
        if path is None:
            table["choices"].pop(key, None)
        else:
            table["choices"][key] = path
    changed()


def reload() -> None:
    """Read every table again at its next use (and drop what was derived from them)."""
    _TABLES.clear()
    changed()


def changed() -> None:
    pick_config.cache_clear()
    pick_base.cache_clear()
    for drop in _ON_CHANGE:
        drop()


def on_change(drop: typing.Callable[[], None]) -> None:
    """Call `drop` whenever a table changes: for caches of what configs decide."""
    _ON_CHANGE.append(drop)


@functools.lru_cache(maxsize=16)
def device_key(device: torch.device) -> tuple[str, int]:
    """(name, multiprocessors) of a device: what its tuned table and heuristics go by."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, props.multi_processor_count
    return "cpu", 4


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, k: int, ns: tuple[int, ...], r: int, device: torch.device) -> dict:
    """Path and block sizes for one call: {"stages": [...], stage: {BLOCK_*, num_warps}, "SPLIT_K"}.

    m rows, k inputs, ns the width of each slice, r the rank. Cached: no work on the hot path.
    See `config_for`.
    """
    return config_for(m, k, ns, r, *device_key(device))


def decode_path(m: int, k: int, ns: tuple[int, ...], r: int, table: dict,
                path: str | None = None) -> str:
    """The path of one call: the one place that decides it (order: the module's docstring)."""
    if m > FUSED_MAX_ROWS:
        return "split"
    if path is not None:
        return path
    m_key = triton.next_power_of_2(max(m, 1))
    chosen = table.get("choices", {}).get(choice_key(k, ns, r, m_key))
    if chosen is not None:
        return chosen
    fused = k * r <= table.get("fused_max_a_elems", FUSED_MAX_A_ELEMS)
    return table.get(f"path:{m_key}", "fused" if fused else "split")


@functools.lru_cache(maxsize=4096)
def pick_base(m: int, k: int, ns: tuple[int, ...], r: int, device: torch.device) -> str:
    """The base path of one call of a fuse_base=True model (module docstring): "fused_base" or
    "split". Cached: a dictionary look-up on the hot path, no timing, no sync."""
    return base_path(m, k, ns, r, tuned_table(device_key(device)[0]))


def base_path(m: int, k: int, ns: tuple[int, ...], r: int, table: dict) -> str:
    """`pick_base` for a given table."""
    if m > FUSED_MAX_ROWS:
        return "split"
    m_key = triton.next_power_of_2(max(m, 1))
    chosen = table.get("choices", {}).get(base_choice_key(k, ns, r, m_key))
    return chosen if chosen is not None else table.get(f"base:{m_key}", "fused_base")


def config_for(m: int, k: int, ns: tuple[int, ...], r: int, device_name: str, sms: int,
               table: dict | None = None, path: str | None = None) -> dict:
    """`pick_config` for a named GPU with `sms` multiprocessors (prism_fast.testing.kernel_resources
    compiles these for a GPU that is not here). `table` replaces the GPU's tuned table; `path`
    forces the path of a decode call (M ≤ 64). COOP falls back to SPLIT where its grid would
    exceed one program per SM (its barrier needs every program resident)."""
    table = tuned_table(device_name) if table is None else table
    m_key = triton.next_power_of_2(max(m, 1))
    sr, n_max = len(ns) * r, max(ns)
    path = decode_path(m, k, ns, r, table, path)
    # Block sizes and warps keep every variant the sweep's shapes use free of register spills
    # on sm_90 under Triton 3.6 and 3.9 (prism_fast.testing.kernel_resources, checked in
    # CI): 64-row tiles with 4 warps spill up to 2.4 KB per thread, and a K tile of 128 in
    # the fused decode kernel takes 233 registers (3.6) against 128 for a K tile of 64.
    if path == "fused":
        br = max(16, triton.next_power_of_2(r))   # one slice's R columns of u per program
        # Every program streams its A slice, whatever its N tile: wider tiles where 64 would
        # take more than one wave (Llama-3-8B gate/up: 448 programs at 64, 224 at 128).
        bn = 128 if br == 16 and sum(triton.cdiv(n, 64) for n in ns) > sms else 64
        cfg = {STAGE_FUSED: dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=64, BLOCK_R=br,
                                 num_warps=4 if br <= 32 else 8)}
        cfg[STAGE_FUSED].update(table.get(f"fused:{m_key}", {}))
        cfg[STAGE_FUSED]["BLOCK_R"] = max(cfg[STAGE_FUSED]["BLOCK_R"], br)   # must cover R
        return {"stages": [STAGE_FUSED], "SPLIT_K": 1, **cfg}
    if path == "coop":
        # No GPU evidence yet for the cooperative kernel (grid barrier): no run in bench/results/
        # or shared/EVIDENCE.md; a table or prism_fast.tune's timing must choose it.
        coop = _coop_config(m, k, ns, r, sms)
        if coop is not None:
            coop[STAGE_COOP].update(table.get(f"coop:{m_key}", {}))
            return coop
    bm = 64 if m >= 256 else 16
    warps = 8 if bm == 64 else 4
    shrink = dict(BLOCK_M=bm, BLOCK_N=16, BLOCK_K=64,
                  BLOCK_R=max(16, min(64, triton.next_power_of_2(sr))), num_warps=warps)
    shrink.update(table.get(f"shrink:{m_key}", {}))
    # Split K until the shrink grid fills the GPU twice over, keeping ≥ 256 of K per split.
    tiles = triton.cdiv(m, shrink["BLOCK_M"]) * triton.cdiv(sr, shrink["BLOCK_R"])
    split = 1
    while tiles * split < 2 * sms and k // (split * 2) >= 256 and split < 16:
        split *= 2
    split = table.get(f"split_k:{m_key}", split)
    # The expand reads u back in chunks of ≤ 32 columns (a rank-64 slice takes two).
    expand = dict(BLOCK_M=bm, BLOCK_N=64 if n_max >= 64 else 32, BLOCK_K=16,
                  BLOCK_R=max(16, min(32, triton.next_power_of_2(r))), num_warps=warps)
    expand.update(table.get(f"expand:{m_key}", {}))
    return {"stages": [STAGE_SHRINK, STAGE_EXPAND], "SPLIT_K": split,
            STAGE_SHRINK: shrink, STAGE_EXPAND: expand}


def _coop_config(m: int, k: int, ns: tuple[int, ...], r: int, sms: int) -> dict | None:
    """COOP blocks: the expand's (slice, N tile) grid, N tiles widened until the whole grid fits
    one program per SM; its programs first share the shrink's (column tile, K split) units.
    None where even 256-wide tiles do not fit."""
    bm = 16
    grid_m = -(-m // bm)
    for bn in (64, 128, 256):
        grid_n = sum(-(-n // bn) for n in ns)
        if grid_m * grid_n <= sms:
            break
    else:
        return None
    br = max(16, min(32, triton.next_power_of_2(r)))
    cols = -(-len(ns) * r // br)
    # As many K splits as the grid has programs for, ≥ 256 of K each, at most 16: the expand
    # sums the partials in an unrolled loop, and 32 of them spilled 20 B on sm_90 (down, M = 1).
    split = 1
    while cols * split * 2 <= grid_n and k // (split * 2) >= 256 and split < 16:
        split *= 2
    # 256-wide N tiles take 8 warps: with 4, R = 32 spilled 416-420 B on sm_90 under Triton 3.6
    # (255 registers; none spill at 8, ≤ 254). One program per SM, so 8 warps cost no residency.
    return {"stages": [STAGE_COOP], "SPLIT_K": split,
            STAGE_COOP: dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, BLOCK_R=br,
                             num_warps=8 if bn == 256 else 4)}
