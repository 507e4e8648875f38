"""The decode-path table: every gated-LoRA path against the base F.linear, on a GPU.

    python -m bench.gpu_decode_paths [--out DIR] [--time-budget S] [--models llama3-8b qwen2.5-7b]

For each projection group of one decoder layer (q/k/v, o, gate/up, down) of Llama-3-8B and
Qwen2.5-7B, M ∈ {1, 8, 32, 64}, CUDA graph first (every model) then eager: `base` (the group's
F.linear calls) and base + the LoRA term by each of prism_fast.tune's candidate paths (split,
fused, coop where its grid fits), launched as it launches them (prism_fast.tuning.projection_runner),
and `fused_base` (the opt-in one-launch base + LoRA kernel, its own rounding, as tune times it
for fuse_base models). bf16, r = 16, one
adapter, every row open. Graphed times come from prism_fast.tuning.graph_time_us (the timer
`prism_fast.tune` decides with), eager ones from do_bench; ratios to base in the same process.
Writes decode_paths.json and prints its table (`--md`: also decode_paths.md). GPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import report
from bench.bench_gated_lora import LayerCase, work
from bench.common import Budget, x_floor
from bench.report import fmt
from bench.timing import TimerConfig, measure
from prism_fast import tuning
from prism_fast.kernels import gated_lora as gl
from prism_fast.testing.shapes import MODELS

MS = (1, 8, 32, 64)
RANK = 16
NAMES = ("qkv", "o", "gate_up", "down")
COLUMNS = (*gl.PATHS, "fused_base")   # the timed columns beside base


def group_fns(k: int, ns: list[int], m: int, path: str, device: torch.device):
    """(base fn, lora fn, check fn) for one group: lora fn = base + the LoRA term by `path`,
    launched as prism_fast.tune times a fuse_base model's whole projection (its
    projection_runner "linear+<path>": F.linear, then GatedLoraLauncher with the path's config
    forced, the launcher a patched model's layer takes in eager mode). path "fused_base":
    lora fn = the fused kernel alone (base and LoRA in one launch), as tune times it too."""
    shape = (k, tuple(ns), RANK, "bfloat16", "bfloat16")
    fused = path == tuning.FUSED_BASE
    lora, (x, a, b, _, _, _), ws = tuning.projection_runner(
        shape, m, path if fused else tuning.LINEAR + path, device, 2.0)

    def base():
        return [F.linear(x, w) for w in ws]

    def check() -> float:
        """Relative error of the LoRA term (of the whole output for fused_base, whose base is
        its own) against a float32 reference."""
        u = x.float() @ a[0].float().t()                                          # [M, S·R]
        ref = torch.cat([2.0 * u[:, s * RANK:(s + 1) * RANK] @ b[0, lo:lo + n].float().t()
                         for s, (lo, n) in enumerate(zip([0, *torch.tensor(ns).cumsum(0)[:-1]
                                                          .tolist()], ns))], dim=1)
        if fused:   # its output rounds base + LoRA once: compare the whole of it
            got = torch.cat(lora(), dim=1).float()
            ref = ref + torch.cat([x.float() @ w.float().t() for w in ws], dim=1)
        else:
            got = torch.cat([y - y0 for y, y0 in zip(lora(), base())], dim=1).float()
        return float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))

    return base, lora, check


def time_us(fn, device: torch.device, mode: str, cfg: TimerConfig) -> float:
    if mode == "graph":
        return tuning.graph_time_us(fn, device)
    return measure(fn, device, "eager", cfg).median_us


def run(models: list[str], out: Path, budget: Budget, cfg: TimerConfig) -> list[dict]:
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    rows: list[dict] = []
    # CUDA graphs first (the decode goal's setting) for every model, then eager
    for mode, model in ((mode, model) for mode in ("graph", "eager") for model in models):
        for name, (k, ns, _) in zip(NAMES, MODELS[model].groups("layer")):
            for m in MS:
                if budget.expired():
                    return rows
                # prism_fast.tune's candidates: COOP is none where its grid cannot be resident
                paths = tuning.candidates((k, tuple(ns), RANK, "bfloat16", "bfloat16"), m,
                                          props.name, props.multi_processor_count)
                paths = [*paths, "fused_base"]
                row = {"model": model, "mode": mode, "group": name, "K": k, "N": ns, "M": m,
                       "floor": group_byte_floor(model, name, m)}
                for path in COLUMNS:
                    if path not in paths:
                        row[path] = None        # its grid cannot be co-resident here
                        continue
                    base, lora, check = group_fns(k, ns, m, path, device)
                    if "base_us" not in row:
                        row["base_us"] = time_us(base, device, mode, cfg)
                    try:
                        err = check()
                        if not err <= 2e-2:
                            raise RuntimeError(f"relative error {err:.3g}")
                        row[path] = time_us(lora, device, mode, cfg)
                    except Exception as e:   # report, keep going: one path must not sink all
                        row[path] = None
                        row[f"{path}_error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                write(rows, out, props.name)
    return rows


def group_byte_floor(model: str, group: str, m: int) -> float:
    """The group's bytes with one adapter's A and B over its base bytes (x, W, y) at M rows:
    the floor of its ratios to base (decode at M ≤ 64 is memory-bound)."""
    case = LayerCase(model, group, m, 1.0, RANK, 1, "bf16")
    return work(case, m, 1)[0] / work(case, 0, 0)[0]


def _cell(r: dict, path: str) -> str:
    """µs (× base, overhead as a multiple of the floor's); the fused base kernel's time holds
    the base, the other paths' the LoRA term added to it."""
    if r.get(path) is None:
        return "—"
    ratio = r[path] / r["base_us"]
    return f"{r[path]:.1f} ({ratio:.2f}×, {fmt(x_floor(ratio, r.get('floor')), '.1f')} fl)"


def write(rows: list[dict], out: Path, gpu: str, md: bool = False) -> str:
    report.write_atomic(out / "decode_paths.json", json.dumps(
        {"gpu": gpu, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    body = [[r["model"], r["mode"], r["group"], str(r["M"]), f"{r['base_us']:.1f}",
             fmt(r.get("floor"), ".4f"), *(_cell(r, p) for p in COLUMNS)] for r in rows]
    errors = [f"- {r['model']} {r['mode']} {r['group']} M={r['M']} {p}: {r[p + '_error']}"
              for r in rows for p in COLUMNS if p + "_error" in r]
    text = "\n".join([
        f"# Decode paths, {gpu}, bf16, r = {RANK}, every row open (µs, median; × base)",
        "fused base: the opt-in one-launch kernel, base included (not + base). byte floor: "
        "the group's bytes with one adapter's A and B over its base bytes (x, W, y); k fl: "
        "the overhead above 1 as k times the floor's", "",
        report.table(["model", "mode", "group", "M", "base", "byte floor", "+ split", "+ fused",
                      "+ coop", "fused base"], body), *([""] + errors if errors else [])]) + "\n"
    if md:
        report.write_atomic(out / "decode_paths.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_decode_paths",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--time-budget", type=float, default=None, metavar="S")
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2.5-7b"],
                        choices=["llama3-8b", "qwen2.5-7b"])
    parser.add_argument("--md", action="store_true", help="also write decode_paths.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_decode_paths: needs a CUDA GPU")
        return 1
    start = time.monotonic()
    cfg = TimerConfig(warmup_ms=10, rep_ms=20, graph_rep_ms=20)
    rows = run(args.models, args.out, Budget(args.time_budget), cfg)
    gpu = torch.cuda.get_device_name()
    print(write(rows, args.out, gpu, args.md) if rows else "no rows")
    print(f"decode paths: {len(rows)} rows in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
