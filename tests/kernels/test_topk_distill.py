"""topk_distill_loss: the Triton kernels (CPU interpreter in CI) and the PyTorch path against the
reference, the reference against PRISM's official formula and float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prism_fast
from prism_fast import reference
from prism_fast.ops import topk_distill
from prism_fast.ops.topk_distill import (
    head_grads,
    topk_distill_backward_torch,
    topk_distill_forward_torch,
)
from tests.helpers import compiled_gpu_mode
from tests.tolerances import REL_TOL, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]


def make_case(n, h, v, k, dtype, bias=True, duplicates=False, masked=False):
    hidden = torch.randn(n, h, dtype=dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    b = (torch.randn(v) * 0.5).to(dtype) if bias else None
    values = (torch.randn(n, k) * 3).half()                  # the official files store fp16
    if duplicates:
        indices = torch.randint(0, min(v, 4), (n, k), dtype=torch.int32)
    else:
        indices = torch.stack([torch.randperm(v)[:k] for _ in range(n)]).int() if n else \
            torch.zeros(0, k, dtype=torch.int32)
    mask = (torch.rand(n) < 0.7) if masked else None
    return hidden, weight, b, values, indices, mask


def official(hidden, weight, bias, values, indices, temperature):
    """run_gated_lora.py, Stage B, one sample: full logits [L, V], then the official loss."""
    return reference.official_stage_b_loss(F.linear(hidden, weight, bias), values, indices,
                                           temperature)


def test_reference_is_the_official_loss():
    """fp32: the reference's mean over positions is the official per-sample loss (1e-5), also
    with duplicate indices and after the official truncation to the shorter of the two."""
    for duplicates in (False, True):
        hidden, weight, b, values, indices, _ = make_case(23, 40, 97, 16, torch.float32,
                                                          duplicates=duplicates)
        ref = reference.topk_distill_loss(hidden, weight, b, values, indices, 2.0).mean()
        assert rel_err(ref, official(hidden, weight, b, values, indices, 2.0)) <= 1e-5
    # teacher rows for fewer positions than the response: the official code truncates
    resp, teacher = hidden, values[:15]
    n = min(resp.shape[0], teacher.shape[0])
    loss = prism_fast.topk_distill_loss(resp[:n], weight, b, teacher[:n], indices[:n], 2.0)
    assert rel_err(loss, official(resp[:n], weight, b, teacher[:n], indices[:n], 2.0)) <= 1e-5


def test_reference_gradcheck_float64():
    hidden, weight, b, values, indices, _ = make_case(5, 7, 11, 4, torch.float64,
                                                      duplicates=True)
    for t in (hidden, weight, b):
        t.requires_grad_(True)
    mask = torch.tensor([True, False, True, True, True])
    torch.autograd.gradcheck(
        lambda h, w, bb: reference.topk_distill_loss(h, w, bb, values, indices, 1.5, mask),
        (hidden, weight, b))


def _loss_and_grads(fn, hidden, weight, b, values, indices, mask):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, b)]
    kl = fn(*leaves, values, indices, mask)
    g = torch.randn(kl.shape, dtype=torch.float32)
    (kl.float() * g).sum().backward()
    return kl.detach(), [t.grad for t in leaves]


def check_against_reference(backend, hidden, weight, b, values, indices, mask, temperature=2.0):
    """kl [N] and the gradients of hidden, head weight and bias within SPEC's bound of float64
    (fp32 1e-5; half dtypes: the bound of the inputs' own dtype), closed-masked rows exactly 0."""
    dtype = hidden.dtype

    def ours(h, w, bb, v, i, m):
        return prism_fast.topk_distill_loss(h, w, bb, v, i, temperature, m, reduction="none",
                                            backend=backend)

    def ref64(h, w, bb, v, i, m):
        return reference.topk_distill_loss(h.double(), w.double(), bb.double(), v, i,
                                           temperature, m)

    torch.manual_seed(1)
    kl, grads = _loss_and_grads(ours, hidden, weight, b, values, indices, mask)
    torch.manual_seed(1)
    kl_ref, grads_ref = _loss_and_grads(ref64, hidden, weight, b, values, indices, mask)
    assert kl.dtype == torch.float32 and kl.shape == (hidden.shape[0],)
    if mask is not None:
        assert (kl[~mask] == 0).all() and (grads[0][~mask] == 0).all()
    if hidden.shape[0] == 0:
        return
    assert rel_err(kl, kl_ref) <= REL_TOL[dtype], f"kl: rel err {rel_err(kl, kl_ref):.3g}"
    for name, g, g_ref in zip(("hidden", "head_weight", "head_bias"), grads, grads_ref):
        assert g.dtype == dtype
        err = rel_err(g, g_ref)
        assert err <= REL_TOL[dtype], f"grad {name}: rel err {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,h,v,k", [(1, 37, 53, 5), (9, 130, 211, 64), (33, 16, 40, 3),
                                     (4, 300, 1000, 100)])
def test_matches_reference(n, h, v, k, dtype, backend):
    case = make_case(n, h, v, k, dtype, masked=n > 1)
    check_against_reference(backend, *case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_no_bias_strided_and_empty(backend):
    hidden, weight, _, values, indices, mask = make_case(12, 48, 30, 20, torch.float32,
                                                         bias=False, duplicates=True)
    b = torch.zeros(30)                  # the no-bias case, compared with a zero bias below
    kl = prism_fast.topk_distill_loss(hidden, weight, None, values, indices, 2.0,
                                      reduction="none", backend=backend)
    kl_ref = reference.topk_distill_loss(hidden.double(), weight.double(), None, values, indices,
                                         2.0)
    assert rel_err(kl, kl_ref) <= 1e-5
    big = torch.randn(12, 3, 60)
    strided = big[:, 1, 5:53]                                          # [12, 48], not contiguous
    assert not strided.is_contiguous()
    check_against_reference(backend, strided, weight, b, values.T.contiguous().T,
                            indices.T.contiguous().T, None)
    empty = make_case(0, 16, 20, 4, torch.float32)
    assert prism_fast.topk_distill_loss(*empty[:5], 2.0, backend=backend) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias_and_mask(backend):
    """Views of bias and mask with gaps (the kernel reads both at unit stride) give the
    reference's loss and gradients, through the public op and the registered forward alike."""
    hidden, weight, _, values, indices, mask = make_case(8, 24, 40, 6, torch.float32,
                                                         masked=True)
    mask[0], mask[1] = True, False
    bias_base = torch.randn(40, 2, requires_grad=True)
    b, m = bias_base[:, 0], torch.stack([mask, ~mask], 1)[:, 0]          # strides 2, 2
    assert not b.is_contiguous() and not m.is_contiguous()
    h = hidden.clone().requires_grad_(True)
    kl = prism_fast.topk_distill_loss(h, weight, b, values, indices, 2.0, m, reduction="none",
                                      backend=backend)
    h64 = hidden.double().requires_grad_(True)
    b64 = bias_base.detach().double().requires_grad_(True)
    kl64 = reference.topk_distill_loss(h64, weight.double(), b64[:, 0], values, indices, 2.0, m)
    assert (kl[~mask] == 0).all() and rel_err(kl, kl64) <= REL_TOL[torch.float32]
    kl.sum().backward()
    kl64.sum().backward()
    assert rel_err(h.grad, h64.grad) <= REL_TOL[torch.float32]
    assert rel_err(bias_base.grad, b64.grad) <= REL_TOL[torch.float32]
    kl_op, _, _ = torch.ops.prism_fast.topk_distill_fwd(hidden, weight, b.detach(), values,
                                                        indices, 2.0, m)
    assert (kl_op[~mask] == 0).all() and rel_err(kl_op, kl64) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_head_without_grad(backend):
    hidden, weight, b, values, indices, mask = make_case(10, 24, 50, 8, torch.float32, masked=True)
    per = prism_fast.topk_distill_loss(hidden, weight, b, values, indices, 1.0, mask,
                                       reduction="none", backend=backend)
    total = prism_fast.topk_distill_loss(hidden, weight, b, values, indices, 1.0, mask,
                                         reduction="sum", backend=backend)
    mean = prism_fast.topk_distill_loss(hidden, weight, b, values, indices, 1.0, mask,
                                        backend=backend)
    assert torch.allclose(total, per.sum()) and torch.allclose(mean, per.sum() / mask.sum())
    h = hidden.clone().requires_grad_(True)              # a frozen head, as in LoRA training
    prism_fast.topk_distill_loss(h, weight, b, values, indices, 1.0, backend=backend).backward()
    assert h.grad is not None and weight.grad is None


def test_torch_path_chunks(monkeypatch):
    """Chunks of a few positions give what one chunk gives (the chunking bounds memory only)."""
    case = make_case(17, 20, 40, 6, torch.float32)
    whole = topk_distill_forward_torch(*case[:5], 2.0, None)
    monkeypatch.setattr(topk_distill, "CHUNK_ELEMS", 20 * 6 * 3)      # 3 positions per chunk
    assert len(topk_distill._chunks(17, 6, 20)) == 6
    chunked = topk_distill_forward_torch(*case[:5], 2.0, None)
    for a, b in zip(whole, chunked):
        assert rel_err(a, b) <= 1e-6


def _set(**kw):
    return lambda a: a.update(**{k: v(a) if callable(v) else v for k, v in kw.items()})


BAD = [
    (_set(hidden=lambda a: a["hidden"][0]), ValueError, r"hidden: expected shape \(N, H\)"),
    (_set(head_weight=lambda a: a["head_weight"][:, :5]), ValueError,
     "head_weight: expected shape"),
    (_set(head_weight=lambda a: a["head_weight"].half()), TypeError,
     "head_weight: expected dtype"),
    (_set(head_bias=lambda a: a["head_bias"][:3]), ValueError, "head_bias: expected shape"),
    (_set(teacher_values=lambda a: a["teacher_values"][:2]), ValueError,
     "teacher_values: expected shape"),
    (_set(teacher_indices=lambda a: a["teacher_indices"].float()), TypeError,
     "teacher_indices: expected an integer"),
    (_set(teacher_indices=lambda a: a["teacher_indices"][:, :2]), ValueError,
     "teacher_indices: expected shape"),
    (_set(teacher_indices=lambda a: a["teacher_indices"] + 100), ValueError,
     "teacher_indices: expected values in 0…49"),
    (_set(temperature=0.0), ValueError, "temperature: expected a positive finite number"),
    (_set(temperature=float("inf")), ValueError, "temperature: expected a positive finite number"),
    (_set(temperature=float("nan")), ValueError, "temperature: expected a positive finite number"),
    (_set(mask=torch.ones(6, dtype=torch.int64)), TypeError,
     r"mask: expected a torch.bool tensor .* got torch.int64; pass mask.bool\(\)"),
    (_set(mask=torch.ones(3, dtype=torch.bool)), ValueError, r"mask: expected shape \(6,\)"),
    (_set(reduction="batchmean"), ValueError, "reduction: expected one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate,exc,msg", BAD)
def test_clear_errors(mutate, exc, msg, backend):
    hidden, weight, b, values, indices, _ = make_case(6, 8, 50, 4, torch.float32)
    args = dict(hidden=hidden, head_weight=weight, head_bias=b, teacher_values=values,
                teacher_indices=indices, temperature=2.0, mask=None, reduction="mean")
    mutate(args)
    if "expected values" in msg and compiled_gpu_mode():
        pytest.skip("indices on the GPU are not range-checked on the host (no sync)")
    with pytest.raises(exc, match=msg):
        prism_fast.topk_distill_loss(**args, backend=backend)


def test_opcheck_registered_ops():
    hidden, weight, b, values, indices, mask = make_case(5, 24, 40, 6, torch.float32, masked=True)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.prism_fast.topk_distill_fwd.default,
                          (hidden, weight, b, values, indices, 2.0, mask), test_utils=tests)
    kl, p_s, p_t = torch.ops.prism_fast.topk_distill_fwd(hidden, weight, b, values, indices, 2.0,
                                                          mask)
    torch.library.opcheck(torch.ops.prism_fast.topk_distill_bwd.default,
                          (torch.randn(5), hidden, weight, indices, 2.0, mask, p_s, p_t),
                          test_utils=tests)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_compiled(dtype):
    """Llama-3-8B-like head (V = 128256, H = 4096), k = 64, compiled on the GPU."""
    with torch.device("cuda"):
        check_against_reference("triton", *make_case(64, 4096, 128256, 64, dtype, masked=True))


def test_out_of_range_indices_read_nothing():
    """Memory safety (SPEC §4): indices outside the head, which only the host can check, are
    dropped from both softmaxes by the kernels, and the head's gradient never scatters there."""
    hidden, weight, b, values, indices, _ = make_case(6, 16, 30, 5, torch.float32)
    bad = indices.clone()
    bad[:, 0] = torch.tensor([30, -1, 2**31 - 1, -(2**31), 1000, 31], dtype=torch.int32)
    w = weight.clone().requires_grad_(True)
    from prism_fast.kernels.topk_distill import topk_distill_backward, topk_distill_forward

    kl, p_s, p_t = topk_distill_forward(hidden, w.detach(), b, values, bad, 2.0, None)
    keep = reference.topk_distill_loss(hidden, weight, b, values[:, 1:], indices[:, 1:], 2.0)
    assert rel_err(kl, keep) <= 1e-5
    grad_h, ds = topk_distill_backward(torch.ones(6), hidden, weight, bad, 2.0, None, p_s, p_t)
    assert (ds[:, 0] == 0).all() and torch.isfinite(grad_h).all()
    grad_w, _ = head_grads(ds, bad, hidden, 30, True, False)
    assert torch.isfinite(grad_w).all()


def _drop_first_column_case():
    """Indices with column 0 outside the head (−1 among them) and the loss without that column."""
    hidden, weight, b, values, indices, mask = make_case(6, 16, 30, 5, torch.float32, masked=True)
    bad = indices.clone()
    bad[:, 0] = torch.tensor([-1, 30, -1, -(2**31), 1000, -1], dtype=indices.dtype)
    keep = reference.topk_distill_loss(hidden, weight, b, values[:, 1:], indices[:, 1:], 2.0, mask)
    return hidden, weight, b, values, bad, mask, keep


def test_torch_path_drops_out_of_range_indices():
    """The PyTorch path, called without the host's range check (as under torch.compile or for
    CUDA tensors), drops an index outside 0…V−1 as the Triton kernel does: id −1 is never read
    as the last row of the head."""
    hidden, weight, b, values, bad, mask, keep = _drop_first_column_case()
    kl, p_s, p_t = topk_distill_forward_torch(hidden, weight, b, values, bad, 2.0, mask)
    assert rel_err(kl, keep) <= 1e-5
    assert (p_s[:, 0] == 0).all() and (p_t[:, 0] == 0).all()
    grad_h, ds = topk_distill_backward_torch(torch.ones(6), hidden, weight, bad, 2.0, mask, p_s, p_t)
    assert (ds[:, 0] == 0).all() and torch.isfinite(grad_h).all()
    # A row with no index in range has KL 0 and no gradient (the kernel's answer), never NaN.
    bad[0] = -1
    kl, p_s, p_t = topk_distill_forward_torch(hidden, weight, b, values, bad, 2.0, None)
    grad_h, _ = topk_distill_backward_torch(torch.ones(6), hidden, weight, bad, 2.0, None, p_s, p_t)
    assert kl[0] == 0 and (grad_h[0] == 0).all() and torch.isfinite(kl).all()


def test_compiled_loss_drops_out_of_range_indices():
    """Under torch.compile the host range check is skipped: the PyTorch path drops the entry
    (KL 1.1894 instead of 1.3824 in the filed case: −1 was read as the head's last row). The
    Triton op checks again when it runs on CPU, and its kernel drops the entry on a GPU."""
    backend = "torch"
    hidden, weight, b, values, bad, mask, keep = _drop_first_column_case()

    def loss(h):
        return prism_fast.topk_distill_loss(h, weight, b, values, bad, 2.0, mask,
                                            reduction="none", backend=backend)

    kl = torch.compile(loss, fullgraph=True, backend="aot_eager")(hidden)
    assert rel_err(kl, keep) <= 1e-5
