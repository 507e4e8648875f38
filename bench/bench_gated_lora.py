"""Layer benchmarks (kernels/gated_lora.py): one gated-LoRA projection, or one decoder layer's
seven, per case (bench/layer_inputs.py), each provider timed against `base` in the same process:

  base        F.linear per projection (the unpatched layer).
  prism_fast  the Triton op: `gated_lora_linear(..., backend="triton")` for one projection,
              `torch.ops.prism_fast.gated_lora` (one multi-slice call) for q/k/v and gate/up.
  split, fused, coop
              F.linear per slice, then the LoRA term by that decode path, its config forced,
              through the launcher a patched layer uses: what `prism_fast.tune` times
              (prism_fast.tuning_timers.group_runner). Above 64 rows every path is split.
  fused_base  the opt-in fused base + LoRA kernel (kernels/fused_base_lora.py): the whole
              projection in one launch, base included (its own rounding); ≤ 64 rows.
  peft_style  base(x) + lora_B(lora_A(x)) · s, adapter 0 on every row (PEFT with one active
              adapter): independent of the open share (one row per M, share = null).
  torch_ref   the reference op (`backend="torch"`); also independent of the open share.

Each provider doing the gated work (GATED) is checked once per case against torch_ref before it
is timed (`check_providers`); a decode path that would repeat another's time, or cannot run on
the case, gets a row with the reason instead of a time (`skip_reason`).
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F

import prism_fast
from bench.common import DTYPES, Budget, roofline_floor
from bench.layer_inputs import (  # noqa: F401  (re-exported: the sweep's and tests' names)
    SCALE,
    GroupInputs,
    InputFactory,
    LayerCase,
    case_inputs,
    check_inputs,
    layer_cases,
)
from bench.timing import TimerConfig, measure
from prism_fast import tuning, tuning_timers
from prism_fast.kernels.gated_lora import FUSED_MAX_ROWS, PATHS, device_key
from prism_fast.testing.shapes import MODELS
from prism_fast.tuning_timers import FUSED_BASE

PATH_PROVIDERS = (*PATHS, FUSED_BASE)   # split, fused, coop (kernels/gated_lora.py), fused_base
PROVIDERS = ("base", "prism_fast", *PATH_PROVIDERS, "peft_style", "torch_ref")
# The sweep's default: the decode paths answer a question of their own (--providers names them).
DEFAULT_PROVIDERS = ("base", "prism_fast", "peft_style", "torch_ref")
GATED = ("prism_fast", *PATH_PROVIDERS)   # LoRA on the open rows only: torch_ref's output
# The case fields a provider's time does not depend on (measured once, reported with them null).
IGNORES = {"base": ("rank", "adapters", "share"), **{p: () for p in GATED},
           "peft_style": ("adapters", "share"), "torch_ref": ("share",)}
GPU_ONLY = set(GATED)  # Triton on CPU is only the interpreter: no timing to report
# check_providers' bound on lora_error, and the output rounding it allows for (a few units in
# the last place of the output's dtype: two roundings of base + LoRA, on top of the LoRA term)
TOLERANCE = 0.1   # a quarter-wrong LoRA term reads ≥ 0.18 (interpreter, tiny layer, bf16)
ROUNDING = {"bf16": 2.0**-6, "fp16": 2.0**-9, "fp32": 2.0**-16}


# ---- providers --------------------------------------------------------------------------------


def provider_fn(provider: str, g: GroupInputs) -> Callable[[], object]:
    """A no-argument callable running one op call of `provider` on prepared inputs."""
    pairs = list(zip(g.ws, g.bs))
    if provider == "base":
        return lambda: [F.linear(g.x, w, b) for w, b in pairs]
    if provider == "peft_style":
        lora = [(a[0], bb[0]) for a, bb in g.slices]                       # adapter 0: [R, K], [N, R]
        return lambda: [F.linear(g.x, w, b) + F.linear(F.linear(g.x, a), bb) * SCALE
                        for (w, b), (a, bb) in zip(pairs, lora)]
    if provider == "prism_fast":
        if len(pairs) == 1:
            w, b = pairs[0]
            scaling = g.scaling[0]                                         # [L]
            return lambda: prism_fast.gated_lora_linear(g.x, w, b, g.lora_a, g.lora_b, scaling,
                                                        g.ids, backend="triton")
        op = torch.ops.prism_fast.gated_lora
        return lambda: op(g.x, g.ws, g.bs, g.lora_a, g.lora_b, g.scaling, g.ids)
    if provider in PATH_PROVIDERS:
        path = provider if provider == FUSED_BASE else tuning_timers.LINEAR + provider
        return tuning_timers.group_runner(path, g.x, g.ws, g.bs, g.lora_a, g.lora_b, g.scaling,
                                          g.ids)
    if provider == "torch_ref":
        return lambda: [prism_fast.gated_lora_linear(g.x, w, b, a, bb, g.scaling[i], g.ids,
                                                     backend="torch")
                        for i, ((w, b), (a, bb)) in enumerate(zip(pairs, g.slices))]
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def case_fn(provider: str, groups: list[GroupInputs]) -> Callable[[], None]:
    fns = [provider_fn(provider, g) for g in groups]

    def run() -> None:
        for fn in fns:
            fn()

    return run


def skip_reason(provider: str, groups: list[GroupInputs]) -> str | None:
    """Why `provider` gets no time on this case, or None. fused_base takes decode batches only;
    a decode path whose config is an earlier path's in every group (prism_fast.tuning's
    candidates: above 64 rows split's only; coop's where its grid fits one program per SM)
    would only repeat that path's time."""
    x = groups[0].x
    m = x.numel() // x.shape[-1]
    if provider == FUSED_BASE and m > FUSED_MAX_ROWS:
        return f"skipped: fused_base takes at most {FUSED_MAX_ROWS} rows, the case has {m}"
    if provider not in PATHS:
        return None
    name, sms = device_key(x.device)
    shapes = [(g.x.shape[-1], tuple(w.shape[0] for w in g.ws), g.lora_a.shape[1] // len(g.ws),
               str(g.lora_a.dtype).removeprefix("torch."), str(g.x.dtype).removeprefix("torch."))
              for g in groups]            # tuning's Shape: K, the widths, R, the dtypes' names
    if any(provider in tuning.candidates(shape, m, name, sms) for shape in shapes):
        return None
    why = (f"above {FUSED_MAX_ROWS} rows every path is split" if m > FUSED_MAX_ROWS
           else "its grid does not fit one program per SM: it falls back to split")
    return f"skipped: {provider}'s config is an earlier path's in every group ({why})"


def case_output(provider: str, groups: list[GroupInputs]) -> list[torch.Tensor]:
    """Every output of one call of `provider` on the case, by group and slice."""
    out: list[torch.Tensor] = []
    for g in groups:
        y = provider_fn(provider, g)()
        out += y if isinstance(y, list) else [y]
    return out


def distance(xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None) -> float:
    """‖xs − ys‖ (‖xs‖ without ys) over a whole output, every slice of every group, in fp32."""
    return math.sqrt(sum(float((a.float() - (0 if ys is None else ys[i].float())).square().sum())
                         for i, a in enumerate(xs)))


def relative_error(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """‖got − ref‖ / ‖ref‖ over the whole output."""
    norm = distance(ref)
    return distance(got, ref) / norm if norm else math.inf


def lora_error(got: list[torch.Tensor], ref: list[torch.Tensor], base: list[torch.Tensor],
               dtype: str) -> float:
    """‖got − ref‖ over the LoRA term's size, ‖ref − base‖, plus the output rounding the dtype
    allows (ROUNDING · ‖ref‖): at 2e-2 of the whole bf16 output a LoRA term a tenth of it
    could be a quarter wrong; all closed, got must equal ref."""
    scale = distance(ref, base) + ROUNDING[dtype] * distance(ref)
    diff = distance(got, ref)
    return diff / scale if scale else (0.0 if diff == 0 else math.inf)


def check_providers(providers: list[str], groups: list[GroupInputs], dtype: str
                    ) -> dict[str, str]:
    """Once per case, outside the timed loop: each GATED provider's output against torch_ref's
    (lora_error); {provider: its row's error} for those above TOLERANCE or failing to run."""
    checked = [p for p in providers if p in GATED]
    if not checked:
        return {}
    try:
        ref = case_output("torch_ref", groups)
        base = case_output("base", groups)
    except Exception as e:   # nothing to check against: none passes
        return {p: f"reference (torch_ref) failed: {type(e).__name__}: {e}" for p in checked}
    errors = {}
    for p in checked:
        try:
            err = lora_error(case_output(p, groups), ref, base, dtype)
        except Exception as e:   # recorded in its row; the other providers still run
            errors[p] = f"{type(e).__name__}: {e}"
            continue
        if not err <= TOLERANCE:     # NaN fails too
            errors[p] = f"relative error of the LoRA term {err:.3g} > {TOLERANCE:g} against torch_ref"
    return errors


# ---- accounting -------------------------------------------------------------------------------


def work(case: LayerCase, lora_rows: int, adapters_used: int) -> tuple[float, float]:
    """(bytes, FLOPs) of the useful work: x, weights and outputs once; LoRA on `lora_rows` rows.

    A model of the minimum traffic, the same for every provider doing the same work, so GB/s
    and TFLOP/s compare providers fairly (the fp32 intermediate of the kernels is not counted).
    """
    e = DTYPES[case.dtype].itemsize
    m, r = case.m, case.rank
    nbytes = flops = 0.0
    for k, ns, bias in MODELS[case.model].groups(case.proj):
        n = sum(ns)
        nbytes += e * (m * k + n * k + m * n + (n if bias else 0))
        flops += 2.0 * m * k * n
        if lora_rows:
            nbytes += e * adapters_used * (len(ns) * r * k + n * r)
            flops += 2.0 * lora_rows * r * (len(ns) * k + n)
    return nbytes, flops


def group_byte_floor(model: str, group: str, m: int, rank: int = 16) -> float:
    """A group's bytes with one adapter's A and B over its base bytes (x, W, y) at M rows, bf16,
    every row open: the floor of a decode path's ratio to base (decode is memory-bound)."""
    case = LayerCase(model, group, m, 1.0, rank, 1, "bf16")
    return work(case, m, 1)[0] / work(case, 0, 0)[0]


def lora_rows(case: LayerCase, provider: str) -> tuple[int, int]:
    """(rows that get a LoRA term, adapters read) for `provider` on `case`."""
    if provider == "base":
        return 0, 0
    if provider in GATED:
        _, t = case.layout()
        n_open = case.n_open()
        return n_open * t, min(case.adapters, n_open)
    adapters = 1 if provider == "peft_style" else case.adapters   # torch_ref runs every adapter
    return case.m, adapters


def timing_key(case: LayerCase, provider: str, mode: str) -> tuple:
    """What a provider's time depends on: shared rows are measured once and reported once."""
    return (provider, mode, *(None if k in IGNORES[provider] else v
                              for k, v in asdict(case).items()))


# ---- the sweep --------------------------------------------------------------------------------


def layer_row(case: LayerCase, provider: str, mode: str) -> dict:
    """A row's case fields, those `provider`'s time does not depend on null (see IGNORES)."""
    b, t = case.layout()
    row = dict(bench="layer", **asdict(case), provider=provider, mode=mode, B=b, T=t,
               n_open=case.n_open(),
               case_key=f"layer|{case.model}|{case.proj}|M={case.m}|{case.dtype}|{mode}")
    row.update({k: None for k in IGNORES[provider]})
    if "share" in IGNORES[provider]:
        row["n_open"] = None
    return row


def measure_row(row: dict, case: LayerCase, fn: Callable[[], None], device: torch.device,
                timer: TimerConfig, limits: dict, log: Callable[[str], None]) -> str:
    """Time `fn` into `row`: its quantiles, rates of useful work and floor, or its error.
    Returns the log's word for it."""
    provider, mode = row["provider"], row["mode"]
    try:
        tm = measure(fn, device, mode, timer)
    except Exception as e:  # a GPU run is one shot: record the failure, keep sweeping
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"[layer] {provider}/{mode} FAILED on {case}: {row['error']}\n"
            + traceback.format_exc(limit=4))
        return f"{provider}/{mode} FAILED"
    nbytes, flops = work(case, *lora_rows(case, provider))
    row.update(**asdict(tm), gbps=nbytes / tm.median_us / 1e3, tflops=flops / tm.median_us / 1e6)
    if provider != "base":   # the floor of its ratio to base (common.roofline_floor)
        row["floor"] = roofline_floor(work(case, 0, 0), (nbytes, flops), limits)
    row["pct_peak_bw"] = 100 * row["gbps"] / limits["copy_gbps"]
    row["pct_peak_flops"] = 100 * row["tflops"] / limits["matmul_tflops"]
    return f"{provider}/{mode} {tm.median_us:.1f}"


def run_layer_sweep(cases: list[LayerCase], providers: list[str], modes: list[str],
                    device: torch.device, timer: TimerConfig, limits: dict, budget: Budget,
                    log: Callable[[str], None], rows: list[dict]) -> int:
    """Time every (case, provider, mode) not timed yet; stop cleanly when the budget runs out.

    Appends to `rows` as it goes (an interrupted run keeps what it measured); returns the number
    of cases the budget left out.
    """
    factory = InputFactory(device)
    done: set[tuple] = set()
    for i, case in enumerate(cases):
        if budget.expired():
            log(f"[layer] time budget spent: {len(cases) - i} of {len(cases)} cases left out")
            return len(cases) - i
        todo = [(p, mode) for p in providers for mode in modes
                if timing_key(case, p, mode) not in done]
        if not todo:
            continue
        groups = case_inputs(factory, case)
        check_inputs(groups)
        names = list(dict.fromkeys(p for p, _ in todo))
        skipped = {p: why for p in names if (why := skip_reason(p, groups))}
        failed = check_providers([p for p in names if p not in skipped], groups, case.dtype)
        summary = []
        for provider, mode in todo:
            done.add(timing_key(case, provider, mode))
            row = layer_row(case, provider, mode)
            rows.append(row)
            if provider in skipped or provider in failed:   # a row with the reason, no time
                row["error"] = skipped.get(provider) or failed[provider]
                row["skipped"] = provider in skipped
                summary.append(f"{provider}/{mode} "
                               + ("skipped" if row["skipped"] else f"FAILED ({row['error']})"))
                continue
            summary.append(measure_row(row, case, case_fn(provider, groups), device, timer,
                                       limits, log))
        log(f"[layer {i + 1}/{len(cases)}] {case.model} {case.proj} M={case.m} share={case.share} "
            f"r={case.rank} L={case.adapters} {case.dtype}: " + ", ".join(summary) + " µs")
        del groups  # free this case's inputs before the next case allocates its own
    return 0
