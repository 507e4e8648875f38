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
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common import MODELS, PeakMemory, make_gate
from bench.report import fmt, pyplot, save_figure, table
from bench.timing import TokenStamps

ANSWER_TOKENS = 128
CPU_DECODE_STEPS = 12
PERSONA_C = 0          # C = 0 in a case list stands for the persona itself (its own length)
CPU_CONTEXTS = [PERSONA_C, 1024, 4096]
GPU_CONTEXTS = [PERSONA_C, 1024, 4096, 16384, 32768]
PRISM_CASES = ("prism_open", "prism_closed", "prism_half")
ORDER = ("base", *PRISM_CASES, "prompted")


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


def run_context(plan: Plan, device: torch.device, log: Callable[[str], None], rows: list[dict],
                notes: list[str], progress: Callable | None = None) -> dict:
    """Measures one plan, appends its rows; returns facts for the report (context lengths)."""
    import prism_fast
    from bench.contexts import PERSONA, QUESTIONS, context_text

    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    t0 = time.monotonic()
    base, peft_model, tokenizer = load(plan, device)
    shared = base is peft_model.get_base_model()
    log(f"[context] {plan.model} loaded in {time.monotonic() - t0:.0f} s "
        f"({str(plan.dtype).replace('torch.', '')}, backend {plan.backend})")
    persona_tokens = len(tokenizer(PERSONA, add_special_tokens=False)["input_ids"])
    contexts = {c: PERSONA if c == PERSONA_C else context_text(tokenizer, c)
                for c in {c for cs in plan.contexts.values() for c in cs}}
    length = {c: persona_tokens if c == PERSONA_C else c for c in contexts}
    gate = make_gate(base.config.hidden_size, plan.dtype, device)
    per_token = kv_bytes_per_token(base.config, plan.dtype)

    # Every case of every batch: (batch, name, C, inputs, gate state or None).
    cases = []
    for b in plan.batches:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(b)]
        plain = encode(tokenizer, questions, None, device)
        h = official_gate_input(base, plain)
        cases.append((b, "base", None, plain, None))
        for name in PRISM_CASES:
            if name == "prism_half" and b == 1:
                continue
            cases.append((b, name, None, plain, gate_for(gate, h, name)))
        for c in plan.contexts[b]:
            cases.append((b, "prompted", c, encode(tokenizer, questions, contexts[c], device), None))

    def generate(b, name, enc, gate_state) -> dict:
        steps = plan.decode_steps
        stamps = TokenStamps(sync)
        from transformers import LogitsProcessorList

        kwargs = dict(**enc, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                      logits_processor=LogitsProcessorList([stamps]),
                      pad_token_id=tokenizer.pad_token_id)
        if gate_state is not None:
            prism_fast.patch_model(peft_model, gate=gate_state, backend=plan.backend)
        try:
            with torch.no_grad(), PeakMemory(device) as mem:
                if gate_state is None and shared:
                    ctx = peft_model.disable_adapter()
                else:
                    ctx = contextlib.nullcontext()
                model = peft_model if gate_state is not None else base
                with ctx:
                    sync()
                    start = time.perf_counter()
                    model.generate(**kwargs)
                    sync()
            routes = prism_fast.get_routes(peft_model) if gate_state is not None else None
        finally:
            if gate_state is not None:
                prism_fast.unpatch_model(peft_model)
        step_s = [b_ - a_ for a_, b_ in zip(stamps.times, stamps.times[1:])]
        return dict(ttft_s=stamps.times[0] - start, steps_s=step_s, peak=mem.peak_bytes,
                    open=None if routes is None else int((routes >= 0).sum()))

    # Warm-up (first calls allocate and pick kernels), then interleaved rounds.
    for b, name, _, enc, gate_state in cases[:4]:
        generate(b, name, {k: v[:, -8:] for k, v in enc.items()}, gate_state)
    samples: dict[int, list[dict]] = {i: [] for i in range(len(cases))}
    total = plan.rounds * len(cases)
    bar = progress(total=total, desc=f"context {plan.model}", unit="run") if progress else None
    interrupted = False
    try:
        for _ in range(plan.rounds):
            for i, (b, name, _, enc, gate_state) in enumerate(cases):
                samples[i].append(generate(b, name, enc, gate_state))
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:   # keep the rounds already measured (rows say how many)
        interrupted = True
    if bar is not None:
        bar.close()

    for i, (b, name, c, enc, _) in enumerate(cases):
        runs = samples[i]
        if not runs:
            continue
        ttft = statistics.median(r["ttft_s"] for r in runs)
        step = statistics.median(s for r in runs for s in r["steps_s"])
        answer = statistics.median(r["ttft_s"] + sum(r["steps_s"]) for r in runs) \
            if plan.decode_steps >= ANSWER_TOKENS - 1 else ttft + (ANSWER_TOKENS - 1) * step
        t_pad = enc["input_ids"].shape[1]
        opens = {r["open"] for r in runs}
        rows.append(dict(
            bench="context", model=plan.model, dtype=str(plan.dtype).replace("torch.", ""),
            backend=plan.backend, B=b, case=name, C=None if c is None else length[c],
            prompt_tokens=b * t_pad, real_prompt_tokens=int(enc["attention_mask"].sum()),
            ttft_ms=ttft * 1e3, ttft_runs_ms=[r["ttft_s"] * 1e3 for r in runs],
            step_ms=step * 1e3, decode_tok_s=b / step,
            answer_ms=answer * 1e3, answer_measured=plan.decode_steps >= ANSWER_TOKENS - 1,
            kv_bytes=b * (t_pad + ANSWER_TOKENS) * per_token,
            peak_mib=statistics.median(r["peak"] for r in runs) / 2**20,
            rounds=len(runs), decode_steps=plan.decode_steps,
            open_rows=opens.pop() if len(opens) == 1 else sorted(opens, key=str)))
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


def add_ratios(rows: list[dict]) -> None:
    """prism / prompted at the same model, B and C; anything / base at the same model and B."""
    sel = [r for r in rows if r["bench"] == "context"]
    base = {(r["model"], r["B"]): r for r in sel if r["case"] == "base"}
    for r in sel:
        b = base.get((r["model"], r["B"]))
        if b is not None:
            r["vs_base"] = {k: r[k] / b[k] for k in ("ttft_ms", "answer_ms", "kv_bytes")}


def comparisons(rows: list[dict]) -> list[dict]:
    """One entry per (model, B, C, prism case): prism / prompted ratios."""
    sel = [r for r in rows if r["bench"] == "context"]
    out = []
    for p in (r for r in sel if r["case"] == "prompted"):
        for q in (r for r in sel if r["case"] in PRISM_CASES and r["model"] == p["model"]
                  and r["B"] == p["B"]):
            out.append(dict(model=p["model"], B=p["B"], C=p["C"], case=q["case"],
                            ttft=q["ttft_ms"] / p["ttft_ms"], answer=q["answer_ms"] / p["answer_ms"],
                            decode=q["decode_tok_s"] / p["decode_tok_s"],
                            kv=q["kv_bytes"] / p["kv_bytes"],
                            tokens=q["prompt_tokens"] / p["prompt_tokens"]))
    return out


# ---- report ---------------------------------------------------------------------------------


def headline(rows: list[dict]) -> str | None:
    """The sentence a PRISM user wants: persona folded into an adapter vs prepended, gate open."""
    comps = [c for c in comparisons(rows) if c["case"] == "prism_open"]
    if not comps:
        return None
    shortest = min(c["C"] for c in comps)
    best_b = max(c["B"] for c in comps if c["C"] == shortest)
    c = next(c for c in comps if c["C"] == shortest and c["B"] == best_b)
    return (f"a persona of {c['C']} tokens folded into an adapter makes first tokens "
            f"{1 / c['ttft']:.1f}× faster and the KV cache {100 * (1 - c['kv']):.0f} % smaller "
            f"at batch {c['B']} ({c['model']}, gate open for every row; a 128-token answer "
            f"{1 / c['answer']:.2f}× faster)")


def markdown(meta: dict, rows: list[dict], notes: list[str]) -> str:
    label = meta["label"]
    sel = [r for r in rows if r["bench"] == "context"]
    parts = [f"# Context folding: PRISM adapter vs prepended context — {meta['device']}, "
             f"{meta['date']}" + ("" if meta["gpu"] else f" ({label})")]
    line = headline(rows)
    if line:
        parts.append(f"**Headline ({'GPU' if meta['gpu'] else 'CPU'}):** {line}.")
    parts.append(
        f"torch {meta['torch']} · transformers {meta['transformers']} · peft {meta['peft']} · "
        f"git {meta['git_sha'][:12]}{' (dirty)' if meta['git_dirty'] else ''} · "
        f"{meta['threads']} threads · medians of interleaved rounds (time.perf_counter"
        f"{', CUDA synchronised' if meta['gpu'] else ''}) · {meta['elapsed_s']:.0f} s in all")
    for model in dict.fromkeys(r["model"] for r in sel):
        rs = [r for r in sel if r["model"] == model]
        first = rs[0]
        answer = "measured" if first["answer_measured"] else \
            f"TTFT + 127 × median step, {first['decode_steps']} steps decoded per run"
        header = ["B", "case", "context C", "prompt tokens", "TTFT ms", "decode tok/s",
                  f"128-token answer ms ({answer})", "KV cache MiB", "peak MiB",
                  "× base (TTFT / answer)"]
        body = []
        for r in sorted(rs, key=lambda r: (r["B"], ORDER.index(r["case"]), r["C"] or 0)):
            vb = r.get("vs_base") or {}
            body.append([str(r["B"]), r["case"], "–" if r["C"] is None else str(r["C"]),
                         str(r["prompt_tokens"]), f"{r['ttft_ms']:.1f}",
                         f"{r['decode_tok_s']:.1f}", f"{r['answer_ms']:.0f}",
                         f"{r['kv_bytes'] / 2**20:.1f}", f"{r['peak_mib']:.0f}",
                         f"{fmt(vb.get('ttft_ms'))} / {fmt(vb.get('answer_ms'))}"])
        parts.append(f"## {model} ({first['dtype']}, backend {first['backend']}, "
                     f"{first['rounds']} rounds) — {label if not meta['gpu'] else 'GPU'}\n\n"
                     + table(header, body))
        comps = [c for c in comparisons(rows) if c["model"] == model]
        body = [[str(c["B"]), str(c["C"]), c["case"], f"{c['ttft']:.3f}", f"{c['answer']:.3f}",
                 f"{c['decode']:.2f}", f"{c['kv']:.3f}", f"{c['tokens']:.3f}"] for c in comps]
        parts.append(f"### {model}: PRISM / prompted (same B and C; < 1 = PRISM smaller or "
                     f"faster; decode is a throughput ratio, > 1 = PRISM faster)\n\n"
                     + table(["B", "context C", "PRISM case", "TTFT", "128-token answer",
                               "decode tok/s", "KV cache", "prompt tokens"], body))
    parts.append("Cases: `prompted` = the context as the system message of every prompt, base "
                 "model; `prism_*` = no context, the patched model (rank-16 adapter) with its gate "
                 "deciding in the forward (open for all rows / none / half); `base` = no context, "
                 "unpatched (the floor). KV cache: keys and values held at the end of a 128-token "
                 "answer. Peak MiB: "
                 + ("CUDA peak allocated above the start of the run." if meta["gpu"] else
                    "peak resident memory (RSS, sampled every 2 ms) above its level at the start "
                    "of the run (freed memory handed back first with malloc_trim)."))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


def plot(meta: dict, rows: list[dict], path) -> bool:
    """Per model: time to first token, 128-token answer latency and KV cache against C (log x),
    prompted per batch as lines, PRISM (gate open) and the base floor as flat lines."""
    plt = pyplot()
    sel = [r for r in rows if r["bench"] == "context"]
    models = list(dict.fromkeys(r["model"] for r in sel))
    if not models:
        return False
    metrics = [("ttft_ms", "time to first token (ms)"),
               ("answer_ms", "128-token answer latency (ms)"),
               ("kv_bytes", "KV cache at the end (MiB)")]
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.6 * len(models)), squeeze=False)
    colors = {1: "tab:blue", 8: "tab:orange", 32: "tab:green"}
    for i, model in enumerate(models):
        rs = [r for r in sel if r["model"] == model]
        cs = sorted({r["C"] for r in rs if r["case"] == "prompted"})
        for j, (key, ylabel) in enumerate(metrics):
            ax = axes[i][j]
            scale = 1 / 2**20 if key == "kv_bytes" else 1.0
            for b in sorted({r["B"] for r in rs}):
                color = colors.get(b)
                pts = sorted((r["C"], r[key] * scale) for r in rs
                             if r["case"] == "prompted" and r["B"] == b)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=color,
                        label=f"prompted (context in the prompt), B={b}")
                for case, style, name in (("prism_open", "--", "PRISM adapter, gate open"),
                                          ("base", ":", "base, no context (floor)")):
                    r = next((r for r in rs if r["case"] == case and r["B"] == b), None)
                    if r is not None and cs:
                        ax.plot([cs[0], cs[-1]], [r[key] * scale] * 2, style, color=color,
                                lw=2 if case == "prism_open" else 1.2, label=f"{name}, B={b}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(cs, [str(c) for c in cs])
            ax.minorticks_off()
            ax.set_xlabel("context length C (tokens, log scale)")
            ax.set_ylabel(ylabel + ", log scale")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{ylabel.split(' (')[0]}: {model}", fontsize=10)
            if j == 0:
                ax.legend(fontsize=7)
    where = "GPU" if meta["gpu"] else "CPU"
    fig.suptitle(f"{where} — {meta['device']}, {meta['date']}: a context folded into a PRISM "
                 f"adapter vs the same context prepended to every prompt\n(medians; PRISM and "
                 f"base do not depend on C: flat lines)"
                 + ("" if meta["gpu"] else f" — {meta['label']}"), fontsize=10)
    return save_figure(fig, path)
