"""Layer benchmarks (kernels/gated_lora.py): one gated-LoRA projection, or one decoder layer's
seven, per case, each provider timed against `base` in the same process:

  base        F.linear per projection (the unpatched layer).
  prism_fast  the Triton op: `gated_lora_linear(..., backend="triton")` for one projection,
              `torch.ops.prism_fast.gated_lora` (one multi-slice call) for q/k/v and gate/up.
  peft_style  base(x) + lora_B(lora_A(x)) · s, adapter 0 on every row (PEFT with one active
              adapter): independent of the open share (one row per M, share = null).
  torch_ref   the reference op (`backend="torch"`); also independent of the open share.

M ≤ 128 is a decode batch (x [M, K], one id per row, open rows at random); larger M a prefill of
B sequences of T tokens (x [B, T, K], one id per sequence, B = max(4, M // 512)).
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bench.common import DTYPES, Budget, roofline_floor
from bench.timing import TimerConfig, measure
from prism_fast.testing.shapes import MODELS

PROVIDERS = ("base", "prism_fast", "peft_style", "torch_ref")
# The case fields a provider's time does not depend on (measured once, reported with them null).
IGNORES = {"base": ("rank", "adapters", "share"), "prism_fast": (),
           "peft_style": ("adapters", "share"), "torch_ref": ("share",)}
GPU_ONLY = {"prism_fast"}  # Triton on CPU is only the interpreter: no timing to report
DECODE_MAX_M = 128
SCALE = 2.0  # α / r with α = 2r, as PRISM's r = 16, α = 32


@dataclass(frozen=True)
class LayerCase:
    model: str
    proj: str
    m: int
    share: float      # share of open rows (decode) or open sequences (prefill)
    rank: int
    adapters: int     # L
    dtype: str

    def layout(self) -> tuple[int, int]:
        """(B, T): decode batches are B = M rows of T = 1; prefills are B sequences of T."""
        if self.m <= DECODE_MAX_M:
            return self.m, 1
        b = max(4, self.m // 512)
        return (b, self.m // b) if self.m % b == 0 else (self.m, 1)

    def n_open(self) -> int:
        """Open rows (decode) or open sequences (prefill)."""
        return round(self.share * self.layout()[0])


def layer_cases(models: list[str], projs: list[str], ms: list[int], shares: list[float],
                ranks: list[int], adapters: list[int], dtypes: list[str]) -> list[LayerCase]:
    """Every combination, most important first, so that a time budget cuts the least useful.

    The headline (first dtype, r = 16, L = 1, the per-layer aggregate) comes first for every
    model, then cases that differ from it in one factor (or are single projections), and so on.
    """
    head = (dtypes[0], 16 if 16 in ranks else ranks[0], 1 if 1 in adapters else adapters[0])
    cases = [LayerCase(*c) for c in itertools.product(models, projs, ms, shares, ranks, adapters,
                                                       dtypes)]

    def priority(c: LayerCase) -> tuple:
        distance = sum(a != b for a, b in zip((c.dtype, c.rank, c.adapters), head))
        single = c.proj != "layer"
        return (distance + single, single, models.index(c.model), projs.index(c.proj),
                dtypes.index(c.dtype), ranks.index(c.rank), adapters.index(c.adapters), c.m,
                shares.index(c.share))

    return sorted(cases, key=priority)


# ---- inputs -----------------------------------------------------------------------------------


@dataclass
class GroupInputs:
    """One op call: x, its base projections and the stacked adapters of its S slices."""

    x: torch.Tensor                   # [M, K] or [B, T, K]
    ws: list[torch.Tensor]            # S × [N_s, K]
    bs: list[torch.Tensor | None]     # S × [N_s] or None
    lora_a: torch.Tensor              # [L, S·R, K]
    lora_b: torch.Tensor              # [L, ΣN_s, R]
    scaling: torch.Tensor             # [S, L] fp32
    ids: torch.Tensor                 # [M] or [B], −1 = closed
    slices: list[tuple[torch.Tensor, torch.Tensor]]  # S × (A_s [L, R, K], B_s [L, N_s, R])


class InputFactory:
    """Builds case inputs; base weights are cached per shape and dtype (they dominate memory)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.weights: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor | None]]] = {}

    def _weights(self, k: int, ns: list[int], bias: bool, dtype: torch.dtype):
        key = (k, tuple(ns), bias, dtype)
        if key not in self.weights:
            gen = dict(dtype=dtype, device=self.device)
            ws = [torch.randn(n, k, **gen) / k**0.5 for n in ns]
            bs = [torch.randn(n, **gen) if bias else None for n in ns]
            self.weights[key] = (ws, bs)
        return self.weights[key]

    def ids(self, case: LayerCase) -> torch.Tensor:
        """[B] ids: n_open random rows/sequences open, adapters assigned round-robin."""
        b, _ = case.layout()
        gen = torch.Generator().manual_seed(case.m * 1009 + round(case.share * 100))
        ids = torch.full((b,), -1, dtype=torch.int32)
        open_rows = torch.randperm(b, generator=gen)[: case.n_open()]
        ids[open_rows] = torch.arange(len(open_rows), dtype=torch.int32) % case.adapters
        return ids.to(self.device)

    def group(self, case: LayerCase, k: int, ns: list[int], bias: bool) -> GroupInputs:
        dtype = DTYPES[case.dtype]
        gen = dict(dtype=dtype, device=self.device)
        b, t = case.layout()
        x = torch.randn(b, t, k, **gen) if t > 1 else torch.randn(b, k, **gen)
        ws, bs = self._weights(k, ns, bias, dtype)
        s, r, n_adapters = len(ns), case.rank, case.adapters
        lora_a = torch.randn(n_adapters, s * r, k, **gen) / k**0.5
        lora_b = torch.randn(n_adapters, sum(ns), r, **gen) * 0.01
        scaling = torch.full((s, n_adapters), SCALE, dtype=torch.float32, device=self.device)
        offsets = [sum(ns[:i]) for i in range(s)]
        # Per-slice copies, contiguous as PEFT stores them (no strided views in the baselines).
        slices = [(lora_a[:, i * r:(i + 1) * r].contiguous(),
                   lora_b[:, o:o + n].contiguous()) for i, (o, n) in enumerate(zip(offsets, ns))]
        return GroupInputs(x, ws, bs, lora_a, lora_b, scaling, self.ids(case), slices)


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
    import prism_fast  # only the providers that need it: base and peft_style run without it

    if provider == "prism_fast":
        if len(pairs) == 1:
            w, b = pairs[0]
            scaling = g.scaling[0]                                         # [L]
            return lambda: prism_fast.gated_lora_linear(g.x, w, b, g.lora_a, g.lora_b, scaling,
                                                        g.ids, backend="triton")
        op = torch.ops.prism_fast.gated_lora
        return lambda: op(g.x, g.ws, g.bs, g.lora_a, g.lora_b, g.scaling, g.ids)
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


def case_inputs(factory: InputFactory, case: LayerCase) -> list[GroupInputs]:
    return [factory.group(case, k, ns, bias) for k, ns, bias in MODELS[case.model].groups(case.proj)]


def check_inputs(groups: list[GroupInputs]) -> None:
    """Validate prepared inputs once, outside the timed loop (the multi-slice op skips checks)."""
    from prism_fast.kernels.gated_lora import check_gated_lora_args

    for g in groups:
        scaling = g.scaling[0] if len(g.ws) == 1 else g.scaling
        check_gated_lora_args(g.x, g.ws, g.bs, g.lora_a, g.lora_b, scaling, g.ids)


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


def lora_rows(case: LayerCase, provider: str) -> tuple[int, int]:
    """(rows that get a LoRA term, adapters read) for `provider` on `case`."""
    if provider == "base":
        return 0, 0
    if provider == "prism_fast":
        _, t = case.layout()
        n_open = case.n_open()
        return n_open * t, min(case.adapters, n_open)
    adapters = 1 if provider == "peft_style" else case.adapters   # torch_ref runs every adapter
    return case.m, adapters


def timing_key(case: LayerCase, provider: str, mode: str) -> tuple:
    """What a provider's time depends on: shared rows are measured once and reported once."""
    return (provider, mode, *(None if k in IGNORES[provider] else v
                              for k, v in asdict(case).items()))


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
        b, t = case.layout()
        summary = []
        for provider, mode in todo:
            done.add(timing_key(case, provider, mode))
            row = dict(bench="layer", **asdict(case), provider=provider, mode=mode, B=b, T=t,
                       n_open=case.n_open(),
                       case_key=f"layer|{case.model}|{case.proj}|M={case.m}|{case.dtype}|{mode}")
            row.update({k: None for k in IGNORES[provider]})   # reported once, see IGNORES
            if "share" in IGNORES[provider]:
                row["n_open"] = None
            rows.append(row)
            try:
                tm = measure(case_fn(provider, groups), device, mode, timer)
            except Exception as e:  # a GPU run is one shot: record the failure, keep sweeping
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"[layer] {provider}/{mode} FAILED on {case}: {row['error']}\n"
                    + traceback.format_exc(limit=4))
                summary.append(f"{provider}/{mode} FAILED")
                continue
            n_rows, n_adapters = lora_rows(case, provider)
            nbytes, flops = work(case, n_rows, n_adapters)
            row.update(**asdict(tm), gbps=nbytes / tm.median_us / 1e3,
                       tflops=flops / tm.median_us / 1e6)
            if provider != "base":   # the floor of its ratio to base (common.roofline_floor)
                row["floor"] = roofline_floor(work(case, 0, 0), (nbytes, flops), limits)
            row["pct_peak_bw"] = 100 * row["gbps"] / limits["copy_gbps"]
            row["pct_peak_flops"] = 100 * row["tflops"] / limits["matmul_tflops"]
            summary.append(f"{provider}/{mode} {tm.median_us:.1f}")
        log(f"[layer {i + 1}/{len(cases)}] {case.model} {case.proj} M={case.m} share={case.share} "
            f"r={case.rank} L={case.adapters} {case.dtype}: " + ", ".join(summary) + " µs")
        del groups  # free this case's inputs before the next case allocates its own
    return 0
