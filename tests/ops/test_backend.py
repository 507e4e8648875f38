"""prism_fast/ops/: the one door to the kernels (each op picks its implementation there, by
backend.py's `use_triton` and `pick`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_only_ops_dispatches_to_the_kernels():
    """No module of prism_fast outside ops/ names the Triton launchers or the registered ops.
    prism_fast.tune (tuning.py, tuning_timers.py) is the one exception: it times the launchers
    themselves under forced configs on the user's GPU (a measurement, not a computation a
    model's output depends on)."""
    launchers = {"gated_lora_linear_triton", "prism_gate_triton", "add_gated_lora_",
                 "topk_distill_forward", "topk_distill_backward", "fused_base_lora_triton"}
    for path in sorted((ROOT / "prism_fast").rglob("*.py")):
        if path.relative_to(ROOT / "prism_fast").parts[0] in ("ops", "kernels") \
                or path.name in ("tuning.py", "tuning_timers.py"):
            continue
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  for a in n.names}
        assert not names & launchers, f"{path.name} calls {names & launchers}"
        assert "torch.ops.prism_fast" not in path.read_text(), path.name
