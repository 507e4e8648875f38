"""End to end (the sweep's e2e section): a Llama-shaped model in eager Hugging Face with PRISM's
random adapter (bench.models.add_peft_adapter) and a gate that always opens, so that the
gate-routed providers do the forced all-open route's LoRA work and add only the routing.

Providers (baseline base): `base`; `persona_prompt` (base with a 230-token persona prompt);
`prism_fast_gate` (single-pass routing, prefill); `prism_fast_open` / `_closed` / `_half` (routes
forced); `peft` (unmerged, adapter on); `peft_adapter_names` (PEFT's per-row mixed batch);
`two_pass` (the official routing: a gate forward, the decision on the host, then PEFT; prefill
only). Prefill is one forward keeping the last token's logits; a decode step is one token
against a cache of `tokens` context, rewound after each call. On a GPU, base and the prism_fast
route mixes also run a decode step captured as a CUDA graph and replayed (mode "graph").
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.common import Budget, make_gate, peft_byte_floor
from bench.models import ADAPTER, add_peft_adapter, load_model
from bench.timing import TimerConfig, Timing, measure, quantiles_us
from prism_fast.testing.shapes import MODELS

PERSONA_TOKENS = 230
PROVIDERS = ("base", "persona_prompt", "prism_fast_gate", "prism_fast_open", "prism_fast_closed",
             "prism_fast_half", "peft", "peft_adapter_names", "two_pass")
NO_ADAPTER = {"base", "persona_prompt"}     # rows without a LoRA floor
GRAPHED = {"base", "prism_fast_open", "prism_fast_closed", "prism_fast_half"}
GRAPH_WARMUP, GRAPH_STEPS = 4, 40


@dataclass(frozen=True)
class E2ECase:
    kind: str     # "prefill" or "decode"
    batch: int
    tokens: int   # prompt length (prefill) or context length (decode)


GPU_CASES = [E2ECase("decode", 1, 512), E2ECase("decode", 32, 512), E2ECase("prefill", 1, 2048),
             E2ECase("prefill", 8, 512)]
CPU_CASES = [E2ECase("decode", 1, 128), E2ECase("decode", 8, 128), E2ECase("prefill", 1, 256),
             E2ECase("prefill", 8, 64)]


class Forward:
    """Version-proof keyword names for the forward (transformers 5 renamed the cache argument)."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.keep1 = {keep: 1} if keep else {}

    def cache_of(self, out):
        return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


def rewind(cache, length: int) -> None:
    """Drop the tokens a decode step appended. A negative argument means "remove that many" both
    in transformers 4 (crop(max_length)) and 5 (crop(tokens_to_remove), which refuses > 0)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def case_fn(call: Callable, fwd: Forward, case: E2ECase, ids: torch.Tensor,
            extra: dict) -> Callable[[], object]:
    """The timed callable: one prefill, or one decode step after an untimed prefill."""
    if case.kind == "prefill":
        return lambda: call(input_ids=ids, use_cache=True, **fwd.keep1, **extra)
    out = call(input_ids=ids, use_cache=True, **fwd.keep1, **extra)
    cache = fwd.cache_of(out)
    context = cache.get_seq_length()
    tok = ids[:, -1:]                                                     # [B, 1]

    def step() -> None:
        call(input_ids=tok, use_cache=True, **{fwd.cache_kw: cache}, **extra)
        rewind(cache, context)

    return step


def graphed_decode(model, fwd: Forward, case: E2ECase, ids: torch.Tensor,
                   routes: list[int] | None = None) -> Timing:
    """Per-token time of one decode step captured as a CUDA graph (by hand: torch.compile's
    backends copy every weight per replay or compile too long) and replayed against a
    StaticCache, each replay appending one token at the static `pos`. `routes`: the prism_fast
    model's forced routes; its first warm-up step opens every route so that the LoRA kernels
    are loaded before the capture (loading inside it fails)."""
    from transformers import StaticCache

    import prism_fast

    b, t = ids.shape
    warm = 2                                     # eager steps before capture (side stream)
    cache = StaticCache(config=model.config,
                        max_cache_len=t + warm + GRAPH_WARMUP + GRAPH_STEPS + 8)
    positions = torch.arange(t, device=ids.device)[None].expand(b, t)
    out = model(input_ids=ids, position_ids=positions, use_cache=True, **{fwd.cache_kw: cache},
                **fwd.keep1)                                           # eager prefill
    tok = out.logits[:, -1:].argmax(-1)                                # [B, 1], static input
    pos = torch.full((b, 1), t, device=ids.device)                     # [B, 1], static input

    def step():
        return model(input_ids=tok, position_ids=pos, use_cache=True, **{fwd.cache_kw: cache},
                     **fwd.keep1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warm):
            if routes is not None:
                prism_fast.set_routes(model, [0] * b if i == 0 else routes)
            step()
            pos.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for i in range(GRAPH_WARMUP + GRAPH_STEPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        pos.add_(1)
        if i >= GRAPH_WARMUP:
            times.append((start, end))
    torch.cuda.synchronize()
    del graph
    return quantiles_us([s.elapsed_time(e) * 1e-3 for s, e in times])


@dataclass
class Timer:
    """Times one provider on one case into a row (or its error), within the time budget."""

    model_name: str
    layers: int
    fwd: Forward
    providers: list[str]
    device: torch.device
    timer: TimerConfig
    budget: Budget
    log: Callable[[str], None]
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)   # left out by the time budget
    floor: float | None = None     # the adapter's byte floor, once it exists (common.peft_byte_floor)

    def __call__(self, provider: str, case: E2ECase, call: Callable, ids: torch.Tensor,
                 extra: dict | None = None, mode: str = "eager",
                 routes: list[int] | None = None) -> None:
        if provider not in self.providers:
            return
        if self.budget.expired():
            self.skipped.append(f"{provider} {case.kind} B={case.batch} {mode}")
            return
        gpu = self.device.type == "cuda"
        what = f"{case.kind} B={case.batch} T={case.tokens}"
        row = dict(bench="e2e", model=self.model_name, layers=self.layers, kind=case.kind,
                   B=case.batch, T=case.tokens, provider=provider, mode=mode,
                   case_key=f"e2e|{case.kind}|B={case.batch}|T={case.tokens}|{mode}",
                   floor=None if provider in NO_ADAPTER else
                   1.0 if provider == "prism_fast_closed" else self.floor)
        try:
            with torch.no_grad():
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                tm = graphed_decode(call, self.fwd, case, ids, routes) if mode == "graph" else \
                    measure(case_fn(call, self.fwd, case, ids, extra or {}), self.device, "eager",
                            self.timer)
            tokens = case.batch * (case.tokens if case.kind == "prefill" else 1)
            row.update(median_us=tm.median_us, p20_us=tm.p20_us, p80_us=tm.p80_us,
                       tok_per_s=tokens / tm.median_us * 1e6)
            if gpu:
                row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            self.log(f"[e2e] {what} {provider}: {tm.median_us / 1e3:.2f} ms")
        except Exception as e:  # one broken provider must not cost the others their rows
            row["error"] = f"{type(e).__name__}: {e}"
            self.log(f"[e2e] {provider} {what} FAILED: {row['error']}\n"
                     f"{traceback.format_exc(limit=3)}")
        self.rows.append(row)


def half(b: int) -> list[int]:
    return [0 if i % 2 == 0 else -1 for i in range(b)]                  # open, closed, …


def run_e2e(model_name: str, layers: int | None, cases: list[E2ECase], providers: list[str],
            device: torch.device, dtype: torch.dtype, timer: TimerConfig, budget: Budget,
            log: Callable[[str], None], rows: list[dict], notes: list[str]) -> None:
    """Appends rows and notes as it goes. Never raises for a missing optional piece (transformers,
    peft) or a failing provider: it notes, and skips what depends on it."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:   # name the real exception: a missing package or a broken import
        missing = isinstance(e, ModuleNotFoundError) and e.name in ("peft", "transformers")
        notes.append(f"e2e skipped: {type(e).__name__}: {e}"
                     + (" (install the [hf] extra)" if missing else ""))
        return
    shape = MODELS[model_name]
    model, layers = load_model(model_name, layers, dtype, device)   # SmolLM2: real, own depth
    timed = Timer(model_name, layers, Forward(model), providers, device, timer, budget, log, rows)
    gate = make_gate(shape.hidden, dtype, device, always_open=True)
    vocab_gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = {c: torch.randint(0, shape.vocab, (c.batch, c.tokens), generator=vocab_gen).to(device)
              for c in cases}
    persona = torch.randint(0, shape.vocab, (1, PERSONA_TOKENS), generator=vocab_gen).to(device)
    log(f"[e2e] {model_name}, {layers} layers, {str(dtype).replace('torch.', '')}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters on {device}")
    for case in cases:                       # 1. the model before any adapter
        ids = inputs[case]
        timed("base", case, model, ids)
        timed("persona_prompt", case, model,
              torch.cat([persona.expand(case.batch, -1), ids], dim=1))   # [B, 230 + T]
        if device.type == "cuda" and case.kind == "decode":
            timed("base", case, model, ids, mode="graph")
    peft_model = add_peft_adapter(model, layers)
    timed.floor = peft_byte_floor(peft_model, ADAPTER)
    if any(p.startswith("prism_fast") for p in providers):   # 2. prism_fast on the PEFT model
        prism_section(timed, peft_model, gate.state_dict(), cases, inputs, notes)
    for case in cases:                       # 3. PEFT: unmerged, per-row names, two passes
        b, ids = case.batch, inputs[case]
        timed("peft", case, peft_model, ids)
        names = [ADAPTER if r == 0 else "__base__" for r in half(b)]
        timed("peft_adapter_names", case, peft_model, ids, {"adapter_names": names})
        if case.kind == "prefill":
            timed("two_pass", case, two_pass(peft_model, gate, timed.fwd), ids)
    notes.append("e2e: two_pass and prism_fast_gate are prefill-only rows: their decode steps are "
                 "those of peft / prism_fast_open (the decision is kept from the prefill)")
    if timed.skipped:
        notes.append(f"e2e: time budget spent, left out: {', '.join(timed.skipped)}")
    del peft_model, model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prism_section(timed: Timer, peft_model, gate_state: dict, cases: list[E2ECase],
                  inputs: dict, notes: list[str]) -> None:
    """prism_fast.patch_model on the PEFT model (the drop-in case): the gate deciding in the
    prefill, then forced routes (open, closed, half), graphed on a GPU; unpatched after."""
    import prism_fast

    gpu = timed.device.type == "cuda"
    if not gpu:
        notes.append("e2e: on CPU the prism_fast providers run patch_model's torch backend "
                     "(its fast torch path, prism_fast/ops/gated_lora_torch.py), not the "
                     "Triton kernels")
    try:
        prism_fast.patch_model(peft_model, gate=gate_state)
    except Exception as e:
        notes.append(f"e2e: prism_fast.patch_model failed ({type(e).__name__}: {e}): "
                     "prism_fast end-to-end providers skipped")
        timed.log(notes[-1])
        return
    for case in cases:
        b, ids = case.batch, inputs[case]
        if case.kind == "prefill":
            prism_fast.set_routes(peft_model, None)    # the gate decides, in the forward
            timed("prism_fast_gate", case, peft_model, ids)
        for provider, routes in (("prism_fast_open", [0] * b), ("prism_fast_closed", [-1] * b),
                                 ("prism_fast_half", half(b) if b > 1 else None)):
            if routes is None:
                continue
            prism_fast.set_routes(peft_model, torch.tensor(routes, dtype=torch.int32,
                                                           device=timed.device))
            timed(provider, case, peft_model, ids)
            if gpu and case.kind == "decode" and provider in GRAPHED:
                timed(provider, case, peft_model, ids, mode="graph", routes=routes)
    prism_fast.unpatch_model(peft_model)


def two_pass(peft_model, gate: torch.nn.Module, fwd: Forward) -> Callable:
    """PRISM's reference routing (prism/run_gated_lora.py): a base forward for the gate, the
    decision on the host, then the generation forward with the adapter on or off per row."""

    def call(input_ids: torch.Tensor, **kwargs):
        with peft_model.disable_adapter():
            out = peft_model(input_ids=input_ids, output_hidden_states=True, use_cache=False,
                             **fwd.keep1)
        decision = gate(out.hidden_states[1][:, -1]).argmax(dim=-1).tolist()   # host sync
        if all(decision):
            return peft_model(input_ids=input_ids, **kwargs)
        if not any(decision):
            with peft_model.disable_adapter():
                return peft_model(input_ids=input_ids, **kwargs)
        names = [ADAPTER if d else "__base__" for d in decision]
        return peft_model(input_ids=input_ids, adapter_names=names, **kwargs)

    return call
