"""The kernel sweep (`python -m bench --sweep`): the per-op benchmarks, each projection and a
whole decoder layer (bench_gated_lora.py) and the gate (bench_prism_gate.py), in one report. On
CPU: small shapes, PyTorch providers only. Whole models: `python -m bench --e2e`."""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import bench_gated_lora, bench_prism_gate, report, sweep_report
from bench.common import CPU_LABEL, DTYPES, PROJECTIONS, Budget, pick_device, run_meta
from bench.timing import TimerConfig, device_limits
from prism_fast.testing.shapes import MODELS

ALL_M = [1, 8, 32, 64, 128, 512, 2048, 4096, 8192]
CPU_QUICK_BUDGET = 90.0  # keeps the CPU quick sweep on 2 busy cores under 2 minutes

# Sweep presets: (gpu, quick) → defaults that the options below override one by one.
PRESETS = {
    (True, False): dict(shapes=["llama3-8b", "qwen2.5-7b"], projections=list(PROJECTIONS),
                        m=ALL_M, share=[0.0, 0.25, 0.5, 1.0], rank=[16, 8, 64], adapters=[1, 4],
                        dtypes=["bf16", "fp16"], modes=["eager", "graph"], gate_batch=[1, 32, 256]),
    (True, True): dict(shapes=["llama3-8b"], projections=["layer", "qkv", "down"],
                       m=[1, 8, 64, 512, 4096], share=[0.0, 0.5, 1.0], rank=[16], adapters=[1],
                       dtypes=["bf16"], modes=["eager", "graph"], gate_batch=[1, 32, 256]),
    (False, False): dict(shapes=["tiny"], projections=list(PROJECTIONS),
                         m=[1, 8, 32, 64, 128, 512, 2048], share=[0.0, 0.25, 0.5, 1.0],
                         rank=[16, 8, 64], adapters=[1, 4], dtypes=["fp32"], modes=["eager"],
                         gate_batch=[1, 32, 256]),
    (False, True): dict(shapes=["tiny"], projections=["layer", "qkv", "gate_up", "o", "down"],
                        m=[1, 8, 64, 512],
                        share=[0.0, 1.0], rank=[16], adapters=[1], dtypes=["fp32"],
                        modes=["eager"], gate_batch=[1, 32, 256]),
}


def presets_help() -> str:
    """The presets as a table, from PRESETS itself (so the help cannot drift from the code)."""
    names = {(True, False): "GPU --full", (True, True): "GPU --quick", (False, True): "CPU --quick",
             (False, False): "CPU --full"}
    lines = ["Sweep options (with --sweep) are comma-separated lists; every option left out "
             "takes its device's preset:", ""]
    for key, name in names.items():
        preset = PRESETS[key]
        lines.append(f"  {name}:")
        lines += [f"    {k}: {','.join(map(str, v))}" for k, v in preset.items()]
    lines += ["", "Output: <out>/context-<device>-<yyyymmdd>.{json,md,png} (context benchmark), "
              "<out>/<device>-<yyyymmdd>.{json,md,png} (--sweep); see bench/results/README.md."]
    return "\n".join(lines)


def options(args: argparse.Namespace, gpu: bool, quick: bool) -> tuple[dict, list, list, list]:
    """(options: the preset overridden by what was given, layer providers, gate providers,
    notes), checked; off a GPU without the Triton providers and CUDA-graph timing."""
    opt = {k: getattr(args, k, None) or v for k, v in PRESETS[(gpu, quick)].items()}
    providers = args.providers or list(bench_gated_lora.DEFAULT_PROVIDERS)
    for flag, given, allowed in (
            ("--shapes", opt["shapes"], MODELS), ("--projections", opt["projections"], PROJECTIONS),
            ("--providers", providers, bench_gated_lora.PROVIDERS), ("--dtypes", opt["dtypes"], DTYPES),
            ("--modes", opt["modes"], ("eager", "graph"))):
        bad = [v for v in given if v not in allowed]
        if bad:
            raise SystemExit(f"{flag}: expected names from {', '.join(allowed)}, got {bad}")
    if any(not 0 <= s <= 1 for s in opt["share"]):
        raise SystemExit(f"--share: expected values in [0, 1], got {opt['share']}")
    gate_providers = list(bench_prism_gate.PROVIDERS)
    notes: list[str] = []
    if not gpu:
        dropped = [p for p in providers if p in bench_gated_lora.GPU_ONLY]
        providers = [p for p in providers if p not in bench_gated_lora.GPU_ONLY]
        gate_providers = [p for p in gate_providers if p not in bench_prism_gate.GPU_ONLY]
        opt["modes"] = [m for m in opt["modes"] if m == "eager"]
        notes.append(f"{CPU_LABEL}: Triton providers ({', '.join(dropped) or 'prism_fast'}) "
                     "left out (on CPU Triton runs only through its interpreter, which is no "
                     "timing); CUDA-graph timing left out")
    return opt, providers, gate_providers, notes


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Sweep:
    """One sweep's state: what was asked, where it writes, the rows and notes so far."""

    args: argparse.Namespace
    opt: dict
    device: torch.device
    stem: Path
    meta: dict
    notes: list[str]
    started: float
    rows: list[dict] = field(default_factory=list)

    def save(self, final: bool = False) -> None:
        """JSON and markdown after every section (a cut run keeps its rows), the plot at the
        end; nothing while no case has a result."""
        rows = self.rows
        rows[:] = [r for r in rows if "median_us" in r or r.get("error")]   # cut short: dropped
        if not any("error" not in r for r in rows):
            return
        sweep_report.add_ratios(rows)
        self.meta["elapsed_s"] = round(time.monotonic() - self.started, 1)
        report.write(self.stem, {"meta": self.meta, "notes": self.notes, "rows": rows},
                     sweep_report.markdown(self.meta, rows, self.notes),
                     (lambda path: sweep_report.plot(self.meta, rows, path))
                     if final and not self.args.no_plot else None)

    def layers(self, providers: list[str], timer: TimerConfig, budget: Budget) -> None:
        opt = self.opt
        cases = bench_gated_lora.layer_cases(opt["shapes"], opt["projections"], opt["m"],
                                             opt["share"], opt["rank"], opt["adapters"],
                                             opt["dtypes"])
        left_out = bench_gated_lora.run_layer_sweep(
            cases, providers, opt["modes"], self.device, timer, self.meta["limits"], budget,
            log, self.rows)
        self.meta["layer_cases"] = dict(total=len(cases), left_out_by_budget=left_out)
        failed = sum(1 for r in self.rows if r.get("error") and not r.get("skipped"))
        if failed:
            self.notes.append(f"{failed} layer measurements failed: see the rows with an error")
        if left_out:
            self.notes.append(f"time budget: {left_out} of {len(cases)} layer cases left out "
                              "(the least important ones: cases are ordered by priority)")


def start(args: argparse.Namespace, argv: list[str] | None) -> tuple[Sweep, list, list]:
    """(the sweep, layer providers, gate providers): options checked, metadata, --out checked."""
    started = time.monotonic()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    quick = args.quick or (not args.full and not gpu)
    opt, providers, gate_providers, notes = options(args, gpu, quick)
    headline = dict(dtype=opt["dtypes"][0], rank=16 if 16 in opt["rank"] else opt["rank"][0],
                    adapters=1 if 1 in opt["adapters"] else opt["adapters"][0])
    stem, meta = run_meta(args, device, "", argv)
    meta.update(sweep="quick" if quick else "full", headline=headline,
                options=opt,
                timing=("triton.testing.do_bench (L2 flushed) / tuning_timers.graph_times_us "
                        "medians" if gpu else "time.perf_counter medians"),
                time_budget_s=(args.time_budget if args.time_budget is not None
                               else CPU_QUICK_BUDGET if quick and not gpu else None),
                threads=torch.get_num_threads())
    return Sweep(args, opt, device, stem, meta, notes, started), providers, gate_providers


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The kernel sweep (python -m bench --sweep): layers, then the gate."""
    sw, providers, gate_providers = start(args, argv)
    opt, device, meta, notes = sw.opt, sw.device, sw.meta, sw.notes
    gpu = device.type == "cuda"
    timer = TimerConfig(warmup_ms=args.warmup_ms or 10.0, rep_ms=args.rep_ms or 40.0)
    # `timeout` sends SIGTERM: turn it into KeyboardInterrupt so what was measured is written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    budget = Budget(meta["time_budget_s"] or None)
    # What the gate section needs, kept back from the layer sweep.
    reserve_gate = 0.0 if args.no_gate else (5.0 if not gpu else 15.0)
    log(f"prism_fast bench on {meta['device']} ({meta['sweep']} sweep)"
        + ("" if gpu else f"  [{CPU_LABEL}]"))
    try:
        meta["limits"] = device_limits(device, DTYPES[opt["dtypes"][0]], timer)
        log(f"device limits: copy {meta['limits']['copy_gbps']:.0f} GB/s, matmul "
            f"{meta['limits']['matmul_tflops']:.2f} TFLOP/s")
        if not args.no_layer:
            sw.layers(providers, timer, budget.minus(reserve_gate))
            sw.save()
        if gpu:
            torch.cuda.empty_cache()
        if not args.no_gate:
            bench_prism_gate.run_gate_bench(
                opt["shapes"], opt["gate_batch"], opt["dtypes"][:1], gate_providers, opt["modes"],
                device, timer, budget, log, sw.rows)
            sw.save()
    except KeyboardInterrupt:
        notes.append("interrupted (SIGINT/SIGTERM): partial results")
        log(notes[-1])
        sw.save(final=True)
        return 130
    if not any("error" not in r for r in sw.rows):   # no report that could pass for a result
        cause = next((n for n in reversed(notes) if "failed" in n or "skipped" in n),
                     "no case ran")
        log(f"sweep: no result; {cause}")
        return 1
    sw.save(final=True)
    for n in notes:
        log(f"note: {n}")
    png = ", .png" if report.suffixed(sw.stem, ".png").exists() else ""
    log(f"report written to {sw.stem}.md, .json{png} ({meta['elapsed_s']:.0f} s)")
    return 0
