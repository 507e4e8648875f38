"""Context folding: a PRISM adapter against prepending the same context to every prompt.

For a context of C tokens (a persona of ≈ 200 tokens; persona + retrieved passages of 1k, 4k, and
on a GPU 16k and 32k tokens) the same questions and batch run through `model.generate` on
chat-templated, left-padded prompts as: `prompted` (the context as every prompt's system
message, base model), `prism_open` / `prism_closed` / `prism_half` (no context; the PEFT model
patched by prism_fast with a gate whose last bias is set so that it opens every row, none or
half), and `base` (no context, unpatched: the floor). Medians over interleaved rounds of time
to first token, decode tokens/s, a 128-token answer's latency (measured on a GPU; on a CPU
TTFT + 127 × the median step), prompt tokens, KV-cache bytes and peak memory (CUDA peak
allocated; CPU: resident memory sampled every 2 ms), and the ratios prism / prompted and / base.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common import PeakMemory, make_gate, peft_byte_floor
from bench.models import ADAPTER
from bench.timing import TokenStamps, rounds
from prism_fast.testing.shapes import MODELS

ANSWER_TOKENS = 128
CPU_DECODE_STEPS = 12
PERSONA_C = 0          # C = 0 in a case list stands for the persona itself (its own length)
CPU_CONTEXTS = [PERSONA_C, 1024, 4096]
GPU_CONTEXTS = [PERSONA_C, 1024, 4096, 16384, 32768]
PRISM_CASES = ("prism_open", "prism_closed", "prism_half")


@dataclass(frozen=True)
class Plan:
    """What one model runs: batches, contexts (per batch), decode steps, rounds, dtype, backend."""

    model: str                         # "smollm2-135m" (real weights) or "llama3-8b" (random)
    dtype: torch.dtype
    backend: str
    batches: tuple[int, ...]
    contexts: dict[int, tuple[int, ...]]   # batch → context lengths
    decode_steps: int
    rounds: int


def plans(gpu: bool, full: bool) -> tuple[list[Plan], list[str]]:
    """The default plans for a device, and the notes saying what is left out and why."""
    notes = []
    if gpu:
        ctx = tuple(GPU_CONTEXTS)
        return [Plan("smollm2-135m", torch.bfloat16, "triton", (1, 8), {1: ctx, 8: ctx},
                     ANSWER_TOKENS - 1, 3),
                Plan("llama3-8b", torch.bfloat16, "triton", (1, 8), {1: ctx, 8: ctx},
                     ANSWER_TOKENS - 1, 3)], notes
    if full:
        ctx = tuple(CPU_CONTEXTS)
        return [Plan("smollm2-135m", torch.float32, "torch", (1, 8), {1: ctx, 8: ctx},
                     CPU_DECODE_STEPS, 3)], notes
    notes.append("CPU default: batch 8 × 4096-token context left out (≈ 33k prompt tokens per "
                 "prefill: minutes per round on CPU); run `python -m bench --full` for it. "
                 "16k and 32k contexts and the Llama-3-8B shape run on a GPU only "
                 "(SmolLM2 has 8192 positions)")
    return [Plan("smollm2-135m", torch.float32, "torch", (1, 8),
                 {1: tuple(CPU_CONTEXTS), 8: tuple(CPU_CONTEXTS[:2])}, CPU_DECODE_STEPS, 3)], notes


# ---- measurement helpers ------------------------------------------------------------------


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys + values of one token across all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim \
        * torch.finfo(dtype).bits // 8


# ---- models and inputs ----------------------------------------------------------------------


def load(plan: Plan, device: torch.device):
    """(base model, PEFT model with PRISM's random LoRA, tokenizer) for a plan."""
    from bench.models import add_peft_adapter, build_model, smollm2_with_adapter
    from prism_fast.testing.smollm2 import load_smollm2_tokenizer

    if plan.model == "smollm2-135m":
        base, prism, tokenizer = smollm2_with_adapter(plan.dtype, device)
    else:   # random weights, SmolLM2's token ids; one copy (16 GB): PEFT's disable_adapter()
        shape = MODELS[plan.model]   # gives the base cases the unpatched model
        tokenizer = load_smollm2_tokenizer()
        base = build_model(shape, shape.layers, plan.dtype, device)
        prism = add_peft_adapter(base)
    base.config.max_position_embeddings = max(base.config.max_position_embeddings, 40_000)
    return base, prism, tokenizer


def encode(tokenizer, questions: list[str], context: str | None, device: torch.device):
    """Chat-templated prompts, left padded: {input_ids, attention_mask} [B, T]."""
    texts = []
    for q in questions:
        messages = ([{"role": "system", "content": context}] if context else []) + \
            [{"role": "user", "content": q}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True))
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


def gate_for(gate: torch.nn.Module, h: torch.Tensor, case: str) -> dict:
    """The gate's state dict with its last bias shifted so that it opens every row, none, or
    exactly half of them (h [B, H]: the official gate input of these prompts)."""
    with torch.no_grad():
        logits = gate(h.to(next(gate.parameters()).dtype)).float()     # [B, 2]
    margin = (logits[:, 1] - logits[:, 0]).sort().values                  # lora − base
    if case == "prism_open":
        shift = -margin[0].item() + 1.0
    elif case == "prism_closed":
        shift = -margin[-1].item() - 1.0
    else:
        mid = margin.shape[0] // 2
        shift = -(margin[mid - 1].item() + margin[mid].item()) / 2
    state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
    state["gate.3.bias"][1] += shift
    return state


def official_gate_input(model, enc: dict) -> torch.Tensor:
    """hidden_states[1] at the last prompt token (left padding: the last column), adapter off."""
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return out.hidden_states[1][:, -1]                                    # [B, H]


# ---- the benchmark ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    batch: int
    name: str                  # "base", a PRISM_CASES name or "prompted"
    context: int | None        # C of a prompted case (PERSONA_C: the persona)
    enc: dict                  # input_ids, attention_mask [B, T]
    gate: dict | None          # the gate's state of a PRISM case


@dataclass
class Models:
    base: object
    peft: object               # the PEFT model (its base is `base` when they share weights)
    tokenizer: object
    plan: Plan
    device: torch.device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_cases(m: Models, contexts: dict[int, str]) -> list[Case]:
    """Every case of every batch of the plan, in the order they run in each round."""
    from bench.contexts import QUESTIONS

    gate = make_gate(m.base.config.hidden_size, m.plan.dtype, m.device)
    cases = []
    for b in m.plan.batches:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(b)]
        plain = encode(m.tokenizer, questions, None, m.device)
        h = official_gate_input(m.base, plain)
        cases.append(Case(b, "base", None, plain, None))
        cases += [Case(b, name, None, plain, gate_for(gate, h, name)) for name in PRISM_CASES
                  if not (name == "prism_half" and b == 1)]
        cases += [Case(b, "prompted", c, encode(m.tokenizer, questions, contexts[c], m.device),
                       None) for c in m.plan.contexts[b]]
    return cases


def generate(m: Models, case: Case, enc: dict | None = None) -> dict:
    """One `generate` of a case: time to first token, decode step times, peak memory, open rows."""
    from transformers import LogitsProcessorList

    import prism_fast

    steps, stamps = m.plan.decode_steps, TokenStamps(m.sync)
    prism = case.gate is not None
    if prism:
        prism_fast.patch_model(m.peft, gate=case.gate, backend=m.plan.backend)
    try:
        with torch.no_grad(), PeakMemory(m.device) as mem:
            shared = m.base is m.peft.get_base_model()
            with m.peft.disable_adapter() if not prism and shared else contextlib.nullcontext():
                m.sync()
                start = time.perf_counter()
                (m.peft if prism else m.base).generate(
                    **(enc or case.enc), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                    do_sample=False, logits_processor=LogitsProcessorList([stamps]),
                    pad_token_id=m.tokenizer.pad_token_id)
                m.sync()
        routes = prism_fast.get_routes(m.peft) if prism else None
    finally:
        if prism:
            prism_fast.unpatch_model(m.peft)
    return dict(ttft_s=stamps.times[0] - start, peak=mem.peak_bytes,
                steps_s=[b - a for a, b in zip(stamps.times, stamps.times[1:])],
                open=None if routes is None else int((routes >= 0).sum()))


def case_row(plan: Plan, case: Case, runs: list[dict], c_tokens: int | None,
             per_token: int) -> dict:
    """The medians of a case's runs, as a report row."""
    measured = plan.decode_steps >= ANSWER_TOKENS - 1
    ttft = statistics.median(r["ttft_s"] for r in runs)
    step = statistics.median(s for r in runs for s in r["steps_s"])
    answer = statistics.median(r["ttft_s"] + sum(r["steps_s"]) for r in runs) if measured \
        else ttft + (ANSWER_TOKENS - 1) * step
    t_pad, b = case.enc["input_ids"].shape[1], case.batch
    opens = {r["open"] for r in runs}
    return dict(
        bench="context", model=plan.model, dtype=str(plan.dtype).replace("torch.", ""),
        backend=plan.backend, B=b, case=case.name, C=c_tokens,
        prompt_tokens=b * t_pad, real_prompt_tokens=int(case.enc["attention_mask"].sum()),
        ttft_ms=ttft * 1e3, ttft_runs_ms=[r["ttft_s"] * 1e3 for r in runs],
        step_ms=step * 1e3, decode_tok_s=b / step, answer_ms=answer * 1e3,
        answer_measured=measured, kv_bytes=b * (t_pad + ANSWER_TOKENS) * per_token,
        peak_mib=statistics.median(r["peak"] for r in runs) / 2**20,
        rounds=len(runs), decode_steps=plan.decode_steps,
        open_rows=opens.pop() if len(opens) == 1 else sorted(opens, key=str))


def run_context(plan: Plan, device: torch.device, log: Callable[[str], None], rows: list[dict],
                notes: list[str], progress: Callable | None = None) -> dict:
    """Measures one plan, appends its rows; returns facts for the report (context lengths)."""
    from bench.contexts import PERSONA, context_text

    t0 = time.monotonic()
    m = Models(*load(plan, device), plan, device)
    log(f"[context] {plan.model} loaded in {time.monotonic() - t0:.0f} s "
        f"({str(plan.dtype).replace('torch.', '')}, backend {plan.backend})")
    persona_tokens = len(m.tokenizer(PERSONA, add_special_tokens=False)["input_ids"])
    contexts = {c: PERSONA if c == PERSONA_C else context_text(m.tokenizer, c)
                for c in {c for cs in plan.contexts.values() for c in cs}}
    cases = make_cases(m, contexts)
    for case in cases[:4]:   # warm-up: first calls allocate and pick kernels
        generate(m, case, {k: v[:, -8:] for k, v in case.enc.items()})
    bar = progress(total=plan.rounds * len(cases), desc=f"context {plan.model}", unit="run") \
        if progress else None
    samples: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    interrupted = False
    try:
        rounds({i: functools.partial(generate, m, case) for i, case in enumerate(cases)},
               plan.rounds, warmup=0, out=samples,
               after_round=lambda r: bar.update(len(cases)) if bar is not None else None)
    except KeyboardInterrupt:   # keep the rounds already measured (rows say how many)
        interrupted = True
    if bar is not None:
        bar.close()
    per_token = kv_bytes_per_token(m.base.config, plan.dtype)
    new = [case_row(plan, case, runs, None if case.context is None else
                    persona_tokens if case.context == PERSONA_C else case.context, per_token)
           for case, runs in zip(cases, samples.values()) if runs]
    floor = peft_byte_floor(m.peft, ADAPTER)["floor"]
    for r in new:     # the byte floor of a decode step beside each PRISM ratio
        r["floor"] = None if r["case"] not in PRISM_CASES else \
            1.0 if r["case"] == "prism_closed" else floor
    rows += new
    expected = {"prism_open": lambda b: b, "prism_closed": lambda b: 0, "prism_half": lambda b: b // 2}
    for r in rows:
        if r["model"] == plan.model and r["case"] in expected and r["open_rows"] != \
                expected[r["case"]](r["B"]):
            notes.append(f"{plan.model} B={r['B']} {r['case']}: the gate opened {r['open_rows']} "
                         f"rows, expected {expected[r['case']](r['B'])}")
    log(f"[context] {plan.model} done in {time.monotonic() - t0:.0f} s")
    if interrupted:
        raise KeyboardInterrupt
    return dict(persona_tokens=persona_tokens)
