"""The decode steps' lane (gated_lora_torch.Lane): an all-open fp32 call's operands kept for the
next calls. It must give the bits of the path it replaces, and never serve a call it was not
built for (other routes, rows, thread, dtype, autograd, or a weight replaced after patching)."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
import torch.nn as nn

import prism_fast
from prism_fast.layer import GatedLoraLinear
from prism_fast.ops.gated_lora_torch import Prepared, slice_offsets
from tests import models as M
from tests.helpers import float64_ref
from tests.ops.test_gated_lora_torch import multi_slice_case, per_slice
from tests.tolerances import MODEL_REL_TOL, REL_TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _case(bias: bool = True):
    weights, biases, lora_a, lora_b, scaling, parts = multi_slice_case([11, 5, 5], 17, 2, 4,
                                                                       torch.float32, bias)
    return weights, biases, Prepared(lora_a, lora_b, scaling, slice_offsets(weights)), parts


def test_lane_gives_the_bits_of_the_uniform_path():
    weights, biases, prepared, parts = _case()
    ids = torch.tensor([1, 1])
    for _ in range(4):                       # the first call builds the lane, the rest use it
        x = torch.randn(2, 1, 17)
        lane = prepared.lane
        ys = prepared(x, weights, biases, ids) if lane is None else lane(x)
        want = prepared._uniform(x, weights, biases, 1)
        assert all(torch.equal(y, w) for y, w in zip(ys, want))
        for y, e in zip(ys, per_slice(x, weights, biases, parts, ids, float64_ref)):
            assert y.shape == e.shape and rel_err(y, e) <= REL_TOL[torch.float32]
        assert prepared.lane is not None and prepared.lane.fits(x, ids)


def test_lane_refuses_what_it_was_not_built_for():
    weights, biases, prepared, _ = _case(bias=False)
    ids = torch.tensor([0, 0, 0])
    x = torch.randn(3, 1, 17)
    prepared(x, weights, biases, ids)
    lane = prepared.lane
    assert lane.fits(x, ids)
    assert not lane.fits(torch.randn(2, 1, 17), ids)                        # other rows
    assert not lane.fits(x.double(), ids)                                  # other dtype
    assert not lane.fits(x.clone().requires_grad_(), ids)                  # autograd
    assert not lane.fits(x, ids.clone())                                   # other routes tensor
    seen = []
    thread = threading.Thread(target=lambda: seen.append(lane.fits(x, ids)))
    thread.start()
    thread.join()
    assert seen == [False]                                                 # other thread
    ids.copy_(torch.tensor([0, -1, 0]))                                     # routes in place
    assert not lane.fits(x, ids)
    ys = prepared(x, weights, biases, ids)                                  # mixed: no lane
    assert torch.equal(ys[0][1], torch.nn.functional.linear(x, weights[0])[1])   # closed row


def test_copies_start_without_a_lane():
    weights, biases, prepared, _ = _case()
    ids = torch.tensor([0])
    prepared(torch.randn(1, 1, 17), weights, biases, ids)
    assert prepared.lane is not None
    assert copy.deepcopy(prepared).lane is None
    assert pickle.loads(pickle.dumps(prepared)).lane is None


def _decode_model():
    """A tiny patched Llama after one prefill and one decode step (all open): lanes built."""
    base = M.base_model()
    pm = M.peft_model(M.clone(base))
    prism_fast.patch_model(pm, backend="torch")
    prism_fast.set_routes(pm, [0, 0])
    ids = torch.randint(3, M.VOCAB, (2, 6))
    with torch.no_grad():
        out = pm(input_ids=ids, use_cache=True)
        out = pm(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    layers = [m for m in pm.modules() if isinstance(m, GatedLoraLinear) and m.slot == 0]
    assert all(m.group._prepared.lane is not None for m in layers)
    return pm, ids, out.past_key_values


def _step(pm, ids, cache):
    with torch.no_grad():
        return pm(input_ids=ids[:, -1:], past_key_values=copy.deepcopy(cache), use_cache=True)


def test_model_decode_with_lanes_matches_the_path_without():
    pm, ids, cache = _decode_model()
    with_lanes = _step(pm, ids, cache).logits
    for m in pm.modules():
        if isinstance(m, GatedLoraLinear) and m.slot == 0:
            m.group._prepared.lane = None
    assert torch.equal(_step(pm, ids, cache).logits, with_lanes)


def test_replaced_weight_is_read_not_the_lane_s():
    """A parameter replaced after patching (a new object) is what the next step reads."""
    pm, ids, cache = _decode_model()
    before = _step(pm, ids, cache).logits
    q = next(m for m in pm.modules() if isinstance(m, GatedLoraLinear) and m.slot == 0)
    q.weight = nn.Parameter(q.weight.detach() * 0.5)
    after = _step(pm, ids, cache).logits
    for m in pm.modules():
        if isinstance(m, GatedLoraLinear) and m.slot == 0:
            m.group._prepared.lane = None
    assert torch.equal(_step(pm, ids, cache).logits, after)
    assert rel_err(after, before) > MODEL_REL_TOL


def test_disabled_adapters_and_closed_routes_skip_the_lane():
    pm, ids, cache = _decode_model()
    prism_fast.unpatch_model(pm)
    with torch.no_grad(), pm.disable_adapter():
        base = _step(pm, ids, cache).logits
    pm, ids, cache = _decode_model()
    with pm.disable_adapter():
        assert torch.equal(_step(pm, ids, cache).logits, base)
    prism_fast.set_routes(pm, [-1, -1])
    assert torch.equal(_step(pm, ids, cache).logits, base)


def test_lanes_follow_ids_rewritten_every_forward_while_the_plan_holds():
    """Continuous batching rewrites its per-token ids every forward: a group's lane still
    serves while the ids (grouped by the forward's first group) keep the same plan."""
    first, second = _case(), _case()
    ids = torch.tensor([0, 0])
    x = torch.randn(2, 1, 17)
    for weights, biases, prepared, _ in (first, second):
        prepared(x, weights, biases, ids)                  # both lanes built on version v
    lane = second[2].lane
    ids.copy_(torch.tensor([0, 0]))                        # the next forward: same routes
    assert not lane.fits(x, ids)                           # nobody grouped them yet
    first[2](x, first[0], first[1], ids)                   # the forward's first group does
    assert lane.fits(x, ids)
    ids.copy_(torch.tensor([0, -1]))                       # a row closes
    first[2](x, first[0], first[1], ids)
    assert not lane.fits(x, ids)
    ys = second[2](x, second[0], second[1], ids)           # the general path: row 1 exact
    assert torch.equal(ys[0][1], torch.nn.functional.linear(x, second[0][0], second[1][0])[1])
