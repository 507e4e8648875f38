"""The torch path's fused base GEMM (prism_fast/ops/gated_lora_fused_base.py): an all-open
group on adapter 0 runs x·[W; A]ᵀ once; the layer's weights are views of that buffer while
patched."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import prism_fast
from prism_fast.layer import GatedLoraLinear
from prism_fast.ops.gated_lora_fused_base import fuse
from tests.models import base_model, clone, forward, peft_logits, peft_model, prompts
from tests.tolerances import MODEL_REL_TOL, rel_err


def _groups(model) -> list:
    return list({id(m.group): m.group for m in model.modules()
                 if isinstance(m, GatedLoraLinear)}.values())


def _case(arch: str = "llama"):
    base = base_model(arch)
    pm = peft_model(clone(base), arch)
    ids, mask = prompts(4, 9)
    return base, pm, ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: q/k/v biases in the buffer
def test_open_closed_and_mixed_rows_with_the_fused_buffer(arch):
    base, pm, ids, mask = _case(arch)
    ref_base = forward(base, ids, mask)
    routes = torch.tensor([0, -1, 0, -1])
    ref_open = peft_logits(pm, ids, mask, torch.zeros(4, dtype=torch.long), arch=arch)
    ref_mixed = peft_logits(pm, ids, mask, routes, arch=arch)
    prism_fast.patch_model(pm, backend="torch", fuse_base=True)
    assert all(g.fused is not None for g in _groups(pm))
    for rs, ref in (([0] * 4, ref_open), (routes.tolist(), ref_mixed), ([-1] * 4, ref_base)):
        prism_fast.set_routes(pm, rs)
        out = forward(pm, ids, mask)
        closed = torch.tensor(rs) < 0
        # Closed rows take F.linear on the viewed weight: the unpatched model's bits.
        assert torch.equal(out[closed], ref_base[closed])
        if (~closed).any():
            assert rel_err(out[~closed], ref[~closed]) <= MODEL_REL_TOL


def test_fused_and_unfused_open_paths_agree_and_unpatch_restores_storage():
    _, pm, ids, mask = _case()
    params = {n: p for n, p in pm.named_parameters() if "proj.weight" in n or "proj.bias" in n}
    before = {n: p.detach().clone() for n, p in params.items()}
    prism_fast.patch_model(pm, backend="torch", fuse_base=True)
    prism_fast.set_routes(pm, [0] * 4)
    fused = forward(pm, ids, mask)
    groups = _groups(pm)
    for g in groups:                 # the unfused one-adapter path on the same model
        g.prepared().fused = None
    unfused = forward(pm, ids, mask)
    assert rel_err(fused, unfused) <= MODEL_REL_TOL
    prism_fast.unpatch_model(pm)
    storages = set()
    for n, p in pm.named_parameters():
        if n in params:
            assert p is params[n] and torch.equal(p, before[n])
            storages.add(p.untyped_storage().data_ptr())
    assert len(storages) == len(params), "after unpatch each weight owns its storage"
    assert all(g.fused is None for g in groups)


def test_a_weight_repointed_after_patching_falls_back_to_the_unfused_path():
    _, pm, ids, mask = _case()
    prism_fast.patch_model(pm, backend="torch", fuse_base=True)
    prism_fast.set_routes(pm, [0] * 4)
    expected = forward(pm, ids, mask)
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        q.weight.data = q.weight.data.clone() * 2     # no longer a view of the buffer
    assert not q.group.fused.valid()
    out = forward(pm, ids, mask)
    for g in _groups(pm):
        g.prepared().fused = None
    # Against every group unfused: q's group saw its new weight, through the unfused path.
    assert rel_err(out, forward(pm, ids, mask)) <= MODEL_REL_TOL
    assert not torch.allclose(out, expected)


def test_copies_of_a_fused_model_are_fused_and_independent():
    base, pm, ids, mask = _case()
    prism_fast.patch_model(pm, backend="torch", fuse_base=True)
    prism_fast.set_routes(pm, [0] * 4)
    expected = forward(pm, ids, mask)
    copies = [copy.deepcopy(pm)]
    try:
        copies.append(pickle.loads(pickle.dumps(pm)))
    except AttributeError:
        # transformers 5.17 with kernels 0.16 cannot pickle even the unpatched model (see
        # test_bad_input's pickle test): then only the deep copy is checked.
        try:
            pickle.dumps(base)
        except AttributeError:
            pass
        else:
            raise
    for other in copies:
        assert all(g.fused is not None and g.fused.valid() for g in _groups(other))
        assert torch.equal(forward(other, ids, mask), expected)
        with torch.no_grad():
            other.base_model.model.model.layers[1].self_attn.q_proj.weight.zero_()
        assert torch.equal(forward(pm, ids, mask), expected)


@pytest.mark.parametrize("how", ["default", "triton"])
def test_models_without_the_opt_in_keep_their_weights(how):
    pm = peft_model(clone(base_model("llama")))
    ptrs = [(p, p.data_ptr()) for p in pm.parameters()]
    if how == "triton":     # fuse_base=True there is the fused Triton kernel, not this buffer
        prism_fast.patch_model(pm, backend="triton", fuse_base=True)
    else:
        prism_fast.patch_model(pm, backend="torch")
    assert all(g.fused is None for g in _groups(pm))
    assert all(p.data_ptr() == ptr for p, ptr in ptrs)


def test_weights_that_do_not_qualify_are_refused_before_patching():
    pm = peft_model(clone(base_model("llama", dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match=r"fuse_base: .*contiguous fp32 CPU weights.*bfloat16"):
        prism_fast.patch_model(pm, backend="torch", fuse_base=True)
    assert getattr(pm, "_prism_patch", None) is None


def test_fuse_refuses_tensors_a_view_would_change():
    def linear(n, k, dtype=torch.float32):
        return torch.nn.Parameter(torch.randn(n, k, dtype=dtype))

    a = torch.randn(1, 8, 64)
    assert fuse([linear(32, 64)], [None], a, 8) is not None
    assert fuse([linear(32, 65)], [None], torch.randn(1, 8, 65), 8) is None   # 260-byte rows
    assert fuse([linear(32, 64, torch.bfloat16)], [None], a.bfloat16(), 8) is None
    assert fuse([linear(32, 64)], [None], a.double(), 8) is None
    w = torch.nn.Parameter(torch.randn(64, 32).T)                              # not contiguous
    assert fuse([w], [None], a, 8) is None
    shared = linear(32, 64)
    assert fuse([shared, shared], [None, None], torch.randn(1, 16, 64), 8) is None


def test_save_pretrained_of_a_fused_model_saves_the_base_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    base = base_model()
    expected = {n: p.detach().clone() for n, p in base.state_dict().items()}
    pm = peft_model(clone(base))
    prism_fast.patch_model(pm, backend="torch", fuse_base=True)
    assert all(g.fused is not None for g in _groups(pm))
    model = pm.base_model.model            # the fused LlamaForCausalLM under PEFT
    model.save_pretrained(tmp_path)        # safetensors: the weights are disjoint views
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    state = loaded.state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
