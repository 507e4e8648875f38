"""transformers' continuous-batching engine as the serving benchmark drives it.

One stream of requests through `init_continuous_batching` (paged KV cache) with the engine's
settings given (`Engine`), instrumented to count prompt tokens taken from shared blocks and the
peak KV blocks held by live requests; the same stream through static left-padded `generate`
batches; and a small sweep of the engine's settings on the base model.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from bench.timing import TokenStamps

ATTNS = ("sdpa", "paged|eager")     # the implementations the engine accepts for an fp32 CPU model


@dataclasses.dataclass(frozen=True)
class Engine:
    """The engine's settings (transformers ContinuousBatchingConfig + attention implementation)."""
    max_batch_tokens: int = 256     # query tokens per step (prefill chunks + decode tokens)
    page_size: int = 32             # tokens per KV block
    attn: str = "sdpa"

    def label(self) -> str:
        return f"{self.attn}, {self.max_batch_tokens} tokens per step, page {self.page_size}"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def engine_config(engine: Engine, shared: bool, n: int, longest: int):
    from transformers import ContinuousBatchingConfig

    # Room for every request at once: no request waits for blocks, none is offloaded.
    pages = n * (longest // engine.page_size + 2) + 8
    return ContinuousBatchingConfig(page_size=engine.page_size, num_blocks=pages,
                                    max_batch_tokens=engine.max_batch_tokens,
                                    max_requests_per_batch=min(n, 64),
                                    allow_block_sharing=shared, use_async_batching=False)


def instrument(manager) -> dict:
    """Counters the engine's cache fills as it runs: prompt tokens found in shared blocks
    (`search_prefix_match`, as the scheduler asks) and the peak KV blocks held by live requests
    (distinct block ids in the allocators' block tables, after every allocation)."""
    stats = {"shared_prompt_tokens": 0, "peak_kv_blocks": 0, "peak_kv_mb": 0.0}
    create = manager._create_batch_processor

    def create_counting():
        processor = create()
        cache = processor.cache
        search, store = cache.search_prefix_match, cache.can_store_request_tokens

        def search_counting(request_id, prompt_ids):
            n = search(request_id, prompt_ids)
            stats["shared_prompt_tokens"] += n
            return n

        def store_counting(state, request_len, dry_run=False):
            ok = store(state, request_len, dry_run)
            if ok and not dry_run:
                held = [(len({b for t in ca.block_table.values() for b in t}), ca.bytes_per_block)
                        for ca in cache.cache_allocators.values()]
                blocks = sum(n for n, _ in held)
                if blocks > stats["peak_kv_blocks"]:
                    stats["peak_kv_blocks"] = blocks
                    stats["peak_kv_mb"] = sum(n * b for n, b in held) / 2**20
            return ok
        cache.search_prefix_match, cache.can_store_request_tokens = search_counting, store_counting
        return processor

    manager._create_batch_processor = create_counting
    return stats


def start(model, engine: Engine, shared: bool, n: int, longest: int, max_new: int):
    """(a started manager, its counters). EOS off: every case generates the same token count."""
    from transformers import GenerationConfig

    model.set_attn_implementation(engine.attn)
    config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max_new)
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=engine_config(engine, shared, n, longest))
    stats = instrument(manager)
    manager.start()
    return manager, stats


def collect(manager, ids: list[str]) -> dict:
    """The finished outputs of these requests, by id (an engine error is raised, not hidden)."""
    outputs = {}
    while len(outputs) < len(ids):
        out = manager.get_result(timeout=600)
        if out is None:
            raise RuntimeError("the engine returned no result within 600 s")
        if out.error is not None:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
        outputs[out.request_id] = out
    return outputs


def run_case(model, prompts: list[list[int]], answers: list[int], routes, shared: bool,
             rate: float, engine: Engine) -> dict:
    """Serve the stream once (arrivals at `rate` per second, 0 = all at once); its metrics."""
    longest = max(map(len, prompts)) + max(answers)
    manager, stats = start(model, engine, shared, len(prompts), longest, max(answers))
    try:
        begin = time.perf_counter()
        for i, prompt in enumerate(prompts):
            if rate > 0:
                time.sleep(max(0.0, begin + i / rate - time.perf_counter()))
            kw = {} if routes is None else {"prism_route": routes[i]}
            manager.add_request(prompt, request_id=f"r{i}", record_timestamps=True,
                                max_new_tokens=answers[i], **kw)
        outputs = collect(manager, [f"r{i}" for i in range(len(prompts))])
        wall = time.perf_counter() - begin
    finally:
        manager.stop(block=True, timeout=60)
    ttft = [o.timestamps[0] - o.created_time for o in outputs.values()]
    gaps = [b - a for o in outputs.values() for a, b in zip(o.timestamps, o.timestamps[1:])]
    return metrics(len(prompts), sum(len(o.generated_tokens) for o in outputs.values()), wall,
                   ttft, gaps) | {"prompt_tokens": sum(map(len, prompts)), **stats}


def metrics(requests: int, tokens: int, wall: float, ttft: list[float], gaps: list[float]) -> dict:
    return {"requests": requests, "tokens": tokens, "wall_s": wall,
            "throughput_tok_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
            "tpot_p50_ms": 1e3 * percentile(gaps, 0.5) if gaps else None,
            "tpot_p99_ms": 1e3 * percentile(gaps, 0.99) if gaps else None}


def static_generate(model, prompts: list[list[int]], answers: list[int], pad_id: int,
                    batch: int = 8) -> dict:
    """Left-padded `generate` in batches of `batch`, in arrival order: a batch waits for the
    previous one and runs to its longest answer. Only each request's own answer counts."""
    from transformers import GenerationConfig, LogitsProcessorList

    model.set_attn_implementation("sdpa")
    ttft, gaps, tokens = [], [], 0
    begin = time.perf_counter()
    for lo in range(0, len(prompts), batch):
        rows, wants = prompts[lo:lo + batch], answers[lo:lo + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])       # (b, width)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        clock, steps = TokenStamps(), max(wants)
        config = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                                  pad_token_id=pad_id)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           logits_processor=LogitsProcessorList([clock]))
        for want in wants:
            ttft.append(clock.times[0] - begin)
            gaps += [b - a for a, b in zip(clock.times[:want - 1], clock.times[1:want])]
            tokens += want
    wall = time.perf_counter() - begin
    return metrics(len(prompts), tokens, wall, ttft, gaps) | {
        "prompt_tokens": sum(map(len, prompts)), "shared_prompt_tokens": 0,
        "peak_kv_blocks": None, "peak_kv_mb": None}


def sweep_grid(quick: bool) -> list[Engine]:
    """The engine settings tried on the base model (--engine-sweep)."""
    tokens, pages = ((64, 256), (32,)) if quick else ((64, 128, 256, 512, 1024), (16, 32, 128))
    return [Engine(t, p, a) for a, t, p in itertools.product(ATTNS, tokens, pages)]


def engine_sweep(model, prompts, answers, grid: list[Engine], log) -> list[dict]:
    """The base stream under each setting (prefix sharing on); rows sorted best first."""
    rows = []
    for engine in grid:
        log(f"[serving] engine sweep: {engine.label()} …")
        row = run_case(model, prompts, answers, None, True, 0.0, engine)
        rows.append({"case": "engine", **dataclasses.asdict(engine), **row})
    model.set_attn_implementation("sdpa")
    return sorted(rows, key=lambda r: -r["throughput_tok_s"])
