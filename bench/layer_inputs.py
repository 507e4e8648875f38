"""The layer benchmark's cases and inputs (bench/bench_gated_lora.py times them): `LayerCase`,
the sweep's order of cases, and one op call's prepared inputs per projection group.

M ≤ 128 is a decode batch (x [M, K], one id per row, open rows at random); larger M a prefill of
B sequences of T tokens (x [B, T, K], one id per sequence, B = max(4, M // 512)).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from bench.common import DTYPES
from prism_fast.testing.shapes import MODELS

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


def case_inputs(factory: InputFactory, case: LayerCase) -> list[GroupInputs]:
    return [factory.group(case, k, ns, bias) for k, ns, bias in MODELS[case.model].groups(case.proj)]


def check_inputs(groups: list[GroupInputs]) -> None:
    """Validate prepared inputs once, outside the timed loop (the multi-slice op skips checks)."""
    from prism_fast.kernels.gated_lora import check_gated_lora_args

    for g in groups:
        scaling = g.scaling[0] if len(g.ws) == 1 else g.scaling
        check_gated_lora_args(g.x, g.ws, g.bs, g.lora_a, g.lora_b, scaling, g.ids)
