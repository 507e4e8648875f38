"""torch.library registration: opcheck (schema, fake implementation, autograd registration)."""

from __future__ import annotations

import pytest
import torch

import prism_fast.kernels  # noqa: F401  registers torch.ops.prism_fast.*
from tests.helpers import make_ids, make_lora

TESTS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,ns,per_seq", [((5, 24), [16], False), ((2, 7, 24), [16, 8, 8], True),
                                              ((70, 24), [16, 8], False)])
def test_opcheck_gated_lora(shape, ns, per_seq, dtype):
    x = torch.randn(shape, dtype=dtype)
    ws = [torch.randn(n, 24, dtype=dtype) for n in ns]
    bs = [torch.randn(n, dtype=dtype) for n in ns]
    a, _, s = make_lora(2, 4 * len(ns), 24, 1, dtype)
    bb = torch.randn(2, sum(ns), 4, dtype=dtype)
    ids = make_ids(shape[:1] if per_seq else shape[:-1], 2)
    scaling = s if len(ns) == 1 else s[None].expand(len(ns), 2).contiguous()
    torch.library.opcheck(torch.ops.prism_fast.gated_lora.default,
                          (x, ws, bs, a, bb, scaling, ids), test_utils=TESTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b", [1, 9])
def test_opcheck_prism_gate(b, dtype):
    args = [torch.randn(b, 32), torch.randn(16, 32), torch.randn(16), torch.randn(3, 16),
            torch.randn(3)]
    torch.library.opcheck(torch.ops.prism_fast.prism_gate.default,
                          tuple(t.to(dtype) for t in args), test_utils=TESTS)
