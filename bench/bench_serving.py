"""Serving under continuous batching: PRISM against prompting with the context it replaces.

    python -m bench --serving [--quick] [--engine-sweep]     (or python -m bench.bench_serving)

A stream of chat requests (bench/contexts.py's questions, answers of varied lengths, greedy, EOS
off) through transformers' engine (`init_continuous_batching`, paged KV cache) per case:
`base`; `static_generate` (left-padded `generate` in batches of 8, no engine); `prompted` (the
context of C tokens as every system message, prefix sharing off) and `prompted_shared` (on);
`prism_open` / `prism_half` / `prism_closed` (no context, the patched PEFT model, routes
forced). Per case: throughput, TTFT and per-token latency at p50 / p99, prompt tokens taken from
shared blocks, peak KV blocks. Then the decode crossover (bench/serving_crossover.py), and with
--engine-sweep a sweep of the engine's settings. CPU: SmolLM2-135M-Instruct fp32, torch
backend. Results: <out>/serving-cpu-<date>.{json,md,png}, written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import report, serving_crossover, serving_report
from bench.serving_engine import ATTNS, Engine, engine_sweep, run_case, static_generate, sweep_grid

CASES = ("base", "static_generate", "prompted", "prompted_shared", "prism_open", "prism_half",
         "prism_closed")
ANSWERS = (16, 48, 32, 24)          # max new tokens, cycled over the stream
# (requests, stream contexts, crossover contexts, decode tokens, serial requests at B = 1)
DEFAULT = dict(requests=16, contexts=[200, 1024], cross=list(serving_crossover.CPU_CONTEXTS),
               decode_tokens=32, serial=3)
QUICK = dict(requests=4, contexts=[200], cross=[200], decode_tokens=6, serial=1)


def build(merge_open: bool = False):
    """(base model, patched PEFT model, tokenizer, byte floor), SmolLM2-135M fp32 on CPU;
    merge_open: the PEFT model patched with merge_open=True (merged copies for open forwards)."""
    import prism_fast
    from bench.common import patched_byte_floor
    from bench.models import smollm2_with_adapter

    base, prism, tokenizer = smollm2_with_adapter(torch.float32)
    prism = prism_fast.patch_model(prism, backend="torch", merge_open=merge_open)
    f = patched_byte_floor(base, prism)
    return base, prism, tokenizer, {"adapter_mb": f["adapter_bytes"] / 1e6,
                                    "base_mb": f["weight_bytes"] / 1e6, "floor": f["floor"]}


def encode(tokenizer, question: str, context: str | None) -> list[int]:
    messages = ([{"role": "system", "content": context}] if context else []) + \
        [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def plan(cases: list[str], contexts: list[int]) -> list[tuple[str, int | None]]:
    """(case, context) pairs: cases without a context run once."""
    out = []
    for case in cases:
        out += [(case, c) for c in contexts] if case.startswith("prompted") else [(case, None)]
    return out


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench --serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run (≤ 2 min on an idle 2-core CPU): {QUICK}")
    p.add_argument("--requests", type=int, help=f"stream length (default {DEFAULT['requests']})")
    p.add_argument("--contexts", type=ints, help="stream contexts C (default 200,1024)")
    p.add_argument("--crossover-contexts", type=ints, dest="cross",
                   help="crossover contexts C (default 200,1024,4096)")
    p.add_argument("--no-crossover", action="store_true")
    p.add_argument("--engine-sweep", action="store_true",
                   help="also sweep the engine's settings (attention, tokens per step, page)")
    p.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0: burst)")
    p.add_argument("--rounds", type=int, default=1,
                   help="the stream's cases run this many times, interleaved; medians")
    p.add_argument("--cases", default=",".join(CASES), type=lambda s: s.split(","))
    p.add_argument("--max-batch-tokens", type=int, default=Engine.max_batch_tokens)
    p.add_argument("--page-size", type=int, default=Engine.page_size)
    p.add_argument("--attn", default=Engine.attn, help=f"one of {', '.join(ATTNS)}")
    p.add_argument("--merge-open", action="store_true",
                   help="patch PRISM with merge_open=True (file suffix -merge-open)")
    p.add_argument("--out", type=Path, default=report.RESULTS / "cpu")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULT).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    bad = [c for c in args.cases if c not in CASES]
    if bad or args.attn not in ATTNS:
        p.error(f"--cases: expected names among {', '.join(CASES)}, got {bad}; --attn: expected "
                f"one of {', '.join(ATTNS)}, got {args.attn!r}")
    numbers = {"--requests": [args.requests], "--rounds": [args.rounds], "--contexts": args.contexts,
               "--crossover-contexts": args.cross, "--max-batch-tokens": [args.max_batch_tokens],
               "--page-size": [args.page_size]}
    for flag, values in numbers.items():
        if not values or any(v < 1 for v in values):
            p.error(f"{flag}: expected positive integers, got {values}")
    if args.cross != sorted(args.cross):
        p.error(f"--crossover-contexts: expected increasing values, got {args.cross}")
    return args


def stream(args, base, prism, tokenizer, engine: Engine, log) -> list[dict]:
    from bench.contexts import QUESTIONS, context_text

    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    answers = [ANSWERS[i % len(ANSWERS)] for i in range(args.requests)]
    runs: dict[tuple[str, int | None], list[dict]] = {}
    for _, (case, context) in itertools.product(range(args.rounds),
                                                plan(args.cases, args.contexts)):
        text = context_text(tokenizer, context) if context else None
        prompts = [encode(tokenizer, q, text) for q in questions]
        routes = {"prism_open": [0] * len(prompts), "prism_closed": [-1] * len(prompts),
                  "prism_half": [i % 2 - 1 for i in range(len(prompts))]}.get(case)
        log(f"[serving] {case} C={context} …")
        if case == "static_generate":
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
            row = static_generate(base, prompts, answers, pad)
        else:
            model = prism if case.startswith("prism") else base
            row = run_case(model, prompts, answers, routes, case != "prompted", args.rate, engine)
        runs.setdefault((case, context), []).append(row)
    return [{"case": case, "context": context, **median_row(rs), "rounds": len(rs)}
            for (case, context), rs in runs.items()]


def median_row(rows: list[dict]) -> dict:
    """Each numeric field's median over the rounds (the others, and equal values, as given)."""
    out = {}
    for key, first in rows[0].items():
        values = [r[key] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        out[key] = statistics.median(values) if numeric and len(set(values)) > 1 else first
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from prism_fast.batching import check_engine

    try:             # the engine prism_fast hooks (transformers >= 5.25), before any work
        check_engine()
    except RuntimeError as e:
        raise SystemExit(f"python -m bench --serving: {e}") from None
    started, load = time.monotonic(), os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    from bench.contexts import QUESTIONS, context_text

    def log(msg: str) -> None:
        print(f"{msg} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    engine = Engine(args.max_batch_tokens, args.page_size, args.attn)
    base, prism, tokenizer, floor = build(args.merge_open)
    rows = stream(args, base, prism, tokenizer, engine, log)
    cross = sweep = None
    if not args.no_crossover:
        n = 1 + args.serial + 8

        def prompts_for(c):
            text = context_text(tokenizer, c) if c else None
            return [encode(tokenizer, QUESTIONS[i % len(QUESTIONS)], text) for i in range(n)]
        cross = serving_crossover.run_crossover(base, prism, floor, prompts_for, args.cross,
                                                args.decode_tokens, args.serial, engine, log)
    if args.engine_sweep:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
        sweep = engine_sweep(base, [encode(tokenizer, q, None) for q in questions],
                             [ANSWERS[i % len(ANSWERS)] for i in range(args.requests)],
                             sweep_grid(args.quick), log)
    if not rows and not cross:
        log("[serving] no result: nothing written")
        return 1
    date = datetime.date.today().strftime("%Y%m%d")
    meta = {"device": f"CPU ({platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads)",
            "model": "SmolLM2-135M-Instruct fp32" + (", PRISM patched with merge_open=True"
                                                     if args.merge_open else ""),
            "requests": args.requests, "rounds": args.rounds, "answers": list(ANSWERS),
            "rate": args.rate, "date": date,
            "engine": engine.label(), "engine_settings": dataclasses.asdict(engine),
            "command": " ".join(["python -m bench.bench_serving",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick, "elapsed_s": time.monotonic() - started,
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}
    text = serving_report.markdown(meta, rows, cross, sweep or [])
    report.write(args.out / (f"serving-cpu-{date}" + ("-merge-open" if args.merge_open else "")),
                 {"meta": meta, "rows": rows, "crossover": cross, "engine_sweep": sweep,
                  "gpu_rows": serving_crossover.GPU_ROWS}, text,
                 (lambda path: serving_report.plot(cross, path)) if cross else None)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
