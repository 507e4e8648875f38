"""Gate benchmark (kernels/prism_gate.py): `prism_fast.prism_gate` against PRISM's torch gate.

Providers (baseline torch_mlp): `torch_mlp` the official nn.Sequential gate in eval mode, then
argmax − 1; `prism_fast` the fused Triton kernel (one launch); `torch_ref` the PyTorch op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bench.common import DTYPES, Budget, make_gate
from bench.timing import TimerConfig, measure
from prism_fast.testing.shapes import MODELS

PROVIDERS = ("torch_mlp", "prism_fast", "torch_ref")
GPU_ONLY = {"prism_fast"}


@dataclass(frozen=True)
class GateCase:
    model: str
    batch: int
    dtype: str


def gate_fn(provider: str, h: torch.Tensor, gate: torch.nn.Module) -> Callable[[], torch.Tensor]:
    import prism_fast

    lin1, lin2 = gate.gate[0], gate.gate[3]
    params = (lin1.weight, lin1.bias, lin2.weight, lin2.bias)   # [256, H], [256], [2, 256], [2]
    if provider == "torch_mlp":
        return lambda: (gate(h).argmax(dim=-1) - 1).to(torch.int32)
    if provider in ("prism_fast", "torch_ref"):
        backend = "triton" if provider == "prism_fast" else "torch"
        return lambda: prism_fast.prism_gate(h, *params, backend=backend)
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def run_gate_bench(models: list[str], batches: list[int], dtypes: list[str], providers: list[str],
                   modes: list[str], device: torch.device, timer: TimerConfig, budget: Budget,
                   log: Callable[[str], None], rows: list[dict]) -> None:
    """Appends one row per (model, B, provider, mode) to `rows`."""
    for model in models:
        hidden = MODELS[model].hidden
        for dtype in dtypes:
            gate = make_gate(hidden, DTYPES[dtype], device)
            for batch in batches:
                if budget.expired():
                    log("[gate] time budget spent: remaining gate cases left out")
                    return
                case = GateCase(model, batch, dtype)
                h = torch.randn(batch, hidden, dtype=DTYPES[dtype], device=device)   # [B, H]
                summary = []
                for provider in providers:
                    for mode in modes:
                        row = dict(bench="gate", **asdict(case), hidden=hidden, provider=provider,
                                   mode=mode, case_key=f"gate|{model}|B={batch}|{dtype}|{mode}")
                        try:
                            tm = measure(gate_fn(provider, h, gate), device, mode, timer)
                        except Exception as e:  # one shot on a GPU: record it, keep going
                            row["error"] = f"{type(e).__name__}: {e}"
                            rows.append(row)
                            log(f"[gate] {provider}/{mode} FAILED on {case}: {row['error']}")
                            summary.append(f"{provider}/{mode} FAILED")
                            continue
                        # Appended once measured: an interrupt never leaves a row without a time.
                        rows.append({**row, **asdict(tm)})
                        summary.append(f"{provider}/{mode} {tm.median_us:.1f}")
                log(f"[gate] {model} H={hidden} B={batch} {dtype}: " + ", ".join(summary) + " µs")
