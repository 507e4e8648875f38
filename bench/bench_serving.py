"""Serving under continuous batching: PRISM against prompting with the context it replaces.

    python -m bench.bench_serving [--requests 16] [--contexts 200,1024] [--rate 0] [--out DIR]

A stream of N chat requests (questions of bench/contexts.py, answers of varied lengths, greedy,
EOS off so that every case generates the same tokens count) goes through transformers' own
engine (`init_continuous_batching`, paged KV cache) in each case:

  base             the unpatched model, no context
  prompted         the context (C tokens) as every request's system message, prefix sharing off:
                   every prompt recomputed
  prompted_shared  the same, with the engine's prefix sharing on: the context's blocks computed
                   once and shared
  prism_open       no context; the PEFT model patched by prism_fast, every route forced open
  prism_half       half the requests open, half closed (forced, alternating)
  prism_closed     every route closed (the base model's computation)

Per case: throughput (generated tokens / wall time from the first request's arrival to the last
answer), time to first token (arrival → first token) and per-token latency (gaps between a
request's tokens) at p50 / p99, prompt tokens taken from shared blocks (prefix sharing). On CPU:
SmolLM2-135M-Instruct fp32, torch backend. CPU numbers are CPU numbers, never GPU results.
Results: bench/results/cpu/serving-cpu-<date>.{json,md}, written atomically; no result, no file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("base", "prompted", "prompted_shared", "prism_open", "prism_half", "prism_closed")
ANSWERS = (16, 48, 32, 24)          # max new tokens, cycled over the stream


def engine_config(shared: bool, n: int, longest: int):
    from transformers import ContinuousBatchingConfig

    # CPU: 256 query tokens per step, 32-token pages, room for every request at once.
    pages = n * (longest // 32 + 2) + 8
    return ContinuousBatchingConfig(page_size=32, num_blocks=pages, max_batch_tokens=256,
                                    max_requests_per_batch=min(n, 64),
                                    allow_block_sharing=shared, use_async_batching=False)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_case(model, prompts: list[list[int]], routes, shared: bool, rate: float) -> dict:
    """Serve the stream once; the metrics of the case."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(ANSWERS))
    longest = max(map(len, prompts)) + max(ANSWERS)
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=engine_config(shared, len(prompts), longest))
    shared_tokens = count_shared(manager)
    manager.start()
    outputs, start = {}, time.perf_counter()
    try:
        for i, prompt in enumerate(prompts):
            if rate > 0:       # arrivals at a fixed rate; 0 = all at once
                time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            kw = {} if routes is None else {"prism_route": routes[i]}
            manager.add_request(prompt, request_id=f"r{i}", record_timestamps=True,
                                max_new_tokens=ANSWERS[i % len(ANSWERS)], **kw)
        while len(outputs) < len(prompts):
            out = manager.get_result(timeout=600)
            if out is None:
                raise RuntimeError("the engine returned no result within 600 s")
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error}")
            outputs[out.request_id] = out
        wall = time.perf_counter() - start
    finally:
        manager.stop(block=True, timeout=60)
    ttft = [o.timestamps[0] - o.created_time for o in outputs.values()]
    gaps = [b - a for o in outputs.values() for a, b in zip(o.timestamps, o.timestamps[1:])]
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall,
            "throughput_tok_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * percentile(gaps, 0.5), "tpot_p99_ms": 1e3 * percentile(gaps, 0.99),
            "prompt_tokens": sum(map(len, prompts)), "shared_prompt_tokens": shared_tokens[0]}


def count_shared(manager) -> list[int]:
    """[prompt tokens the engine took from cached blocks], counted as its scheduler asks."""
    count, create = [0], manager._create_batch_processor

    def create_counting():
        processor = create()
        search = processor.cache.search_prefix_match

        def search_counting(request_id, prompt_ids):
            n = search(request_id, prompt_ids)
            count[0] += n
            return n
        processor.cache.search_prefix_match = search_counting
        return processor

    manager._create_batch_processor = create_counting
    return count


def build(n: int):
    """(base model, patched PEFT model, tokenizer), SmolLM2-135M fp32 on CPU."""
    import prism_fast
    from bench.bench_e2e import add_peft_adapter
    from bench.models import load_smollm2

    base, tokenizer = load_smollm2(torch.float32)
    prism, _ = load_smollm2(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prism = add_peft_adapter(prism, prism.config.num_hidden_layers)
    return base, prism_fast.patch_model(prism, backend="torch"), tokenizer


def encode(tokenizer, question: str, context: str | None) -> list[int]:
    messages = ([{"role": "system", "content": context}] if context else []) + \
        [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def plan(args) -> list[tuple[str, int | None]]:
    """(case, context) pairs: cases without a context run once."""
    out = []
    for case in args.cases:
        if case.startswith("prompted"):
            out += [(case, c) for c in args.contexts]
        else:
            out.append((case, None))
    return out


def markdown(meta: dict, rows: list[dict]) -> str:
    head = ["case", "C", "tok/s", "× base", "TTFT p50 ms", "TTFT p99 ms", "tok p50 ms",
            "tok p99 ms", "prompt tok", "shared tok"]
    base = next((r["throughput_tok_s"] for r in rows if r["case"] == "base"), None)
    lines = [f"# Serving under continuous batching ({meta['device']})", "",
             f"{meta['model']}, {meta['requests']} requests, answers {meta['answers']} tokens "
             f"(cycled), arrival rate {meta['rate'] or 'all at once'}, {meta['date']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["case"], str(r["context"] or "–"), f"{r['throughput_tok_s']:.1f}",
                 f"{r['throughput_tok_s'] / base:.2f}" if base else "–",
                 *(f"{r[k]:.0f}" for k in ("ttft_p50_ms", "ttft_p99_ms")),
                 *(f"{r[k]:.1f}" for k in ("tpot_p50_ms", "tpot_p99_ms")),
                 str(r["prompt_tokens"]), str(r["shared_prompt_tokens"] or 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--contexts", default="200,1024",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rate", type=float, default=0.0, help="arrivals per second (0: burst)")
    parser.add_argument("--cases", default=",".join(CASES), type=lambda s: s.split(","))
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu")
    args = parser.parse_args(argv)
    bad = [c for c in args.cases if c not in CASES]
    if bad or args.requests < 1 or any(c < 1 for c in args.contexts):
        parser.error(f"--cases: expected names among {', '.join(CASES)}; --requests and "
                     f"--contexts: positive; got cases {args.cases}, requests {args.requests}, "
                     f"contexts {args.contexts}")
    args.out.mkdir(parents=True, exist_ok=True)
    from bench.contexts import QUESTIONS, context_text

    base, prism, tokenizer = build(args.requests)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
    rows = []
    for case, context in plan(args):
        text = context_text(tokenizer, context) if context else None
        prompts = [encode(tokenizer, q, text) for q in questions]
        routes = {"prism_open": [0] * len(prompts), "prism_closed": [-1] * len(prompts),
                  "prism_half": [i % 2 - 1 for i in range(len(prompts))]}.get(case)
        model = prism if case.startswith("prism") else base
        print(f"[serving] {case} C={context} …", file=sys.stderr, flush=True)
        row = run_case(model, prompts, routes, shared=case != "prompted", rate=args.rate)
        rows.append({"case": case, "context": context, **row})
    if not rows:
        print("[serving] no result: nothing written", file=sys.stderr)
        return 1
    date = datetime.date.today().strftime("%Y%m%d")
    meta = {"device": f"CPU ({platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads)", "model": "SmolLM2-135M-Instruct fp32",
            "requests": args.requests, "answers": list(ANSWERS), "rate": args.rate, "date": date,
            "engine": "transformers continuous batching, page 32, 256 tokens per step, sdpa"}
    stem = args.out / f"serving-cpu-{date}"
    write_atomic(stem.with_suffix(".json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_atomic(stem.with_suffix(".md"), markdown(meta, rows))
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
