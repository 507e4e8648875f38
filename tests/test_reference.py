"""The reference against the SPEC formula written out row by row in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prism_fast import reference
from tests.helpers import make_ids, make_lora


def rowwise(x, w, b, a, bb, s, ids):
    """y[i] = F.linear(x[i], W, b) + [id ≥ 0] · s[id] · (x[i] A[id]ᵀ) B[id]ᵀ, one row at a time."""
    out = []
    for xi, i in zip(x.reshape(-1, x.shape[-1]).double(), ids.reshape(-1).tolist()):
        yi = F.linear(xi, w.double(), None if b is None else b.double())
        if i >= 0:
            yi = yi + s[i].double() * (bb[i].double() @ (a[i].double() @ xi))
        out.append(yi)
    if not out:
        return x.new_empty(*x.shape[:-1], w.shape[0]).double()
    return torch.stack(out).reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (0, 24)])
def test_matches_rowwise_float64(shape):
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(10, 24, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    a, bb, s = make_lora(3, 4, 24, 10, torch.float64)
    ids = make_ids(shape[:-1], 3)
    y = reference.gated_lora_linear(x, w, b, a, bb, s, ids)
    torch.testing.assert_close(y, rowwise(x, w, b, a, bb, s, ids), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_closed_rows_bit_exact_and_per_sequence_ids(dtype):
    x = torch.randn(3, 4, 16, dtype=dtype)
    w = torch.randn(8, 16, dtype=dtype)
    a, bb, s = make_lora(2, 4, 16, 8, dtype)
    seq = torch.tensor([1, -1, 0])
    y = reference.gated_lora_linear(x, w, None, a, bb, s, seq)
    assert torch.equal(y, reference.gated_lora_linear(x, w, None, a, bb, s,
                                                      seq[:, None].expand(3, 4)))
    assert torch.equal(y[1], F.linear(x[1], w))
    assert not torch.equal(y[0], F.linear(x[0], w))


def test_gate_formula():
    h = torch.randn(7, 12)
    w1, b1, w2, b2 = torch.randn(6, 12), torch.randn(6), torch.randn(3, 6), torch.randn(3)
    hidden = 0.5 * (h @ w1.T + b1) * (1 + torch.erf((h @ w1.T + b1) / 2**0.5))
    expect = (hidden @ w2.T + b2).argmax(-1) - 1
    routes = reference.prism_gate(h, w1, b1, w2, b2)
    assert routes.dtype == torch.int32 and torch.equal(routes.long(), expect)
