"""`python -m bench`: how much faster a PRISM model is than prompting with the context it replaces.

By default the context-folding benchmark (bench/bench_context.py): an expert persona (≈ 200
tokens), then persona + retrieved passages of 1k and 4k tokens (16k and 32k on a GPU), prepended
to every prompt or folded into a rank-16 PRISM adapter whose gate decides in the forward, against
the bare model: time to first token, decode speed, a 128-token answer's latency, prompt tokens,
KV cache and peak memory at batch 1 and 8. CPU: the real SmolLM2-135M-Instruct (fp32, torch
backend); GPU: also a Llama-3-8B-shaped model with random weights (bf16, Triton kernels).

`--sweep`: the per-op sweep, gated LoRA and gate (bench/sweep.py). With their own options after
the flag (e.g. `python -m bench --serving --quick`, `python -m bench --e2e --help`): `--e2e`
whole models, PRISM against base and PEFT beside the byte floor (bench/bench_e2e.py);
`--serving` continuous batching (bench/bench_serving.py); `--train` a training step
(bench/bench_train.py); `--topk-distill` the top-k loss alone (bench/bench_topk_distill.py);
`--bootstrap` Stages 1–2 generation (bench/bench_bootstrap.py);
`--adapter-dtype` adapter precision on bf16 (bench/bench_adapter_dtype.py); `--host` host time
per launch group (bench/bench_host.py).

Every CPU number is labelled "CPU"; results go to bench/results/ (GPU) or bench/results/cpu/
(CPU) as JSON, markdown and a PNG plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import bench_context, bench_gated_lora, context_report, report, sweep
from bench.common import CPU_LABEL, DTYPES, PROJECTIONS, pick_device, run_meta
from prism_fast.testing.shapes import MODELS

# The other benchmarks, each with its own options after its flag (`python -m bench --e2e --help`).
OTHERS = {"--e2e": "bench_e2e", "--serving": "bench_serving", "--train": "bench_train",
          "--bootstrap": "bench_bootstrap", "--adapter-dtype": "bench_adapter_dtype",
          "--topk-distill": "bench_topk_distill", "--host": "bench_host"}


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
        epilog=sweep.presets_help())
    for flag, module in OTHERS.items():
        p.add_argument(flag, action="store_true",
                       help=f"run bench/{module}.py instead (its options: {flag} --help)")
    p.add_argument("--sweep", action="store_true",
                   help="run the per-op sweep (layers, gate) instead of the context-folding "
                        "benchmark")
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
                   help=f"layer providers: {', '.join(bench_gated_lora.PROVIDERS)} (default: "
                        f"{', '.join(bench_gated_lora.DEFAULT_PROVIDERS)}; "
                        f"{', '.join(sorted(bench_gated_lora.GPU_ONLY))} need CUDA: Triton on CPU "
                        "is only its interpreter, not a timing)")
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
    p.add_argument("--no-plot", action="store_true", help="write the JSON and markdown only")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default bench/results/ on GPU, bench/results/cpu/ on "
                        "CPU, which git ignores)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="stop starting new measurements after S seconds (results so far are "
                        "written); the gate section keeps a reserve. Default: none, "
                        f"except {sweep.CPU_QUICK_BUDGET:.0f} s for the CPU quick sweep; 0 = none")
    p.add_argument("--warmup-ms", type=float, help="do_bench warmup (default 10)")
    p.add_argument("--rep-ms", type=float, help="do_bench repetition time (default 40)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    for flag, module in OTHERS.items():
        if flag in given:        # its own parser: every other option is that benchmark's
            given.remove(flag)
            return importlib.import_module(f"bench.{module}").main(given) or 0
    args = parse_args(argv)
    if args.sweep:
        return sweep.run(args, argv)
    return context(args, argv)


def measure_plans(plans: list, device: torch.device, meta: dict, rows: list[dict],
                  notes: list[str]) -> int:
    """Runs every plan (a failing one noted, the others kept); 0, 1 if one failed, 130 if cut."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
        print("(install tqdm for a progress bar)", flush=True)
    status = 0
    try:
        for plan in plans:
            try:
                meta.setdefault("facts", {})[plan.model] = bench_context.run_context(
                    plan, device, lambda m: print(m, flush=True), rows, notes, tqdm)
            except Exception as e:   # e.g. the 8B shape does not fit: the other model counts
                notes.append(f"{plan.model} failed: {type(e).__name__}: {e}")
                print(notes[-1] + "\n" + traceback.format_exc(limit=6), flush=True)
                status = 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        notes.append("interrupted (SIGINT/SIGTERM): partial results")
        status = 130
    return status


def context(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The context-folding benchmark (the default)."""
    started = time.monotonic()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    from prism_fast.testing.smollm2 import INSTALL_HINT, smollm2_available

    if not smollm2_available():
        raise SystemExit(f"the context benchmark runs the real SmolLM2-135M-Instruct, which is not "
                         f"installed: {INSTALL_HINT}")
    plans, notes = bench_context.plans(gpu, args.full)
    if args.rounds:
        plans = [dataclasses.replace(p, rounds=args.rounds) for p in plans]
    stem, meta = run_meta(args, device, "context-", argv)
    meta.update(threads=torch.get_num_threads(), load_average=report.load_average(),
                plans=[dict(model=p.model, dtype=str(p.dtype), backend=p.backend,
                            contexts={str(b): list(c) for b, c in p.contexts.items()},
                            decode_steps=p.decode_steps, rounds=p.rounds) for p in plans])
    for n in notes:
        print(f"skipped: {n}", flush=True)
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"context-folding benchmark on {meta['device']}" + ("" if gpu else f"  [{CPU_LABEL}]"),
          flush=True)
    status = measure_plans(plans, device, meta, rows, notes)
    if not any("error" not in r for r in rows):
        # Nothing measured: write no report that could pass for a result, and end on the cause.
        cause = next((n for n in reversed(notes) if " failed: " in n),
                     notes[-1] if notes else "no case ran")
        print(f"context benchmark: no result; {cause}", flush=True)
        return status or 1
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["load_average_end"] = report.load_average()
    context_report.add_ratios(rows)
    if not gpu and max([0.0, *meta["load_average"][:1], *meta["load_average_end"][:1]]) > 1.5:
        notes.append(f"the machine was shared while this ran (load average "
                     f"{meta['load_average'][0]:.1f} at the start, "
                     f"{meta['load_average_end'][0]:.1f} at the end, {meta['threads']} threads): "
                     "absolute times are slower and noisier than on an idle machine; cases are "
                     "interleaved so that ratios share the noise")
    written = report.write(stem, {"meta": meta, "notes": notes, "rows": rows},
                           context_report.markdown(meta, rows, notes),
                           lambda path: context_report.plot(meta, rows, path))
    line = context_report.headline(rows)
    if line:
        print(f"\n{'GPU' if gpu else 'CPU'}: {line}.")
    print(f"report written to {', '.join(str(p) for p in written)} "
          f"({meta['elapsed_s']:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
