"""The kernel sweep's report (python -m bench --sweep): ratios to the baseline with the floor
beside each LoRA ratio, markdown tables, issue 4's target checks and the plot."""

from __future__ import annotations

import itertools
from pathlib import Path

from bench.bench_gated_lora import GATED, IGNORES, PATH_PROVIDERS
from bench.common import PROJECTIONS, x_floor
from bench.report import fmt, num, pyplot, save_figure, table

BASELINES = {"layer": "base", "gate": "torch_mlp"}
LAYER_ORDER = ("base", "prism_fast", "split", "fused", "coop", "fused_base", "peft_style",
               "torch_ref")
GATE_ORDER = ("torch_mlp", "prism_fast", "torch_ref")


def add_ratios(rows: list[dict]) -> None:
    """ratio = median / the baseline's median for the same case (same process, same mode)."""
    base = {r["case_key"]: r["median_us"] for r in rows
            if r.get("median_us") and r["provider"] == BASELINES.get(r["bench"])}
    for r in rows:
        b = base.get(r.get("case_key"))
        r["base_us"] = b
        r["ratio"] = r["median_us"] / b if b and r.get("median_us") else None


class LayerIndex:
    """Layer rows by what each provider's time depends on (bench_gated_lora.IGNORES)."""

    def __init__(self, rows: list[dict]):
        self.rows = [r for r in rows if r["bench"] == "layer"]
        self.by_key = {self.key(r["provider"], r["model"], r["proj"], r["m"], r["dtype"], r["mode"],
                                r["rank"], r["adapters"], r["share"]): r for r in self.rows}

    @staticmethod
    def key(provider, model, proj, m, dtype, mode, rank, adapters, share) -> tuple:
        fields = dict(rank=rank, adapters=adapters, share=share)
        return (provider, model, proj, m, dtype, mode,
                *(None if k in IGNORES[provider] else v for k, v in fields.items()))

    def get(self, provider: str, **kw) -> dict | None:
        return self.by_key.get(self.key(provider, **kw))

    def groups(self, proj_filter) -> list[tuple]:
        """(model, dtype, rank, L) combinations present, in first-seen order."""
        rows = [r for r in self.rows if proj_filter(r["proj"])]
        # The most specific providers define the groups; without them (a --providers subset),
        # peft_style (no L) or base (no rank, no L) do.
        for providers in ((*GATED, "torch_ref"), ("peft_style",), ("base",)):
            seen = {(r["model"], r["dtype"], r["rank"], r["adapters"]): None for r in rows
                    if r["provider"] in providers}
            if seen:
                return list(seen)
        return []


def layer_tables(rows: list[dict], aggregate: bool) -> str:
    idx = LayerIndex(rows)
    proj_filter = (lambda p: p == "layer") if aggregate else (lambda p: p != "layer")
    providers = [p for p in LAYER_ORDER if any(r["provider"] == p for r in idx.rows)]
    out = []
    for model, dtype, rank, n_adapters in idx.groups(proj_filter):
        sel = [r for r in idx.rows if r["model"] == model and r["dtype"] == dtype
               and proj_filter(r["proj"])]
        shares = sorted({r["share"] for r in sel if r["share"] is not None}) or [None]
        cases = sorted({(r["proj"], r["m"], r["mode"]) for r in sel},
                       key=lambda c: (PROJECTIONS.index(c[0]), c[2], c[1]))
        header = ([] if aggregate else ["proj"]) + ["M", "mode"]
        header += ["open share"] if shares != [None] else []
        header += ["base µs"] + [f"{p} ×" for p in providers if p != "base"]
        lora = next((p for p in LAYER_ORDER[1:] if p in providers), None)   # the floor's
        header += [f"{lora} floor", "overhead × floor"] if lora else []
        if "prism_fast" in providers:
            header += ["prism_fast GB/s (% peak)", "TFLOP/s (% peak)"]
        else:
            header += ["base GB/s (% peak)", "TFLOP/s (% peak)"]
        body = []
        for proj, m, mode in cases:
            for share in shares:
                kw = dict(model=model, proj=proj, m=m, dtype=dtype, mode=mode, rank=rank,
                          adapters=n_adapters, share=share)
                base = idx.get("base", **kw)
                line = ([] if aggregate else [proj]) + [str(m), mode]
                line += [fmt(share, ".2f")] if shares != [None] else []
                line.append(fmt(base.get("median_us"), ".1f") if base else "–")
                for p in providers:
                    if p != "base":
                        r = idx.get(p, **kw) or {}
                        line.append("n/a" if r.get("skipped") else "error" if r.get("error")
                                    else fmt(r.get("ratio"), ".3f"))
                if lora:
                    r = idx.get(lora, **kw)
                    floor = r.get("floor") if r else None
                    line += [fmt(floor, ".3f"), fmt(x_floor(r and r.get("ratio"), floor), ".1f")]
                main = idx.get("prism_fast" if "prism_fast" in providers else "base", **kw)
                if main and not main.get("error"):
                    line += [f"{num(main['gbps'])} ({main['pct_peak_bw']:.0f} %)",
                             f"{num(main['tflops'])} ({main['pct_peak_flops']:.0f} %)"]
                else:
                    line += ["–", "–"]
                body.append(line)
        title = ", ".join([model, dtype] + ([f"r = {rank}"] if rank else [])
                          + ([f"L = {n_adapters}"] if n_adapters else []))
        out.append(f"#### {title}\n\n" + table(header, body))
    if out and any(p in PATH_PROVIDERS for p in providers):
        out.insert(0, "split, fused, coop: F.linear, then the LoRA term by that decode path "
                   "(its config forced); fused_base: base and LoRA in one launch. n/a: not run "
                   "(the path's config is another's there, or fused_base above 64 rows).")
    return "\n\n".join(out)


def gate_table(rows: list[dict]) -> str:
    sel = [r for r in rows if r["bench"] == "gate"]
    providers = [p for p in GATE_ORDER if any(r["provider"] == p for r in sel)]
    cases = list(dict.fromkeys(r["case_key"] for r in sel))
    header = ["model", "H", "B", "dtype", "mode"] + [f"{p} µs (×)" for p in providers]
    body = []
    for key in cases:
        rs = {r["provider"]: r for r in sel if r["case_key"] == key}
        first = next(iter(rs.values()))
        line = [first["model"], str(first["hidden"]), str(first["batch"]), first["dtype"],
                first["mode"]]
        for p in providers:
            r = rs.get(p)
            if r and r.get("error"):
                line.append("error")
            else:   # a row cut short by an interrupt has no time: "–"
                line.append(f"{r['median_us']:.1f} ({fmt(r.get('ratio'), '.2f')})"
                            if r and r.get("median_us") is not None else "–")
        body.append(line)
    return table(header, body)


# ---- targets of issue 4 -----------------------------------------------------------------------


def target_checks(rows: list[dict], meta: dict) -> list[list[str]]:
    """Issue 4's targets, evaluated on this run's headline rows (CUDA-graph timing for layers)."""
    head = meta.get("headline", {})
    idx = LayerIndex(rows)
    out: list[list[str]] = []

    def check(case: str, value: float | None, target: float, detail: str = "") -> None:
        verdict = "–" if value is None else ("met" if value <= target else "missed")
        out.append([case, fmt(value, ".3f"), f"≤ {target}", verdict, detail])

    def ratios(model: str, share: float, ms) -> dict[int, float]:
        """prism_fast's per-layer ratio at each M of `ms` that was measured."""
        found = {}
        for m in ms:
            r = idx.get("prism_fast", model=model, proj="layer", m=m, dtype=head.get("dtype"),
                        mode="graph", rank=head.get("rank"), adapters=head.get("adapters"),
                        share=share)
            if r and r["ratio"]:
                found[m] = r["ratio"]
        return found

    for model in dict.fromkeys(r["model"] for r in idx.rows):

        all_m = sorted({r["m"] for r in idx.rows if r["model"] == model})
        dec = ratios(model, 1.0, [m for m in all_m if m <= 64])
        worst = max(dec, key=dec.get) if dec else None
        check(f"{model} layer decode M ≤ 64, all open", dec.get(worst), 1.10,
              f"worst at M = {worst}" if dec else "")
        pre = ratios(model, 1.0, [4096])
        check(f"{model} layer prefill M = 4096, all open", pre.get(4096), 1.05)
        closed = ratios(model, 0.0, all_m)
        worst = max(closed, key=closed.get) if closed else None
        check(f"{model} layer any M, all closed", closed.get(worst), 1.01,
              f"worst at M = {worst}" if closed else "")
        half, full = ratios(model, 0.5, all_m), ratios(model, 1.0, all_m)
        excess = {m: half[m] / full[m] for m in half if m in full}
        worst = max(excess, key=excess.get) if excess else None
        check(f"{model} layer half open vs all open (ratio of ratios)", excess.get(worst), 1.0,
              f"worst at M = {worst}" if excess else "")

    return out


def markdown(meta: dict, rows: list[dict], notes: list[str], full: bool = True) -> str:
    """The report. full=False leaves out the per-projection tables (for printing)."""
    cpu = not meta["gpu"]
    limits = meta.get("limits") or {}
    parts = [f"# prism_fast benchmarks: {meta['device']}, {meta['date']}"]
    if cpu:
        parts.append(f"> **{meta['label']}.** Small shapes, PyTorch providers only; timed with "
                     "time.perf_counter. Use these numbers to check the harness, never as speed "
                     "results.")
    parts.append(
        f"torch {meta['torch']} · triton {meta['triton']} · transformers {meta['transformers']} · "
        f"peft {meta['peft']} · git {meta['git_sha']}{' (dirty)' if meta['git_dirty'] else ''} · "
        f"sweep: {meta['sweep']} · {meta['timing']}")
    if limits:
        parts.append(f"Measured device limits: copy {limits['copy_gbps']:.0f} GB/s, "
                     f"{limits['matmul_dtype']} matmul ({limits['matmul_n']}³) "
                     f"{limits['matmul_tflops']:.1f} TFLOP/s. Ratios are to `base` in the same "
                     "process; × < 1 is faster than base. GB/s and TFLOP/s count the useful "
                     "work (operands once, LoRA on the rows that get it); % of peak can pass 100 "
                     "where operands stay in cache (CUDA-graph timing does not flush L2; CPU "
                     "caches).")
    if any(r["bench"] == "layer" for r in rows):
        parts.append("## Per decoder layer (q/k/v multi-slice + o + gate/up multi-slice + down)\n\n"
                     "peft_style and torch_ref compute the LoRA term for every row, so their "
                     "times do not depend on the open share (the same value on each line). "
                     "floor: the roofline time of its work (LoRA included) over base's, with the "
                     "limits above: the byte floor where memory-bound (decode), the FLOP floor "
                     "where compute-bound; overhead × floor = (× − 1) / (floor − 1).\n\n"
                     + layer_tables(rows, aggregate=True))
        if full and any(r["bench"] == "layer" and r["proj"] != "layer" for r in rows):
            parts.append("## Per projection\n\n" + layer_tables(rows, aggregate=False))
    if any(r["bench"] == "gate" for r in rows):
        parts.append("## PRISM gate (× = ratio to torch_mlp)\n\n" + gate_table(rows))
    if not cpu:
        checks = target_checks(rows, meta)
        if checks:
            parts.append("## Issue 4 targets (layers: CUDA-graph timing, headline dtype/rank/L)\n\n"
                         + table(["case", "measured ×", "target", "verdict", "detail"], checks))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


# ---- plot -------------------------------------------------------------------------------------


def plot(meta: dict, rows: list[dict], path: Path) -> bool:
    """Ratio to base vs M for the per-layer rows of the headline group; False if nothing to plot."""
    plt = pyplot()
    head = meta.get("headline", {})
    idx = LayerIndex(rows)
    sel = [r for r in idx.rows if r["proj"] == "layer" and r["dtype"] == head.get("dtype")
           and r["provider"] != "base" and r["ratio"]
           and r["rank"] == head.get("rank") and r["adapters"] in (head.get("adapters"), None)]
    models = list(dict.fromkeys(r["model"] for r in sel))
    modes = list(dict.fromkeys(r["mode"] for r in sel))
    if not sel:
        return False
    fig, axes = plt.subplots(len(models), len(modes), figsize=(6 * len(modes), 4.2 * len(models)),
                             squeeze=False)
    for (i, model), (j, mode) in itertools.product(enumerate(models), enumerate(modes)):
        ax = axes[i][j]
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in sel:
            if (r["model"], r["mode"]) == (model, mode):
                label = r["provider"] + (f" open {r['share']:.2f}" if r["share"] is not None else "")
                lines.setdefault(label, []).append((r["m"], r["ratio"]))
        for label, pts in sorted(lines.items()):
            pts.sort()
            style = "-" if label.startswith("prism_fast") else "--"   # baselines dashed
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                    label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("time / base F.linear")
        ax.set_title(f"{model} per layer, {mode}", fontsize=10)
        ax.legend(fontsize=7)
    title = (f"{meta['device']} {meta['date']}\n{head.get('dtype')}, r = {head.get('rank')}, "
             f"L = {head.get('adapters')}, ratio to base F.linear in the same process")
    if not meta["gpu"]:
        title += f"\n{meta['label']}"
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
