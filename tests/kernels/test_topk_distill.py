"""topk_distill: Triton kernel (interpreter on CPU) and torch path vs the reference, and the
reference vs the official formula (full logits, gather, kl_div batchmean · T²)."""

import pytest
import torch
import torch.nn.functional as F

from prism_fast import reference, topk_distill_loss
from tests.tolerances import REL_TOL, rel_err


def _inputs(n, k, h, v, dtype, bias=False, dup=False):
    hid = torch.randn(n, h, dtype=dtype)
    w = (torch.randn(v, h) / h ** 0.5).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    tv = (torch.randn(n, k) * 3).half()                 # the official files store fp16 logits
    ti = torch.stack([torch.randperm(v)[:k] for _ in range(n)] or [torch.empty(0, k)]).int()
    ti = ti.reshape(n, k)
    if dup:
        ti[:, 1] = ti[:, 0]                             # the same id twice in every row
        ti[0] = ti[0, 0]                                # one row of a single repeated id
    return hid, w, b, tv, ti


def _official(hid, w, b, tv, ti, t):
    """run_gated_lora.py, Stage B, one sample: full logits, gather, kl_div batchmean · T²."""
    logits = F.linear(hid.float(), w.float(), None if b is None else b.float())   # [N, V]
    s = F.log_softmax(logits.gather(1, ti.long()) / t, dim=-1)
    te = F.log_softmax(tv.float() / t, dim=-1)
    return F.kl_div(s, te, log_target=True, reduction="batchmean") * t ** 2


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("n,k,h,v,bias,dup", [
    (1, 1, 8, 5, False, False), (7, 13, 37, 53, True, False), (9, 64, 72, 211, False, True),
    (0, 5, 16, 20, False, False)])
def test_matches_reference_and_official_fp32(backend, n, k, h, v, bias, dup):
    t = 2.0
    hid, w, b, tv, ti = _inputs(n, k, h, v, torch.float32, bias, dup)
    hid.requires_grad_(True)
    w.requires_grad_(True)
    mask = torch.ones(n, dtype=torch.bool)
    if n > 2:
        mask[n // 2] = False                          # a masked row: no loss, no gradient
    rows = topk_distill_loss(hid, w, tv, ti, bias=b, temperature=t, mask=mask, reduction="none",
                             backend=backend)
    args64 = [x.detach().double() if x is not None else None for x in (hid, w, b)]
    for x in args64[:2]:
        x.requires_grad_(True)
    ref = reference.topk_distill_loss(args64[0], args64[1], args64[2], tv, ti, mask, t)
    assert rel_err(rows, ref) <= REL_TOL[torch.float32]
    if n == 0:
        return
    g = torch.randn(n)
    rows.backward(g)
    ref.backward(g.double())
    assert rel_err(hid.grad, args64[0].grad) <= REL_TOL[torch.float32]
    assert rel_err(w.grad, args64[1].grad) <= REL_TOL[torch.float32]
    if n > 2:
        assert hid.grad[n // 2].abs().max() == 0
    keep = mask.nonzero().squeeze(1)
    official = _official(hid.detach()[keep], w.detach(), b, tv[keep], ti[keep], t)
    mean = topk_distill_loss(hid.detach(), w.detach(), tv, ti, bias=b, temperature=t, mask=mask,
                             backend=backend)
    assert rel_err(mean, official) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    hid, w, b, tv, ti = _inputs(5, 11, 40, 30, dtype, bias=True)
    hid.requires_grad_(True)
    mask = torch.ones(5, dtype=torch.bool)
    rows = topk_distill_loss(hid, w, tv, ti, bias=b, mask=mask, reduction="none", backend="triton")
    h64 = hid.detach().double().requires_grad_(True)
    ref = reference.topk_distill_loss(h64, w.double(), b.double(), tv, ti, mask, 2.0)
    assert rel_err(rows, ref) <= REL_TOL[dtype]
    rows.sum().backward()
    ref.sum().backward()
    assert hid.grad.dtype == dtype
    assert rel_err(hid.grad, h64.grad) <= REL_TOL[dtype]


def test_reference_gradcheck_float64():
    hid, w, b, tv, ti = _inputs(4, 6, 9, 17, torch.float64, bias=True, dup=True)
    mask = torch.tensor([True, True, False, True])
    for x in (hid, w, b):
        x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, c, d: reference.topk_distill_loss(a, c, d, tv, ti, mask, 1.5), (hid, w, b))


def test_bias_grad_and_clear_errors():
    hid, w, b, tv, ti = _inputs(6, 7, 24, 19, torch.float32, bias=True, dup=True)
    b.requires_grad_(True)
    topk_distill_loss(hid, w, tv, ti, bias=b, backend="triton").backward()
    b64 = b.detach().double().requires_grad_(True)
    ref = reference.topk_distill_loss(hid.double(), w.double(), b64, tv, ti,
                                      torch.ones(6, dtype=torch.bool), 2.0)
    (ref.sum() / 6).backward()
    assert rel_err(b.grad, b64.grad) <= REL_TOL[torch.float32]
    with pytest.raises(ValueError, match="topk_indices"):
        topk_distill_loss(hid, w, tv, ti[:, :3])
    with pytest.raises(ValueError, match="mask"):
        topk_distill_loss(hid, w, tv, ti, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        topk_distill_loss(hid, w, tv, ti, reduction="mean")


def test_opcheck():
    hid, w, b, tv, ti = _inputs(5, 9, 20, 31, torch.float32, bias=True)
    mask = torch.tensor([True, False, True, True, True])
    torch.library.opcheck(torch.ops.prism_fast.topk_distill_fwd.default,
                          (hid, w, b, tv, ti, mask, 2.0))
    _, coef = torch.ops.prism_fast.topk_distill_fwd(hid, w, b, tv, ti, mask, 2.0)
    # The backward's weight gradient is an atomic sum whose order may vary: schema and fake
    # checks only (test_matches_reference_and_official_fp32 checks its values).
    torch.library.opcheck(torch.ops.prism_fast.topk_distill_bwd.default,
                          (hid, w, ti, coef, torch.randn(5), True, True),
                          test_utils=("test_schema", "test_faketensor"))
