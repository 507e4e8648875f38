"""The decode crossover, measured under continuous batching: PRISM open against a cached prompt.

A decode step of PRISM reads the adapter once for the whole batch; a prompted request reads its
own copy of the context's keys and values every step. So the prompt's per-token cost grows with
its context C and with the batch B, PRISM's does not. Here each is measured by the engine's own
decode steps: for B = 1 a stream of requests one at a time, for B = 8 eight at once; the
per-token cost is the median gap between tokens once every request of the batch has its first
token (pure decode steps, no prefill chunk in them), as a multiple of the base model's.

Prompted requests run with the engine's prefix sharing on and one request served first, so the
context is cached when the measured requests arrive (the best case for prompting).
"""

from __future__ import annotations

from bench.serving_engine import Engine, collect, percentile, start

BATCHES = (1, 8)
CPU_CONTEXTS = (200, 1024, 4096)
# Written, run only on a GPU (not wired to a GPU model builder yet): contexts and models.
GPU_ROWS = {"contexts": (200, 1024, 4096, 16384, 32768),
            "models": ("smollm2-135m fp32", "llama3-8b (random weights, bf16, Triton)")}


def decode_gaps(outputs: dict) -> list[float]:
    """Gaps between tokens after the last request of the batch got its first token."""
    settled = max(o.timestamps[0] for o in outputs.values())
    return [b - a for o in outputs.values() for a, b in zip(o.timestamps, o.timestamps[1:])
            if a >= settled]


def measure(model, prompts: list[list[int]], route: int | None, tokens: int, serial: int,
            engine: Engine) -> dict[int, float]:
    """{B: median decode gap (s)}: one warm-up request (caches a shared prefix), `serial`
    requests one at a time (B = 1), then 8 at once (B = 8)."""
    need = 1 + serial + 8
    if len(prompts) < need:
        raise ValueError(f"prompts: expected at least {need} for the crossover, got {len(prompts)}")
    longest = max(map(len, prompts)) + tokens
    manager, _ = start(model, engine, True, 8, longest, tokens)
    kw = {} if route is None else {"prism_route": route}
    gaps: dict[int, list[float]] = {1: [], 8: []}
    try:
        waves = [[0]] + [[1 + i] for i in range(serial)] + [list(range(1 + serial, need))]
        for w, wave in enumerate(waves):
            for i in wave:
                manager.add_request(prompts[i], request_id=f"x{i}", record_timestamps=True,
                                    max_new_tokens=tokens, **kw)
            outputs = collect(manager, [f"x{i}" for i in wave])
            if w > 0:
                gaps[len(wave)] += decode_gaps(outputs)
    finally:
        manager.stop(block=True, timeout=60)
    return {b: percentile(g, 0.5) for b, g in gaps.items()}


def crossover(contexts: list[int], prompt_ratio: list[float], prism_ratio: float):
    """(C where the cached prompt's per-token cost reaches PRISM's, how): linear between the
    measured contexts; None where PRISM is slower at every measured C."""
    for i, (c, r) in enumerate(zip(contexts, prompt_ratio)):
        if r >= prism_ratio:
            if i == 0:
                return c, f"≤ {c}"
            c0, r0 = contexts[i - 1], prompt_ratio[i - 1]
            at = c0 + (prism_ratio - r0) / (r - r0) * (c - c0) if r > r0 else c
            return round(at), f"≈ {round(at)}"
    return None, f"> {contexts[-1]} (PRISM slower at every measured C)"


def run_crossover(base, prism, floor: dict, prompts_for, contexts: list[int], tokens: int,
                  serial: int, engine: Engine, log) -> dict:
    """Measure base, PRISM open (no context) and the cached prompt at each C; ratios and the
    crossover at B = 1 and 8. `prompts_for(C or None)` gives the request prompts."""
    log("[serving] crossover: base …")
    base_gap = measure(base, prompts_for(None), None, tokens, serial, engine)
    log("[serving] crossover: prism_open …")
    prism_gap = measure(prism, prompts_for(None), 0, tokens, serial, engine)
    prompt_gap = {}
    for c in contexts:
        log(f"[serving] crossover: prompted_shared C={c} …")
        prompt_gap[c] = measure(base, prompts_for(c), None, tokens, serial, engine)
    out = {"contexts": list(contexts), "decode_tokens": tokens, "serial_requests": serial,
           "byte_floor": floor, "batches": {}}
    for b in BATCHES:
        prism_ratio = prism_gap[b] / base_gap[b]
        ratios = [prompt_gap[c][b] / base_gap[b] for c in contexts]
        at, text = crossover(list(contexts), ratios, prism_ratio)
        out["batches"][str(b)] = {
            "base_ms": 1e3 * base_gap[b], "prism_open_ms": 1e3 * prism_gap[b],
            "prompted_ms": [1e3 * prompt_gap[c][b] for c in contexts],
            "prism_ratio": prism_ratio, "prompted_ratio": ratios,
            "overhead_x_floor": (prism_ratio - 1) / (floor["floor"] - 1),
            "crossover": at, "crossover_text": text}
    return out


def headline(x: dict) -> str:
    """One line: the crossover at B = 1 and 8, and where PRISM is slower."""
    parts, slower = [], []
    floor = x["byte_floor"]["floor"]
    for b, r in x["batches"].items():
        parts.append(f"B = {b}: C {r['crossover_text']} (PRISM open {r['prism_ratio']:.3f}× base, "
                     f"byte floor {floor:.3f}×, overhead {r['overhead_x_floor']:.1f}× the floor's)")
        below = [c for c, p in zip(x["contexts"], r["prompted_ratio"]) if p < r["prism_ratio"]]
        if below:
            slower.append(f"B = {b} at C = {', '.join(map(str, below))}")
    text = "Decode crossover, measured side by side in this run — " + "; ".join(parts) + "."
    if slower:
        text += " PRISM is slower than the cached prompt at " + " and ".join(slower) + "."
    return text
