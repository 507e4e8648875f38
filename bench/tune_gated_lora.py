"""Tune the block sizes of kernels/gated_lora.py's stages on this GPU.

    python -m bench.tune_gated_lora [--out FILE] [--time-budget S]

Writes the per-GPU table that `pick_config` reads (kernels/configs/<device name>.json; format
and reader: kernels/gated_lora_config.py): "fused_max_a_elems" (the K·R up to which decode calls
take the fused path), then per "<entry>:<next power of 2 of M>" the block sizes of the "fused",
"shrink" and "expand" stages and "split_k". One entry serves every shape, so a candidate is
scored by its summed time over one Llama-3-8B layer's calls (r = 16, L = 1, bf16, every row
open) that take the stage, checked against the reference, timed as prism_fast.tune times paths
(prism_fast.tuning's group_inputs and CUDA-graph timer), and kept only where it beats the
current choice by more than prism_fast.tuning.MIN_GAIN. Entries of an existing table are kept
unless beaten; the user cache's tables from prism_fast.tune take precedence over this one.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from bench import report
from prism_fast import tuning

SHAPES = [(4096, [4096, 1024, 1024]), (4096, [4096]), (4096, [14336, 14336]), (14336, [4096])]
RANK = 16
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
MIN_GAIN = tuning.MIN_GAIN   # the same rule as prism_fast.tune's
STAGE_OF = {"fused": 0, "shrink": 1, "split_k": 1, "expand": 2}  # entry → the stage it tunes


def candidates(entry: str, m: int) -> list:
    bms = [bm for bm in (16, 32, 64, 128) if bm <= max(16, m)]
    if entry == "fused":
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
                for bm, bn, bk, w in itertools.product([bm for bm in (16, 64) if bm in bms],
                                                       [64, 128], [64, 128], [4, 8])]
    if entry == "shrink":   # 64-row tiles with 4 warps spill on sm_90 (bench/kernel_resources)
        return [dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=8 if bm >= 64 else 4)
                for bm, bk, br in itertools.product(bms, [64, 128], [16, 32, 64])]
    if entry == "split_k":
        return [1, 2, 4, 8, 16]
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=w)
            for bm, bn, br, w in itertools.product(bms, [32, 64, 128], [16, 32], [4, 8])]


def with_entry(config: dict, entry: str, value) -> dict:
    """pick_config's config with one table entry applied, as pick_config would apply it."""
    out = copy.deepcopy(config)
    if entry == "split_k":
        out["SPLIT_K"] = value
    else:
        out[STAGE_OF[entry]].update(value)
    return out


FUSED_LIMITS = [0, 16 * 1024, 32 * 1024, 64 * 1024, 128 * 1024, 256 * 1024]  # K·R candidates


class Problem:
    """One op call of the layer: inputs, outputs written in place, and the reference LoRA term."""

    def __init__(self, m: int, k: int, ns: list[int], table: dict):
        from prism_fast import reference

        dev, dt = torch.device("cuda"), torch.bfloat16
        self.m, self.k, self.ns = m, k, tuple(ns)
        s = len(ns)
        # x [M, K], a [1, S·R, K], b [1, ΣN, R], scaling [S, 1], ids [M] all open, ys zeros
        self.x, self.a, self.b, self.scaling, self.ids, self.ys = tuning.group_inputs(
            (k, self.ns, RANK, "bfloat16", "bfloat16"), m, dev, scale=2.0)
        offsets = [sum(ns[:i]) for i in range(s)]
        # With W = 0 the reference output is the LoRA term alone.
        self.ref = [reference.gated_lora_linear(
            self.x, torch.zeros(n, k, device=dev, dtype=dt), None,
            self.a[:, i * RANK:(i + 1) * RANK], self.b[:, o:o + n], self.scaling[i], self.ids)
            for i, (o, n) in enumerate(zip(offsets, ns))]
        # The current choice (heuristic, or the table tuned so far) for this shape.
        self.config = self.config_for(table)

    def config_for(self, table: dict) -> dict:
        from prism_fast.kernels import gated_lora as gl

        props = torch.cuda.get_device_properties(self.x.device)
        return gl.config_for(self.m, self.k, self.ns, RANK, props.name,
                             props.multi_processor_count, table=table)

    def time_us(self, config: dict) -> float | None:
        """CUDA-graph median of one call (prism_fast.tune's timer), through the launcher a
        patched layer uses with `config` forced; None if the result is wrong or will not
        compile."""
        from prism_fast.kernels.gated_lora import GatedLoraLauncher

        launcher = GatedLoraLauncher(self.a, self.b, self.scaling, config=config)

        def run() -> None:
            launcher(self.ys, self.x, self.ids, False)

        try:
            for y in self.ys:
                y.zero_()
            run()
            for y, r in zip(self.ys, self.ref):
                if not torch.linalg.norm((y - r).float()) <= 1e-2 * torch.linalg.norm(r.float()):
                    return None
            return tuning.graph_time_us(run, self.x.device)
        except Exception:  # a config the compiler refuses (shared memory, registers): no candidate
            return None


def summed(times: list[float | None]) -> float | None:
    """Total µs over a set of calls; None if any of them failed."""
    return None if any(t is None for t in times) else sum(times)


def search(values: list, total, deadline: float):
    """(best value or None, current total, best total): `total(None)` times the current
    choice, `total(v)` a candidate; the best is kept only if it beats the current choice by
    more than MIN_GAIN. Stops trying candidates at the deadline, keeping the best so far."""
    current = total(None)
    best, best_t = None, current
    for value in values:
        if time.monotonic() > deadline:
            break
        t = total(value)
        if t is not None and (best_t is None or t < best_t):
            best, best_t = value, t
    if best is None or current is None or best_t >= (1 - MIN_GAIN) * current:
        best = None
    return best, current, best_t


def tune_fused_limit(problems: list, table: dict, deadline: float) -> bool:
    """Set table["fused_max_a_elems"] to the K·R limit whose summed time over `problems` (decode
    sizes, every shape) is best, if it beats the current limit by more than MIN_GAIN. Each
    problem needs .config_for(table) and .time_us(config). Returns whether the table changed."""
    from prism_fast.kernels.gated_lora_config import FUSED_MAX_A_ELEMS

    def total(limit: int | None) -> float | None:
        if limit is None:
            limit = table.get("fused_max_a_elems", FUSED_MAX_A_ELEMS)
        trial = {**table, "fused_max_a_elems": limit}
        return summed([p.time_us(p.config_for(trial)) for p in problems])

    best, current, best_t = search(FUSED_LIMITS, total, deadline)
    if best is None:
        print(f"fused_max_a_elems: current limit kept ({current} µs)", flush=True)
        return False
    table["fused_max_a_elems"] = best
    print(f"fused_max_a_elems: {current:.1f} → {best_t:.1f} µs with {best}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune_gated_lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="table to write (default: the one pick_config "
                                                 "reads for this GPU)")
    parser.add_argument("--time-budget", type=float, metavar="S",
                        help="stop after S seconds, writing the entries finished so far")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_gated_lora: needs a CUDA GPU (Triton on CPU is only its interpreter)")
        return 1
    from prism_fast.kernels import gated_lora as gl

    name = torch.cuda.get_device_name()
    default_path = gl.config_path(name)
    out = args.out or default_path
    table = json.loads(default_path.read_text()) if default_path.exists() else {}
    deadline = time.monotonic() + (args.time_budget or float("inf"))
    decode = [Problem(m, k, ns, table) for m in MS if m <= gl.FUSED_MAX_ROWS for k, ns in SHAPES]
    if tune_fused_limit(decode, table, deadline):
        write(out, table, name)
    del decode
    for m in MS:
        problems = [Problem(m, k, ns, table) for k, ns in SHAPES]
        # Shrink before split_k before expand: each is tuned on top of the ones accepted before.
        for entry in ("fused", "shrink", "split_k", "expand"):
            if time.monotonic() > deadline:
                print("time budget spent: remaining entries left untuned")
                return write(out, table, name)
            users = [p for p in problems if STAGE_OF[entry] in p.config["stages"]]
            if not users:
                continue

            def total(value, users=users, entry=entry) -> float | None:
                return summed([p.time_us(p.config if value is None
                                         else with_entry(p.config, entry, value))
                               for p in users])

            best, current, best_t = search(candidates(entry, m), total, deadline)
            key = f"{entry}:{m}"
            if best is not None:
                table[key] = best
                for p in users:
                    p.config = with_entry(p.config, entry, best)
                write(out, table, name)      # a run cut by `timeout` keeps what it found
                print(f"{key}: {current:.1f} → {best_t:.1f} µs over {len(users)} calls with "
                      f"{best}", flush=True)
            else:
                shown = "–" if current is None else f"{current:.1f}"
                print(f"{key}: current choice kept ({shown} µs over {len(users)} calls)",
                      flush=True)
    return write(out, table, name)


def write(out: Path, table: dict, name: str) -> int:
    report.write_atomic(out, json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    print(f"written: {out} ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
