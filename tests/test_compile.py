"""torch.compile(fullgraph=True) and static-cache generate on patched models (CPU, aot_eager).

aot_eager traces the whole forward through Dynamo and AOTAutograd (graph breaks are errors
with fullgraph=True) and then runs the traced graph, with the custom ops opaque, so the Triton
backend runs through the interpreter inside the compiled graph.
"""

from __future__ import annotations

import pytest
import torch

import prism_fast
from tests import models as M
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("fresh_dynamo"),
]


@pytest.fixture(scope="module")
def prism(tmp_path_factory):
    return M.prism_case(tmp_path_factory.mktemp("c") / "out", 6, 9)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_forward_matches_eager(prism, backend):
    path, base, _, gate = prism
    model = prism_fast.patch_model(M.clone(base), path, backend=backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for seed in (5, 7):
        ids, mask = M.prompts(6, 9, "left", seed=seed)
        with torch.no_grad():
            eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            eager_routes = prism_fast.get_routes(model).clone()
            out = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(prism_fast.get_routes(model), eager_routes)
        assert torch.equal(eager_routes, M.official_routes(base, gate, ids, mask))
        assert rel_err(out, eager) <= MODEL_REL_TOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_cache_generate_compiled_routes_change(prism, backend):
    path, base, pm, gate = prism
    model = prism_fast.patch_model(M.clone(base), path, backend=backend)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    for seed in (5, 8):          # same batch size, other prompts: routes update in place
        ids, mask = M.prompts(4, 9, "left", seed=seed)
        routes = M.official_routes(base, gate, ids, mask)
        names = ["__base__" if r < 0 else "persona_expert" for r in routes.tolist()]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                 do_sample=False, cache_implementation="static")
            ref = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                              do_sample=False, adapter_names=names)
        assert torch.equal(prism_fast.get_routes(model), routes)
        assert torch.equal(out, ref)


def test_set_routes_between_compiled_calls_is_not_baked(prism):
    """Routes are a tensor read by the graph, never a constant of it."""
    path, base, pm, _ = prism
    model = prism_fast.patch_model(M.clone(base), path, backend="torch")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask = M.prompts(2, 6)
    outs = []
    for routes in ([0, -1], [-1, 0], [0, -1]):
        prism_fast.set_routes(model, torch.tensor(routes))
        with torch.no_grad():
            outs.append(compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    base_out = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(outs[0][1], base_out[1]) and torch.equal(outs[1][0], base_out[0])
    assert not torch.equal(outs[0][0], base_out[0])
    assert torch.equal(outs[0], outs[2])


def test_merge_open_model_compiles_on_the_split_path(prism):
    """merge_open decides on route values, which traced code may not read: a compiled forward
    takes the split path (fullgraph, no break), eager forwards still run on the copies."""
    path, base, _, _ = prism
    model = prism_fast.patch_model(M.clone(base), path, backend="torch", merge_open=True)
    routing = model._prism_patch.routing
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask = M.prompts(2, 6)
    prism_fast.set_routes(model, [0, 0])
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
        decided = []
        hook = model.model.layers[0].register_forward_hook(
            lambda *_: decided.append(routing.merged))        # runs after prism's own hook
        eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        hook.remove()
    assert rel_err(out, eager) <= MODEL_REL_TOL and decided == [0]


# ---- the public ops, compiled by a user around their own function (SPEC §6) ------------------


def _op_inputs(device):
    from tests.helpers import make_lora

    x = torch.randn(3, 5, 24, device=device)
    w, b = torch.randn(16, 24, device=device), torch.randn(16, device=device)
    a, bb, s = (t.to(device) for t in make_lora(2, 4, 24, 16, torch.float32))
    gate = [torch.randn(8, 24), torch.randn(8), torch.randn(3, 8), torch.randn(3)]
    return x, w, b, a, bb, s, [t.to(device) for t in gate]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                        reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_public_ops_compile_fullgraph(backend, device):
    """No data-dependent guard (the CPU id range check is skipped while tracing) and no graph
    break; out-of-range ids are closed rows in the compiled op as in the kernels."""
    x, w, b, a, bb, s, gate = _op_inputs(device)
    ids = torch.tensor([1, -1, 0], device=device)

    def f(x, w, b, a, bb, s, ids, h):
        y = prism_fast.gated_lora_linear(x, w, b, a, bb, s, ids, backend=backend)
        return y, prism_fast.prism_gate(h, *gate, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    h = x[:, -1]
    y, routes = compiled(x, w, b, a, bb, s, ids, h)
    y_eager, routes_eager = f(x, w, b, a, bb, s, ids, h)
    assert rel_err(y, y_eager) <= MODEL_REL_TOL and torch.equal(routes, routes_eager)
    assert torch.equal(y[1], torch.nn.functional.linear(x, w, b)[1])
    bad = torch.tensor([7, -1, -9], device=device)            # only closed rows, never indexed
    y_bad, _ = compiled(x, w, b, a, bb, s, bad, h)
    assert torch.equal(y_bad, torch.nn.functional.linear(x, w, b))
