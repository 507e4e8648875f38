"""The end-to-end benchmark's report (python -m bench --e2e): what the models read, ratios to
base with the byte floor and the goal beside each, and the markdown."""

from __future__ import annotations

from bench import common, report
from bench.models import ADAPTER
from bench.report import fmt

ORDER = ("base", "persona_prompt", "prism_open", "prism_merged", "prism_half", "prism_closed",
         "prism_gate", "peft", "peft_adapter_names", "two_pass")
PRISM_OPEN = {"prism_open", "prism_merged", "prism_half", "prism_gate"}   # one adapter read
PEFT = {"peft", "peft_adapter_names", "two_pass"}
CPU_GOALS = {("decode", 1): 1.06, ("decode", 8): 1.05, ("prefill", 1): 1.08}   # issue 18's
CLOSED_GOAL = 1.01


def goal(provider: str, kind: str, batch: int, mode: str, gpu: bool) -> float | None:
    """The goal of a ratio: issue 18's on CPU (open routes), issue 4's on a GPU."""
    if provider == "prism_closed":
        return CLOSED_GOAL
    if provider in ("prism_open", "prism_merged") and not gpu:
        return CPU_GOALS.get((kind, batch))
    if not gpu or provider not in ("prism_open", "prism_half"):
        return None
    if kind == "prefill":
        return 1.05 if provider == "prism_open" else None
    return 1.10 if mode == "graph" and provider == "prism_open" else 1.15


def model_meta(ms, model_name: str) -> dict:
    """Layers, dtype, the byte floors (prism_fast's stacked adapter; PEFT's own, which keeps
    LoRA in fp32 on a bf16 model), the open path and the extra bytes of the torch path."""
    peft = common.peft_byte_floor(ms.peft, ADAPTER)
    meta = dict(layers=ms.layers, dtype=str(next(ms.base.parameters()).dtype).split(".")[-1],
                floor=peft, peft_floor=peft["floor"], model_name=model_name)
    if ms.patched is not None:
        groups = common.patched_groups(ms.patched)
        meta["floor"] = common.patched_byte_floor(ms.base, ms.patched)
        fused = sum(getattr(g, "fused", None) is not None for g in groups)
        meta["open_path"] = (f"one base + shrink GEMM in {fused} of {len(groups)} groups" if fused
                             else "the split path")
        meta["prepared_bytes"] = sum(
            getattr(getattr(g, a, None), "extra_bytes", 0) for g in groups
            for a in ("_prepared", "fused"))   # torch path: scaled fp32 Bᵀ, A in the fused base
    if ms.merged is not None:
        meta["merged_bytes"] = sum(g.merged.extra_bytes
                                   for g in common.patched_groups(ms.merged))
    return meta


def add_ratios(rows: list[dict], floor: dict, gpu: bool, peft_floor: float) -> None:
    """ratio = provider / base (same case and mode); per-round ratios give the spread; the
    floor of each provider's ratio (prism: one stacked adapter, closed 1, PEFT: its own) and
    the overhead as a multiple of it; the goal."""
    base = {(r["kind"], r["B"], r["mode"]): r for r in rows if r["provider"] == "base"}
    for r in rows:
        b = base.get((r["kind"], r["B"], r["mode"]))
        if b is None:
            continue
        r["ratio"] = r["median_ms"] / b["median_ms"]
        per = [x / y for x, y in zip(r["round_medians_ms"], b["round_medians_ms"])]
        r["round_ratio_min"], r["round_ratio_max"] = min(per), max(per)
        p = r["provider"]
        r["floor"] = (floor["floor"] if p in PRISM_OPEN else 1.0 if p == "prism_closed"
                      else peft_floor if p in PEFT else None)
        r["x_floor"] = common.x_floor(r["ratio"], r["floor"])
        r["goal"] = goal(p, r["kind"], r["B"], r["mode"], gpu)


def table(rows: list[dict]) -> str:
    cases = sorted({(r["kind"], r["B"], r["mode"]) for r in rows},
                   key=lambda c: (c[0] != "decode", c[2] != "eager", c[1]))
    body = []
    for kind, b, mode in cases:
        for r in sorted((r for r in rows if (r["kind"], r["B"], r["mode"]) == (kind, b, mode)),
                        key=lambda r: ORDER.index(r["provider"])):
            t = r["T"] + (230 if r["provider"] == "persona_prompt" else 0)
            spread = (f"{r['round_ratio_min']:.3f}…{r['round_ratio_max']:.3f}"
                      if "round_ratio_min" in r else "–")
            ratio = fmt(r.get("ratio"), ".3f")
            body.append([kind, str(b), str(t), mode, r["provider"], f"{r['median_ms']:.2f}",
                         f"**{ratio}**" if r["provider"] in PRISM_OPEN else ratio, spread,
                         fmt(r.get("floor"), ".4f"), fmt(r.get("x_floor"), ".1f"),
                         fmt(r.get("goal"), "")])
    return report.table(["case", "B", "T", "mode", "provider", "ms", "× base", "per-round ×",
                         "byte floor", "overhead × floor", "goal"], body)


def markdown(meta: dict, rows: list[dict]) -> str:
    f = meta["floor"]
    routing = [f"prefill B = {r['B']}: prism_gate − prism_open = "
               f"{r['ratio'] - o['ratio']:+.3f} × base (issue 4's goal ≤ 0.01)"
               for r in rows if r["provider"] == "prism_gate" and r.get("ratio")
               for o in rows if o["provider"] == "prism_open" and o.get("ratio")
               and (o["kind"], o["B"], o["mode"]) == (r["kind"], r["B"], r["mode"])]
    parts = [
        f"# End to end against the byte floor: {meta['model_name']}, {meta['layers']} layers, "
        f"{meta['dtype']} — {meta['label']}\n",
        f"{meta['device']}; {'torch.compile' if meta['compile'] else 'eager Hugging Face'}; "
        f"prism_fast all-open calls: {meta.get('open_path', '–')}; {meta['threads']} threads; "
        f"load average {meta['load_before']} before, {meta['load_after']} after; "
        f"{meta['rounds']} interleaved rounds × {meta['steps']} decode steps (1 prefill) per "
        f"provider; medians of all samples. torch {meta['torch']}, git {meta['git_sha'][:9]}"
        f"{' (dirty)' if meta['git_dirty'] else ''}.\n",
        f"Byte floor: {f['adapter_bytes'] / 1e6:.1f} MB of adapter"
        f"{' (' + str(f['groups']) + ' groups)' if 'groups' in f else ''} over "
        f"{f['weight_bytes'] / 1e6:.1f} MB of weights read per forward = **{f['floor']:.4f}×** "
        f"(the same at every B: the adapter is read once per batch; PEFT's own adapter: "
        f"{meta['peft_floor']:.4f}×). Overhead × floor = (× − 1) / (floor − 1).\n",
        table(rows) + "\n"]
    if meta.get("prepared_bytes"):
        parts.append(f"The torch path's prepared operands (scaled fp32 Bᵀ, adapter 0's A in the "
                     f"fused base buffers) hold {meta['prepared_bytes'] / 1e6:.1f} MB more.\n")
    if "merged_bytes" in meta:
        parts.append(f"prism_merged: a copy patched with `merge_open=True`, all open; its "
                     f"merged weights hold {meta['merged_bytes'] / 1e6:.1f} MB.\n")
    if any(r["mode"] == "graph" for r in rows):
        parts.append(f"Graph rows replay a decode step against a StaticCache that each replay "
                     f"extends: their attention spans T + {(meta['rounds'] + 1) * meta['steps']}"
                     f" + 10 positions, not T.\n")
    parts += [f"- {line}" for line in routing]
    if meta.get("stopped"):
        parts.append(f"\n**{meta['stopped']}.**")
    return "\n".join(parts) + "\n"
