"""The context-folding benchmark's report (python -m bench): ratios, the headline, markdown
tables and the plot against the context length."""

from __future__ import annotations

from bench.bench_context import PRISM_CASES
from bench.common import x_floor
from bench.report import fmt, pyplot, save_figure, table

ORDER = ("base", *PRISM_CASES, "prompted")


def add_ratios(rows: list[dict]) -> None:
    """prism / prompted at the same model, B and C; anything / base at the same model and B."""
    sel = [r for r in rows if r["bench"] == "context"]
    base = {(r["model"], r["B"]): r for r in sel if r["case"] == "base"}
    for r in sel:
        b = base.get((r["model"], r["B"]))
        if b is not None:
            r["vs_base"] = {k: r[k] / b[k] for k in ("ttft_ms", "step_ms", "answer_ms",
                                                     "kv_bytes")}


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
                  "× base (TTFT / answer)", "decode step × base", "byte floor",
                  "overhead × floor"]
        body = []
        for r in sorted(rs, key=lambda r: (r["B"], ORDER.index(r["case"]), r["C"] or 0)):
            vb = r.get("vs_base") or {}
            body.append([str(r["B"]), r["case"], "–" if r["C"] is None else str(r["C"]),
                         str(r["prompt_tokens"]), f"{r['ttft_ms']:.1f}",
                         f"{r['decode_tok_s']:.1f}", f"{r['answer_ms']:.0f}",
                         f"{r['kv_bytes'] / 2**20:.1f}", f"{r['peak_mib']:.0f}",
                         f"{fmt(vb.get('ttft_ms'))} / {fmt(vb.get('answer_ms'))}",
                         fmt(vb.get("step_ms"), ".3f"), fmt(r.get("floor"), ".3f"),
                         fmt(x_floor(vb.get("step_ms"), r.get("floor")), ".1f")])
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
                 "unpatched (the floor). byte floor: 1 + one adapter's bytes / the weights' "
                 "bytes, what an open route must add to a decode step (1 when closed); "
                 "overhead × floor = (decode step × base − 1) / (floor − 1). KV cache: keys and "
                 "values held at the end of a 128-token answer. Peak MiB: "
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
