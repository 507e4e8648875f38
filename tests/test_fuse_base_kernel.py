"""patch_model(..., fuse_base=True): decode-sized calls (≤ 64 rows) of a Triton-backed model run
the fused base + LoRA kernel (kernels/fused_base_lora.py), larger ones the split path. Under the
interpreter the kernel runs on CPU tensors. Closed rows are within the accuracy bound of the
unpatched model, not bit-identical (SPEC §1's named exception)."""

from __future__ import annotations

import pytest
import torch

import prism_fast
from prism_fast.ops import gated_lora as ops  # the dispatch the patched layers call
from tests import models as M
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture
def fused_calls(monkeypatch):
    """Row counts of every fused-kernel call the patched layers make."""
    rows: list[int] = []
    real = ops.fused_base_lora_triton

    def counting(x, *args, **kwargs):
        rows.append(x.numel() // x.shape[-1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_base_lora_triton", counting)
    return rows


def test_decode_matches_peft(prism_dir, fused_calls):
    """Greedy generate with the gate's mixed routes: the same tokens as PEFT, and every step's
    logits (open and closed rows) within MODEL_REL_TOL of PEFT's."""
    path, base, pm, gate = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="triton", fuse_base=True)
    ids, mask = M.prompts(4, 10, "left", seed=5)
    routes = M.official_routes(base, gate, ids, mask)
    assert (routes < 0).any() and (routes >= 0).any()
    names = ["__base__" if r < 0 else "persona_expert" for r in routes.tolist()]
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = pm.generate(input_ids=ids, adapter_names=names, **kw)
        out = model.generate(input_ids=ids, **kw)
    assert torch.equal(prism_fast.get_routes(model), routes)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits):
        assert rel_err(got, want) <= MODEL_REL_TOL
    assert 4 in fused_calls and 40 in fused_calls   # decode steps and the 40-row prefill


def test_mixed_personas_forward_and_large_calls_split(fused_calls):
    """Two personas and closed rows in one batch: every row within MODEL_REL_TOL of PEFT (and
    of the unpatched model for closed rows); a call of more than 64 rows takes the split path,
    whose closed rows stay bit-identical."""
    base = M.base_model()
    pm = M.peft_model(M.clone(base), n_adapters=2)
    routes = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    ids, mask = M.prompts(4, 9, "left")
    ref = M.peft_logits(pm, ids, mask, routes, names=("persona_expert", "p1"))
    prism_fast.patch_model(pm, backend="triton", fuse_base=True)
    prism_fast.set_routes(pm, routes)
    out = M.forward(pm, ids, mask)
    assert fused_calls and set(fused_calls) == {36}
    assert rel_err(out, ref) <= MODEL_REL_TOL
    closed = routes < 0
    assert rel_err(out[closed], M.forward(base, ids, mask)[closed]) <= MODEL_REL_TOL
    fused_calls.clear()
    ids, mask = M.prompts(8, 9, "left")      # 72 rows: the split path
    routes = torch.tensor([0, -1, 1, -1] * 2, dtype=torch.int32)
    prism_fast.set_routes(pm, routes)
    out = M.forward(pm, ids, mask)
    assert not fused_calls
    assert torch.equal(out[routes < 0], M.forward(base, ids, mask)[routes < 0])


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_fullgraph_matches_eager(prism_dir):
    path, base, _, _ = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="triton", fuse_base=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask = M.prompts(4, 9, "left", seed=5)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert rel_err(out, eager) <= MODEL_REL_TOL


def test_refused_where_it_cannot_apply(prism_dir):
    path, base, _, _ = prism_dir
    for backend in ("torch", "auto"):   # CPU tensors: "auto" is the PyTorch path, whose
        # fuse_base (ops/gated_lora_fused_base.py) takes fp32 weights only
        with pytest.raises(ValueError, match="fuse_base: True needs the Triton backend"):
            prism_fast.patch_model(M.clone(base).to(torch.bfloat16), path, backend=backend,
                                   fuse_base=True)
    with pytest.raises(TypeError, match="fuse_base: expected True or False"):
        prism_fast.patch_model(M.clone(base), path, backend="triton", fuse_base=1)
    model = M.clone(base)
    prism_fast.patch_model(model, path, backend="triton", fuse_base=False)   # the default
    assert not any(getattr(m, "group", None) is not None and m.group.fuse_kernel
                   for m in model.modules())
