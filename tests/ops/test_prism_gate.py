"""prism_fast/ops/prism_gate.py: the gate entry of the routing state, both backends."""

from __future__ import annotations

import pytest
import torch

import prism_fast
from prism_fast import ops


@pytest.mark.parametrize("triton", [False, True])
def test_gate_entry(triton):
    h = torch.randn(6, 32)
    w1, b1, w2, b2 = torch.randn(64, 32), torch.randn(64), torch.randn(3, 64), torch.randn(3)
    expected = prism_fast.reference.prism_gate(h, w1, b1, w2, b2)
    assert torch.equal(ops.gate_routes(h, w1, b1, w2, b2, triton), expected)
