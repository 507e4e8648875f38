"""Merged copies for all-open calls (prism_fast/ops/gated_lora_merged.py, merge_open=True): an
all-open call runs F.linear on W + ΔW; closed rows keep F.linear on W, bit-exact; the copies
follow the weights (replaced or written in place) and are never used under autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import prism_fast
from prism_fast.layer import GatedLoraLinear
from tests import models as M
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _groups(model) -> list:
    return list({id(m.group): m.group for m in model.modules()
                 if isinstance(m, GatedLoraLinear)}.values())


def _merged_calls(monkeypatch) -> list:
    """The adapter of each forward that ran on merged copies."""
    from prism_fast.routing import Routing

    calls = []
    decide = Routing.decide_merged

    def counted(self, hidden):
        decide(self, hidden)
        if self.merged >= 0:
            calls.append(self.merged)

    monkeypatch.setattr(Routing, "decide_merged", counted)
    return calls


@pytest.mark.parametrize("arch,n_adapters", [("llama", 1), ("qwen2", 2)])   # qwen2: biases
def test_open_closed_and_mixed_rows_with_merged_copies(arch, n_adapters, monkeypatch):
    base = M.base_model(arch)
    pm = M.peft_model(M.clone(base), arch, n_adapters=n_adapters)
    ids, mask = M.prompts(4, 9)
    names = tuple(pm.peft_config)
    ref_base = M.forward(base, ids, mask)
    cases = [[0] * 4, [n_adapters - 1] * 4, [0, -1, n_adapters - 1, -1], [-1] * 4]
    refs = [M.peft_logits(pm, ids, mask, torch.tensor(rs), names, arch) for rs in cases]
    prism_fast.patch_model(pm, backend="torch", merge_open=True)
    groups = _groups(pm)
    assert all(len(g.merged.copies) == n_adapters for g in groups)
    calls = _merged_calls(monkeypatch)
    for rs, ref in zip(cases, refs):
        prism_fast.set_routes(pm, rs)
        out = M.forward(pm, ids, mask)
        closed = torch.tensor(rs) < 0
        assert torch.equal(out[closed], ref_base[closed])       # F.linear on W: the same bits
        if (~closed).any():
            assert rel_err(out[~closed], ref[~closed]) <= MODEL_REL_TOL
    assert calls == [0, n_adapters - 1]                         # the two all-open cases only


def _decode(pm, ids, steps: int = 3) -> torch.Tensor:
    """Greedy decode `steps` tokens one at a time with the KV cache: the last logits."""
    with torch.no_grad():
        out = pm(input_ids=ids, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = pm(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return out.logits


def test_decode_steps_run_on_the_merged_lane_and_match_the_lora_path(monkeypatch):
    base = M.base_model()
    lora = M.peft_model(M.clone(base))
    merged = copy.deepcopy(lora)
    prism_fast.patch_model(lora, backend="torch")
    prism_fast.patch_model(merged, backend="torch", merge_open=True)
    ids = torch.randint(3, M.VOCAB, (2, 6))
    for pm in (lora, merged):
        prism_fast.set_routes(pm, [0, 0])
    calls = _merged_calls(monkeypatch)
    want = _decode(lora, ids)
    assert calls == []
    got = _decode(merged, ids)
    assert calls == [0] * 4                                     # the prefill and 3 steps
    assert rel_err(got, want) <= MODEL_REL_TOL
    assert all(g.merged.extra_bytes == sum(m.weight.numel() * 4 for m in g.members)
               for g in _groups(merged))


@pytest.mark.parametrize("how", ["in_place", "replaced"])
def test_copies_follow_weights_changed_after_patching(how):
    """A weight written in place (load_state_dict, copy_) or replaced by a new Parameter is
    what the next all-open call reads, not the old merged copy."""
    pm = M.peft_model(M.clone(M.base_model()))
    prism_fast.patch_model(pm, backend="torch", merge_open=True)
    prism_fast.set_routes(pm, [0, 0])
    ids = torch.randint(3, M.VOCAB, (2, 6))
    before = _decode(pm, ids, 1)
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        if how == "in_place":
            q.weight.mul_(0.5)
        else:
            q.weight = nn.Parameter(q.weight.detach() * 0.5)
    after = _decode(pm, ids, 1)
    pm._prism_patch.routing.merging = None                      # the LoRA path on the same
    want = _decode(pm, ids, 1)                                   # weights: the reference
    assert rel_err(after, want) <= MODEL_REL_TOL
    assert rel_err(after, before) > MODEL_REL_TOL


def test_autograd_takes_the_lora_path_and_reaches_the_weights(monkeypatch):
    pm = M.peft_model(M.clone(M.base_model()))
    prism_fast.patch_model(pm, backend="torch", merge_open=True)
    prism_fast.set_routes(pm, [0, 0])
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    q.weight.requires_grad_(True)
    calls = _merged_calls(monkeypatch)
    ids = torch.randint(3, M.VOCAB, (2, 6))
    pm(input_ids=ids).logits.sum().backward()
    assert calls == [] and q.weight.grad is not None


def test_copies_of_the_model_rebuild_theirs_and_unpatch_drops_them():
    pm = M.peft_model(M.clone(M.base_model()))
    prism_fast.patch_model(pm, backend="torch", merge_open=True)
    prism_fast.set_routes(pm, [0, 0])
    ids = torch.randint(3, M.VOCAB, (2, 6))
    want = _decode(pm, ids, 2)
    other = copy.deepcopy(pm)
    assert all(g.merged.copies == [] for g in _groups(other))
    assert torch.equal(_decode(other, ids, 2), want)
    with torch.no_grad():
        other.base_model.model.model.layers[1].self_attn.q_proj.weight.zero_()
    assert torch.equal(_decode(pm, ids, 2), want)
    groups = _groups(pm)
    prism_fast.unpatch_model(pm)
    assert all(g.merged is None for g in groups)


def test_merge_open_refusals_before_patching():
    pm = M.peft_model(M.clone(M.base_model()))
    with pytest.raises(TypeError, match=r"merge_open: expected True or False, got 'yes'"):
        prism_fast.patch_model(pm, backend="torch", merge_open="yes")
    with pytest.raises(ValueError, match=r"merge_open: .*fuse_base.*got both"):
        prism_fast.patch_model(pm, backend="torch", merge_open=True, fuse_base=True)
    with pytest.raises(ValueError, match=r"merge_open: .*PyTorch path.*backend='triton'"):
        prism_fast.patch_model(pm, backend="triton", merge_open=True)
    assert getattr(pm, "_prism_patch", None) is None
    bf16 = M.peft_model(M.clone(M.base_model(dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match=r"merge_open: .*fp32 CPU weights.*bfloat16"):
        prism_fast.patch_model(bf16, backend="torch", merge_open=True)
    assert getattr(bf16, "_prism_patch", None) is None


def test_copies_rebuilt_under_inference_mode_serve_autograd_into_x():
    """Copies rebuilt inside torch.inference_mode are normal tensors: a later forward with
    autograd on for the input (weights frozen) runs on them and its gradient reaches x."""
    pm = M.peft_model(M.clone(M.base_model()))
    prism_fast.patch_model(pm, backend="torch", merge_open=True)
    prism_fast.set_routes(pm, [0, 0])
    for p in pm.parameters():
        p.requires_grad_(False)
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        q.weight.mul_(0.5)                                   # stale: rebuilt at the next call
    ids = torch.randint(3, M.VOCAB, (2, 6))
    with torch.inference_mode():
        pm(input_ids=ids)
    assert not any(c.is_inference() for per in q.group.merged.copies for c in per)
    emb = pm.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = pm(inputs_embeds=emb).logits
    assert pm._prism_patch.routing.merging is not None
    out.sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    pm._prism_patch.routing.merging = None                   # the split path: the reference
    want = pm(inputs_embeds=emb.detach()).logits
    assert rel_err(out.detach(), want.detach()) <= MODEL_REL_TOL
