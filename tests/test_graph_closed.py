"""All routes closed = the base graph: under torch.compile the host's all-closed flag is a
guard, so the all-closed graph holds no LoRA op (CPU, a counting aot_eager backend), and a CUDA
graph of it launches no LoRA kernel (GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import prism_fast
from tests import models as M

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.usefixtures("fresh_dynamo"),
]


def lora_ops(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and "prism_fast.gated_lora" in str(n.target))


def counting_backend(graphs: list[int]):
    """aot_eager that records, per compiled graph, how many gated-LoRA ops it holds."""

    def fw(gm, example_inputs):
        graphs.append(lora_ops(gm))
        return gm.forward

    return aot_autograd(fw_compiler=fw)


def test_all_closed_graph_has_no_lora_and_routes_stay_changeable():
    base = M.base_model("llama")
    model = prism_fast.patch_model(M.peft_model(M.clone(base)), backend="triton")
    ids, mask = M.prompts(2, 6)
    with torch.no_grad():   # routes exist before compiling (their absence is guarded too)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    graphs: list[int] = []
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))

    def logits(routes):
        prism_fast.set_routes(model, torch.tensor(routes))   # CPU ids: closed-ness host-known
        with torch.no_grad():
            return compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits

    closed = logits([-1, -1])
    assert graphs == [0], "the all-closed graph must hold no LoRA op"
    mixed = logits([0, -1])
    assert len(graphs) == 2 and graphs[1] > 0, "opening a route recompiles with the LoRA ops"
    again = logits([-1, -1])
    assert len(graphs) == 2, "back to all closed: the first graph again, no recompile"
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(closed, ref) and torch.equal(again, ref)
    assert torch.equal(mixed[1], ref[1]) and not torch.equal(mixed[0], ref[0])


def test_decode_after_an_eager_all_closed_prefill_compiles_without_lora():
    """HF's compiled decode with an eager prefill: the prefill's one host sync learns that the
    gate closed every route, and the compiled decode step is the base graph."""
    base = M.base_model("llama")
    gate = M.random_gate(64, seed=2)
    gate["gate.3.bias"] = torch.tensor([50.0, -50.0])    # the base class wins for every row
    model = prism_fast.patch_model(M.peft_model(M.clone(base)), gate=gate, backend="triton")
    ids, mask = M.prompts(2, 6)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert prism_fast.get_routes(model).tolist() == [-1, -1]
    graphs: list[int] = []
    step = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))
    nxt = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        step(input_ids=nxt, past_key_values=out.past_key_values,
             attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), use_cache=True)
    assert graphs == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_all_closed_cuda_graph_launches_no_lora_kernel(tmp_path):
    """A CUDA graph of the compiled all-closed forward holds the base model's kernels only
    (counted in the graph's debug dump); with a route open it holds the LoRA kernels."""
    base = M.base_model("llama").cuda()
    model = prism_fast.patch_model(M.peft_model(M.clone(base)), backend="triton")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(3, M.VOCAB, (2, 6), device="cuda")

    def kernels(routes) -> tuple[int, int]:
        prism_fast.set_routes(model, torch.tensor(routes))
        with torch.no_grad():
            for _ in range(2):   # compile and warm up outside the capture
                compiled(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            graph.enable_debug_mode()
            with torch.cuda.graph(graph):
                compiled(input_ids=ids, use_cache=False)
        dump = tmp_path / f"graph{len(list(tmp_path.iterdir()))}.dot"
        graph.debug_dump(str(dump))
        text = dump.read_text()
        return text.count("_gated_lora_kernel"), text.count("KERNEL")

    lora_closed, n_closed = kernels([-1, -1])
    lora_open, n_open = kernels([0, -1])
    assert lora_closed == 0 and lora_open > 0
    assert n_open > n_closed
