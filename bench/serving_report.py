"""The serving benchmark's report: markdown tables, the headline, a plot against C."""

from __future__ import annotations

from pathlib import Path

from bench.report import fmt, pyplot, save_figure, table
from bench.serving_crossover import GPU_ROWS, headline

HEAD = ["case", "C", "tok/s", "× base", "TTFT p50 ms", "TTFT p99 ms", "tok p50 ms", "tok p99 ms",
        "prompt tok", "shared tok", "peak KV blocks", "peak KV MB"]


def stream_table(rows: list[dict]) -> str:
    base = next((r["throughput_tok_s"] for r in rows if r["case"] == "base"), None)
    return table(HEAD, [[
        r["case"], str(r.get("context") or "–"), f"{r['throughput_tok_s']:.1f}",
        f"{r['throughput_tok_s'] / base:.2f}" if base else "–",
        fmt(r["ttft_p50_ms"], ".0f"), fmt(r["ttft_p99_ms"], ".0f"), fmt(r["tpot_p50_ms"], ".1f"),
        fmt(r["tpot_p99_ms"], ".1f"), str(r["prompt_tokens"]), str(r["shared_prompt_tokens"] or 0),
        fmt(r["peak_kv_blocks"], "d"), fmt(r["peak_kv_mb"], ".1f")] for r in rows])


def crossover_table(x: dict) -> str:
    floor = x["byte_floor"]
    head = ["B", "base ms/tok", "PRISM open × base", "byte floor", "overhead ÷ floor's",
            *(f"prompt C = {c} × base" for c in x["contexts"]), "crossover C"]
    body = [[b, f"{r['base_ms']:.1f}", f"{r['prism_ratio']:.3f}", f"{floor['floor']:.3f}",
             f"{r['overhead_x_floor']:.1f}×", *(f"{p:.3f}" for p in r["prompted_ratio"]),
             r["crossover_text"]] for b, r in x["batches"].items()]
    return table(head, body) + (
        f"\n\nByte floor: adapter {floor['adapter_mb']:.1f} MB read once per step over the "
        f"base weights' {floor['base_mb']:.0f} MB = {floor['floor']:.3f}×; overhead ÷ floor's "
        "= (PRISM ratio − 1) / (floor − 1). Per-token cost: median gap between tokens once "
        f"every request of the batch decodes ({x['decode_tokens']} tokens per request; B = 1: "
        f"{x['serial_requests']} requests one at a time; B = 8: eight at once), the prompt's "
        "context cached by the engine's prefix sharing before the measured requests.")


def sweep_table(rows: list[dict]) -> str:
    head = ["attention", "tokens per step", "page", "tok/s", "TTFT p50 ms", "tok p50 ms"]
    return table(head, [[r["attn"], str(r["max_batch_tokens"]), str(r["page_size"]),
                         f"{r['throughput_tok_s']:.1f}", fmt(r["ttft_p50_ms"], ".0f"),
                         fmt(r["tpot_p50_ms"], ".1f")] for r in rows])


def markdown(meta: dict, rows: list[dict], cross: dict | None, sweep: list[dict]) -> str:
    lines = [f"# Serving under continuous batching ({meta['device']})", ""]
    if cross:
        lines += [f"**{headline(cross)}**", ""]
    lines += [f"{meta['model']}, {meta['requests']} requests, answers {meta['answers']} tokens "
              f"(cycled), arrival rate {meta['rate'] or 'all at once'}, engine: {meta['engine']}, "
              f"{meta['date']}, {meta['elapsed_s']:.0f} s, load average {meta['load_average']}; "
              f"the stream's cases in {meta.get('rounds', 1)} interleaved round(s), medians.",
              "", "## The stream", "", stream_table(rows), "",
              "`static_generate`: left-padded `generate` in batches of 8 in arrival order (a batch "
              "runs to its longest answer; only each request's own answer is counted). Peak KV "
              "blocks: distinct blocks held by live requests (shared blocks once)."]
    if cross:
        lines += ["", "## Decode crossover: PRISM open against the cached prompt", "",
                  crossover_table(cross)]
    if sweep:
        lines += ["", "## Engine settings (base model, same stream, prefix sharing on), best first",
                  "", sweep_table(sweep)]
    lines += ["", f"GPU rows (configured, not run on a CPU): contexts "
              f"{', '.join(map(str, GPU_ROWS['contexts']))}; models {'; '.join(GPU_ROWS['models'])}."]
    return "\n".join(lines) + "\n"


def plot(cross: dict, path: Path) -> bool:
    """Decode per-token cost × base against C, B = 1 and 8."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    floor = cross["byte_floor"]["floor"]
    for (b, r), color in zip(cross["batches"].items(), ("C0", "C1")):
        ax.plot(cross["contexts"], r["prompted_ratio"], "o-", color=color,
                label=f"cached prompt, B = {b}")
        ax.axhline(r["prism_ratio"], color=color, ls="--", label=f"PRISM open, B = {b}")
    ax.axhline(floor, color="grey", ls=":", label=f"byte floor {floor:.3f}×")
    ax.set(xscale="log", xlabel="context C (tokens)", ylabel="decode per-token cost × base",
           title="Decode crossover under continuous batching (CPU)")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)
