"""torch.library registration: opcheck (schema, fake implementation, autograd registration)."""

from __future__ import annotations

import pytest
import torch

import prism_fast  # noqa: F401  its ops module registers torch.ops.prism_fast.*
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


def _op_args(n_slices=3, rank=4):
    ns = [16, 8, 8][:n_slices]
    x = torch.randn(2, 5, 24)
    ws = [torch.randn(n, 24) for n in ns]
    bs = [None] * n_slices
    a = torch.randn(2, n_slices * rank, 24)
    bb = torch.randn(2, sum(ns), rank)
    s = torch.rand(n_slices, 2)
    return [x, ws, bs, a, bb, s, torch.tensor([0, -1])]


GATED_BAD = [
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, "x: expected dtype"),
    (lambda a: a.__setitem__(1, a[1][:2]), ValueError, "biases: expected 2 entries"),
    (lambda a: a[1].__setitem__(1, a[1][1][:, :7]), ValueError, r"weight: expected shape \(N, 24\)"),
    (lambda a: a.__setitem__(3, a[3][:, :10]), ValueError, "lora_a: expected dim 1 = 3·R"),
    (lambda a: a.__setitem__(4, a[4][:, :20]), ValueError, r"lora_b: expected shape \(2, 32, 4\)"),
    (lambda a: a.__setitem__(4, a[4].half()), TypeError, "lora_b: expected dtype torch.float32"),
    (lambda a: a.__setitem__(5, a[5][:1]), ValueError, r"scaling: expected shape \(3, 2\)"),
    (lambda a: a.__setitem__(6, torch.tensor([0, 1, 0])), ValueError, "adapter_ids: expected shape"),
    # the per-slice rank is named, not the stacked size (3 · 256 = 768)
    (lambda a: (a.__setitem__(3, torch.randn(2, 768, 24)), a.__setitem__(4, torch.randn(2, 32, 256))),
     ValueError, r"expected rank 1 to 128 per projection, got rank 256 \(dim 1 = 768"),
]


@pytest.mark.parametrize("mutate,exc,msg", GATED_BAD)
def test_registered_gated_lora_checks_its_arguments(mutate, exc, msg):
    """torch.ops.prism_fast.gated_lora is callable by anyone: it refuses bad arguments itself,
    with the public op's messages, in eager calls and while tracing (its fake implementation)."""
    args = _op_args()
    torch.ops.prism_fast.gated_lora(*args)                  # the unmutated call is fine
    mutate(args)
    with pytest.raises(exc, match=msg):
        torch.ops.prism_fast.gated_lora(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc, match=msg):
        torch.ops.prism_fast.gated_lora(*args)


def test_registered_gated_lora_closes_out_of_range_ids():
    """Id values are the kernels' business (closed when out of range), not a host check."""
    args = _op_args(n_slices=1)
    base = torch.nn.functional.linear(args[0], args[1][0])
    args[6] = torch.tensor([5, -3])
    assert torch.equal(torch.ops.prism_fast.gated_lora(*args)[0], base)


def test_registered_prism_gate_checks_its_arguments():
    h, w1, b1, w2, b2 = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8), \
        torch.randn(2, 8), torch.randn(2)
    torch.ops.prism_fast.prism_gate(h, w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"w1: expected shape \(D, 16\)"):
        torch.ops.prism_fast.prism_gate(h, w1[:, :5], b1, w2, b2)
    with pytest.raises(TypeError, match="b2: expected dtype"):
        torch.ops.prism_fast.prism_gate(h, w1, b1, w2, b2.half())
