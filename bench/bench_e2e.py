"""End to end: PRISM's patched model against the base model and PEFT, one forward at a time,
beside the byte floor of an open route.

    python -m bench --e2e [--model NAME] [--layers N] [--providers P,…] [--modes eager,graph]
        [--rounds 7] [--steps 30] [--compile] [--fuse-base] [--merge-open] [--threads N]
        [--device auto] [--out DIR] [--time-budget S]

Models: the real SmolLM2-135M-Instruct (the CPU default: fp32, prism_fast's torch backend) or a
random Llama of a prism_fast.testing.shapes name (the GPU default: llama3-8b, 8 layers, bf16,
Triton), with PRISM's random rank-16 LoRA on layers 1…N−1 (bench.models.add_peft_adapter). Every
copy is built before anything is timed: base, PEFT, the PEFT model patched by prism_fast (with a
gate that always opens when prism_gate runs), and with --merge-open one patched with
merge_open=True.

Providers (baseline base): base; persona_prompt (a 230-token persona before every prompt);
prism_open / prism_closed / prism_half (routes forced); prism_gate (the gate decides in the
forward; prefill); prism_merged (--merge-open's copy, all open); peft (the adapter on);
peft_adapter_names (PEFT's per-row mixed batch, half open); two_pass (PRISM's official routing:
a gate forward, the decision on the host, then PEFT; prefill).

A decode case times steps against a context of T tokens, each rewound after it; a prefill case
one forward keeping the last token's logits. Mode graph (GPU, decode): the step captured as a
CUDA graph against a StaticCache and replayed. Interleaved rounds (bench.timing.rounds; round 0
warms up): per provider and round `--steps` decode steps or one prefill, each timed alone (the
GPU synchronised); medians pool every sample. Beside each ratio: the byte floor (1 + one
adapter's bytes / the weight bytes a forward reads; 1 closed) and the overhead as a multiple
of it. Writes <out>/decode-floor[-<model>][-<GPU>][-compiled][-fuse-base][-merge-open].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import functools
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import common, e2e_report, report
from bench.e2e_steps import (
    E2ECase,
    Forward,
    GraphedStep,
    case_fn,
    half,
    route_of,
    routed,
    two_pass,
)
from bench.models import ADAPTER, add_peft_adapter, load_model
from bench.timing import rounds, seconds
from prism_fast.testing.shapes import MODELS

PROVIDERS = ("base", "persona_prompt", "prism_open", "prism_closed", "prism_half", "prism_gate",
             "prism_merged", "peft", "peft_adapter_names", "two_pass")
PREFILL_ONLY = {"prism_gate", "two_pass"}   # their decode steps are prism_open's / peft's
GRAPHED = {"base", "prism_open", "prism_closed", "prism_half"}
PERSONA_TOKENS = 230


CASES = {"cpu": [E2ECase("decode", 1, 128), E2ECase("decode", 8, 128), E2ECase("prefill", 1, 128)],
         "cuda": [E2ECase("decode", 1, 512), E2ECase("decode", 32, 512),
                  E2ECase("prefill", 1, 2048), E2ECase("prefill", 8, 512)]}
DEFAULTS = {"cpu": dict(model="smollm2-135m", layers=None, rounds=7, steps=30, modes=["eager"],
                        providers=["base", "prism_open", "prism_closed"]),
            "cuda": dict(model="llama3-8b", layers=8, rounds=5, steps=20, modes=["eager", "graph"],
                         providers=["base", "prism_open", "prism_closed", "prism_half"])}


@dataclass
class Models:
    """The copies the providers run, all built before anything is timed."""

    base: torch.nn.Module
    peft: torch.nn.Module
    patched: torch.nn.Module | None
    merged: torch.nn.Module | None
    gate: torch.nn.Module
    layers: int

    def of(self, provider: str):
        if provider in ("base", "persona_prompt"):
            return self.base
        if provider.startswith("prism_"):
            return self.merged if provider == "prism_merged" else self.patched
        return self.peft


def build(args: argparse.Namespace, device: torch.device) -> Models:
    """Base, PEFT (PRISM's random LoRA), and the patched copies the providers ask for."""
    import prism_fast

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    base, layers = load_model(args.model, args.layers, dtype, device)  # SmolLM2: its own depth
    peft = add_peft_adapter(copy.deepcopy(base), layers)
    gate = common.make_gate(MODELS[args.model].hidden, dtype, device, always_open=True)

    def patched(**options):
        gated = dict(gate=gate.state_dict()) if "prism_gate" in args.providers else {}
        return prism_fast.patch_model(copy.deepcopy(peft), backend="auto" if gpu else "torch",
                                      **gated, **options)

    prism = any(p.startswith("prism_") and p != "prism_merged" for p in args.providers)
    ms = Models(base, peft, patched(fuse_base=args.fuse_base) if prism else None,
                patched(merge_open=True) if "prism_merged" in args.providers else None,
                gate, layers)
    for model in (ms.base, ms.peft, ms.patched, ms.merged):   # every copy made first: a deep
        if model is not None:                                # copy keeps a compiled forward
            compiled(model, args.compile)
    return ms


def compiled(model, on: bool):
    if on:
        # Three shapes × the routes' host flags each get a graph per model: past Dynamo's
        # default recompile limit (8) a forward falls back to eager and the ratios mean nothing.
        torch._dynamo.config.recompile_limit = 64
        model.forward = torch.compile(model.forward, dynamic=False)
    return model


def has_row(provider: str, case: E2ECase, mode: str) -> bool:
    """Whether a provider has a row for a case in a mode."""
    if provider in PREFILL_ONLY and case.kind == "decode":
        return False
    if provider in ("prism_half", "peft_adapter_names") and case.batch == 1:   # not mixed
        return False
    return mode == "eager" or (case.kind == "decode" and provider in GRAPHED)


def repeat(fn: Callable[[], float], n: int, prepare: Callable[[], None] | None = None
           ) -> list[float]:
    """One round of a provider: `prepare()` (a graph's routes), then n timed calls."""
    if prepare is not None:
        prepare()
    return [fn() for _ in range(n)]


def plan_calls(ms: Models, cases: list[E2ECase], args: argparse.Namespace,
               device: torch.device) -> dict[tuple, Callable[[], list[float]]]:
    """(case, provider, mode) → one round: seconds per forward. Inputs, caches and graphs are
    made here, untimed."""
    fwd = Forward(ms.base)          # keyword names of the HF model (PEFT's forward hides them)
    gen = torch.Generator().manual_seed(0)
    vocab = ms.base.config.vocab_size
    persona = torch.randint(0, vocab, (1, PERSONA_TOKENS), generator=gen).to(device)
    calls = {}
    for case in cases:
        ids = torch.randint(0, vocab, (case.batch, case.tokens), generator=gen).to(device)
        n = args.steps if case.kind == "decode" else 1
        for p in args.providers:
            model, route = ms.of(p), route_of(p, case.batch)
            x = torch.cat([persona.expand(case.batch, -1), ids], dim=1) \
                if p == "persona_prompt" else ids                        # [B, 230 + T] or [B, T]
            call = two_pass(ms.peft, ms.gate, fwd) if p == "two_pass" else model
            names = [ADAPTER if r == 0 else "__base__" for r in half(case.batch)]
            extra = {"adapter_names": names} if p == "peft_adapter_names" else {}
            for mode in (m for m in args.modes if has_row(p, case, m)):
                if mode == "graph":
                    make = functools.partial(GraphedStep, model, fwd, x, (args.rounds + 1) * n,
                                             route)   # a list: prism_gate has no graph rows
                else:
                    make = functools.partial(case_fn, call, fwd, case, x, extra)
                step = routed(model, route, make)
                timed = seconds(step, device)
                prepared = functools.partial(repeat, timed, n, getattr(step, "prepare", None))
                calls[case, p, mode] = functools.partial(routed, model, route, prepared)
    return calls


class BudgetSpent(Exception):
    pass


def measure(calls: dict, n_rounds: int, budget: common.Budget, log) -> tuple[list[dict], str]:
    """(rows with medians, why it stopped early or ""): interleaved rounds, round 0 a warm-up;
    the time budget or an interrupt (SIGINT, SIGTERM) ends them, keeping what was measured."""
    per_round: dict = {k: [] for k in calls}

    def after(r: int) -> None:
        log(f"round {r}/{n_rounds} done" + (" (warm-up)" if r == 0 else ""))
        if budget.expired() and 1 <= r < n_rounds:     # one measured round at least
            raise BudgetSpent

    stopped = ""
    try:
        rounds(calls, n_rounds, warmup=1, after_round=after, out=per_round)
    except BudgetSpent:
        stopped = "time budget spent"
    except KeyboardInterrupt:
        stopped = "interrupted (SIGINT/SIGTERM)"
    if stopped:
        done = min(map(len, per_round.values()), default=0)
        stopped += f" after {done} of {n_rounds} measured rounds: partial results"
        log(stopped)
    rows = [dict(kind=case.kind, B=case.batch, T=case.tokens, provider=p, mode=mode,
                 median_ms=statistics.median(t for ts in got for t in ts) * 1e3,
                 samples=sum(map(len, got)),
                 round_medians_ms=[statistics.median(ts) * 1e3 for ts in got])
            for (case, p, mode), got in per_round.items() if got]
    return rows, stopped


def parse_args(argv: list[str] | None, gpu: bool) -> argparse.Namespace:
    """The options, with the device's defaults (DEFAULTS) for what was left out; checked."""
    def names(s: str) -> list[str]:
        return [v for v in s.split(",") if v]

    p = argparse.ArgumentParser(prog="python -m bench --e2e", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", choices=list(MODELS), help="default smollm2-135m (CPU), llama3-8b")
    p.add_argument("--layers", type=int, help="decoder layers of a random model (default 8 on "
                   "a GPU, else the shape's); SmolLM2 keeps its own")
    p.add_argument("--providers", type=names, help=f"{', '.join(PROVIDERS)}")
    p.add_argument("--modes", type=names, help="eager, graph (CUDA graphs: GPU only)")
    p.add_argument("--rounds", type=int, help="measured rounds (default 7 CPU, 5 GPU)")
    p.add_argument("--steps", type=int, help="decode steps per provider and round (30, 20)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--fuse-base", action="store_true",
                   help="patch_model(fuse_base=True): one base + shrink GEMM per open group")
    p.add_argument("--merge-open", action="store_true",
                   help="add prism_merged: a copy patched with merge_open=True, all open")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="default bench/results/ (GPU) or bench/results/cpu/")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="no new round after S seconds (what was measured is written)")
    args = p.parse_args(argv)
    for k, v in DEFAULTS["cuda" if gpu else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.merge_open and "prism_merged" not in args.providers:
        args.providers = [*args.providers, "prism_merged"]
    for flag, given, allowed in (("--providers", args.providers, PROVIDERS),
                                 ("--modes", args.modes, ("eager", "graph") if gpu else ("eager",))):
        bad = [v for v in given if v not in allowed]
        if bad or not given:
            p.error(f"{flag}: expected names from {', '.join(allowed)}, got {bad or given}")
    for flag, v in (("--rounds", args.rounds), ("--steps", args.steps),
                    ("--layers", args.layers or 1), ("--threads", args.threads or 1)):
        if v < 1:
            p.error(f"{flag}: expected a positive integer, got {v}")
    if gpu and "prism_merged" in args.providers:
        p.error("--merge-open / prism_merged: merge_open runs on the torch backend with fp32 "
                "CPU weights (patch_model refuses it on a GPU); got a CUDA device")
    if "base" not in args.providers:
        p.error(f"--providers: every ratio is to base, which must be among them; got "
                f"{args.providers}")
    return args


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)     # the device decides the defaults
    pre.add_argument("--device", default="auto")
    flag = pre.parse_known_args(given)[0].device
    device = common.pick_device(flag if flag in ("auto", "cpu", "cuda") else "cpu")
    gpu = device.type == "cuda"
    args = parse_args(given, gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    started, budget = time.monotonic(), common.Budget(args.time_budget)  # the build counts
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `timeout`: keep what ran
    _, meta = common.run_meta(args, device, "", ["--e2e", *given])  # --out checked writable
    stem = (args.out or (report.RESULTS if gpu else report.RESULTS / "cpu")) / "-".join(
        ["decode-floor", *([] if args.model == "smollm2-135m" else [args.model]),
         *([meta["slug"]] if gpu else []), *(["compiled"] if args.compile else []),
         *(["fuse-base"] if args.fuse_base else []), *(["merge-open"] if args.merge_open else [])])
    meta.update(model=args.model, rounds=args.rounds, steps=args.steps, compile=args.compile,
                threads=torch.get_num_threads(), load_before=report.load_average())
    ms = build(args, device)
    meta.update(e2e_report.model_meta(ms, args.model))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"[e2e] {args.model}, {ms.layers} layers on {meta['device']}; providers "
        f"{', '.join(args.providers)}; {args.rounds} rounds")
    calls = plan_calls(ms, CASES[device.type], args, device)
    rows, stopped = measure(calls, args.rounds, budget, log)
    meta.update(load_after=report.load_average(), elapsed_s=round(time.monotonic() - started, 1),
                stopped=stopped)
    if not any(r["provider"] == "base" for r in rows):
        log("e2e: no result (no round of base was measured)")
        return 130 if stopped else 1
    e2e_report.add_ratios(rows, meta["floor"], gpu, meta["peft_floor"])
    text = e2e_report.markdown(meta, rows)
    report.write(stem, dict(meta=meta, rows=rows), text)
    print(text)
    return 130 if stopped.startswith("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
