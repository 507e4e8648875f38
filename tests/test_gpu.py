"""GPU-only checks of the patched model: compiled Triton kernels, CUDA graphs, no host syncs.

Skipped without CUDA (CI has none); bench/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import prism_fast
from tests import models as M
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, base, pm, gate = M.prism_case(tmp_path_factory.mktemp("g") / "out", 6, 9)
    return path, base.cuda(), pm.cuda(), gate


def test_patched_model_on_gpu_matches_peft(setup):
    path, base, pm, gate = setup
    model = prism_fast.patch_model(M.clone(base), path)          # auto → triton on CUDA
    ids, mask = (t.cuda() for t in M.prompts(6, 9, "left", seed=5))
    routes = M.official_routes(base, gate, ids, mask)
    names = ["__base__" if r < 0 else "persona_expert" for r in routes.tolist()]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        ref = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        base_out = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(prism_fast.get_routes(model), routes)
    closed = routes < 0
    assert torch.equal(out[closed], base_out[closed])
    # fp32 under the GPU's default (ieee for F.linear, ieee for the kernels)
    assert rel_err(out[~closed], ref[~closed]) <= MODEL_REL_TOL
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                             do_sample=False)
        gen_ref = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                              do_sample=False, adapter_names=names)
    assert torch.equal(gen, gen_ref)


def test_decode_steps_never_sync(setup):
    """torch.cuda.set_sync_debug_mode("error") inside every patched projection of decode steps
    (HF's own code around them is not ours to check)."""
    path, base, _, _ = setup
    model = prism_fast.patch_model(M.clone(base), path)
    ids, mask = (t.cuda() for t in M.prompts(4, 9, "left", seed=5))
    state = {"decode": False}
    handles = []
    for module in model.modules():
        if isinstance(module, prism_fast.patch.GatedLoraLinear):
            handles.append(module.register_forward_pre_hook(
                lambda *a: torch.cuda.set_sync_debug_mode("error" if state["decode"] else 0)))
            handles.append(module.register_forward_hook(
                lambda *a: torch.cuda.set_sync_debug_mode(0)))
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        state["decode"] = True
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
    for h in handles:
        h.remove()
    torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_replays_after_routes_change(setup):
    """A captured forward reads the routes tensor: set_routes between replays takes effect."""
    path, base, _, _ = setup
    model = prism_fast.patch_model(M.clone(base), path)
    ids = M.prompts(2, 6, "left")[0].cuda()
    prism_fast.set_routes(model, torch.tensor([0, -1]))

    def step():   # no attention_mask: HF's padding-mask checks may sync, which capture forbids
        return model(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step()
        expected = {}
        for routes in ([0, -1], [-1, 0], [-1, -1], [0, 0]):
            prism_fast.set_routes(model, torch.tensor(routes))
            expected[tuple(routes)] = step().clone()     # eager, same routes
        for routes in ([-1, 0], [0, 0], [-1, -1], [0, -1]):
            prism_fast.set_routes(model, torch.tensor(routes))
            graph.replay()
            torch.testing.assert_close(static_out, expected[tuple(routes)], rtol=1e-5, atol=1e-5)


def test_compiled_decode_matches_eager(setup):
    """HF's own compiled decode (static cache → torch.compile(fullgraph=True, mode=
    "reduce-overhead") of the decode forward): no graph break, CUDA graphs really used (a skip
    raises), PEFT's tokens, and routes that follow the prompts from one generate to the next
    while the second call reuses the first's cache (same addresses: graphs are replayed)."""
    from transformers import CompileConfig, StaticCache

    path, base, pm, gate = setup
    model = prism_fast.patch_model(M.clone(base), path)
    compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    cache = StaticCache(config=model.config, max_cache_len=16)
    ids0, mask0 = (t.cuda() for t in M.prompts(4, 9, "left", seed=5))   # mixed routes
    seen = []
    with torch.no_grad(), torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        # The same prompts in reverse order: same shapes, the routes reversed.
        for ids, mask in ((ids0, mask0), (ids0.flip(0), mask0.flip(0))):
            routes = M.official_routes(base, gate, ids, mask)
            names = ["__base__" if r < 0 else "persona_expert" for r in routes.tolist()]
            cache.reset()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                 do_sample=False, past_key_values=cache,
                                 compile_config=compile_config)
            ref = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                              do_sample=False, adapter_names=names)
            assert torch.equal(prism_fast.get_routes(model), routes)
            assert torch.equal(out, ref)
            seen.append(routes)
    assert (seen[0] < 0).any() and (seen[0] >= 0).any() and not torch.equal(*seen)
