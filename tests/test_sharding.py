"""patch_model under Hugging Face tensor parallelism: world size 2, spawned from pytest.

One spawn runs every check on both ranks (CPU, gloo, the torch backend, and the Triton backend
through the interpreter for Llama) and saves what it saw; the tests below compare it with the
same patched model in this single process. Models are tiny and each rank loads each once.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import prism_fast
from tests import models as M
from tests.interpreter_fixes import fix_interpreter
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ["llama", "qwen2", "mistral"]
B, T = 8, 10
MIXES = {"mixed": [0, -1, 0, -1, -1, 0, 0, -1], "open": [0] * B, "closed": [-1] * B}
GEN = dict(max_new_tokens=5)
# lm_head's rows divide over the 2 ranks: transformers 5.17 refuses to gather an uneven colwise
# output (M.VOCAB = 97 rows); ≥ M.VOCAB, so the prompts' ids stay in range.
TP_VOCAB = 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_checks(model, prism_dir, backend: str, device) -> dict:
    """Everything one rank (or the single process) sees of one patched model."""
    ids, mask = (t.to(device) for t in M.prompts(B, T, "left", seed=5))
    out = {}
    with torch.no_grad():
        out["unpatched"] = model(input_ids=ids, attention_mask=mask).logits
        prism_fast.patch_model(model, prism_dir, backend=backend)
        out["gate"] = model(input_ids=ids, attention_mask=mask).logits
        out["gate_routes"] = prism_fast.get_routes(model)
        for name, routes in MIXES.items():
            prism_fast.set_routes(model, routes)
            out[name] = model(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(prism_fast.get_routes(model).cpu(), torch.tensor(routes).int())
        prism_fast.set_routes(model, None)
        out["greedy"] = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **GEN)
        out["greedy_routes"] = prism_fast.get_routes(model)
        torch.manual_seed(0)
        out["sample"] = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                       top_k=20, **GEN)
        prism_fast.unpatch_model(model)
        out["after_unpatch"] = model(input_ids=ids, attention_mask=mask).logits
    return {k: v.cpu() for k, v in out.items()}


def _refusals(model) -> dict[str, str]:
    """patch_model's refusals on a sharded model (before any collective: no rank waits)."""
    errors = {}
    plan = model._tp_plan
    for name, change in (("style", {"model.layers.*.self_attn.o_proj": "rowwise_rep"}),
                         ("sequence", {"model.norm": "sequence_parallel"})):
        model._tp_plan = {**plan, **change}
        try:
            prism_fast.patch_model(model, model.prism_dir)
        except ValueError as e:
            errors[name] = str(e)
        model._tp_plan = plan
    return errors


def _worker(rank: int, world: int, port: int, cases: Path, dist_backend: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    fix_interpreter()   # a spawned process does not load conftest (the Triton backend's checks)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(dist_backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    gpu = dist_backend == "nccl"
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    results = {}
    try:
        for arch in ARCHS:
            model = AutoModelForCausalLM.from_pretrained(cases / arch / "model",
                                                         tp_plan="auto").eval()
            backends = ["auto"] if gpu else ["torch", "triton"] if arch == "llama" else ["torch"]
            for backend in backends:
                results[arch, backend] = _run_checks(model, cases / arch / "prism", backend, device)
            if arch == "llama":
                results["rowwise"] = _run_checks(model, cases / arch / "rowwise", "auto", device)
                model.prism_dir = cases / arch / "prism"
                results["refusals"] = _refusals(model)
                uneven = AutoModelForCausalLM.from_pretrained(cases / "uneven" / "model",
                                                              tp_plan="auto")
                try:
                    prism_fast.patch_model(uneven, cases / "uneven" / "prism")
                except ValueError as e:
                    results["refusals"]["uneven"] = str(e)
        torch.save(results, cases / f"rank{rank}.pt")
    finally:
        model = uneven = None   # the sharded weights hold the process groups: free them
        gc.collect()            # before destroy_process_group, not in the exit's teardown
        dist.destroy_process_group()


def _make_cases(root: Path) -> dict:
    """Saved models and adapters for the ranks, and what one process computes with them."""
    from peft import LoraConfig, get_peft_model

    expected = {}
    for arch in ARCHS:
        base = M.base_model(arch, vocab=TP_VOCAB)
        ids, mask = M.prompts(B, T, "left", seed=5)
        gate = M.balance_gate(base, M.random_gate(64), ids, mask)
        M.save_prism_dir(M.peft_model(M.clone(base), arch), gate, root / arch / "prism")
        base.save_pretrained(root / arch / "model")
        expected[arch] = _run_checks(M.clone(base), root / arch / "prism", "torch", "cpu")
        if arch == "llama":
            # LoRA on the rowwise projections only: added after the all-reduce, it would count
            # twice (or once per rank).
            cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"],
                             layers_to_transform=[1, 2])
            pm = get_peft_model(M.clone(base), cfg)
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    torch.nn.init.normal_(p, std=0.2)
            pm.save_pretrained(root / arch / "rowwise")
            expected["rowwise"] = _run_checks(M.clone(base), root / arch / "rowwise", "torch", "cpu")
    # 95 MLP columns do not divide over 2 ranks (transformers shards them unevenly)
    import transformers as tf

    odd = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=95,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=TP_VOCAB))
    odd.save_pretrained(root / "uneven" / "model")
    pm = get_peft_model(M.clone(odd), LoraConfig(r=4, target_modules=["down_proj"],
                                                 layers_to_transform=[1]))
    pm.save_pretrained(root / "uneven" / "prism")
    return expected


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """(single-process results, [rank 0 results, rank 1 results])."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("tp")
    expected = _make_cases(root)
    mp.spawn(_worker, args=(2, _free_port(), root, "gloo"), nprocs=2)
    return expected, [torch.load(root / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("arch,backend", [("llama", "torch"), ("llama", "triton"),
                                          ("qwen2", "torch"), ("mistral", "torch")])
def test_tp_logits_match_single_process_for_every_route_mix(ranks, arch, backend):
    expected, got = ranks
    single = expected[arch]
    for rank in got:
        tp = rank[arch, backend]
        # The unsharded and the sharded base differ by summation order only.
        assert rel_err(tp["unpatched"], single["unpatched"]) <= MODEL_REL_TOL
        for name in ("gate", *MIXES):
            assert rel_err(tp[name], single[name]) <= MODEL_REL_TOL, name
        # Closed rows are the unpatched sharded model's, bit for bit.
        closed = torch.tensor(MIXES["mixed"]) < 0
        assert torch.equal(tp["mixed"][closed], tp["unpatched"][closed])
        assert torch.equal(tp["closed"], tp["unpatched"])
        assert torch.equal(tp["after_unpatch"], tp["unpatched"])


@pytest.mark.parametrize("arch", ARCHS)
def test_tp_routes_equal_on_every_rank_and_generate_matches(ranks, arch):
    expected, got = ranks
    single = expected[arch]
    assert 0 < (single["gate_routes"] >= 0).sum() < B, "the gate should mix open and closed rows"
    for rank in got:
        tp = rank[arch, "torch"]
        assert torch.equal(tp["gate_routes"], single["gate_routes"])
        assert torch.equal(tp["greedy_routes"], single["gate_routes"])
        assert torch.equal(tp["greedy"], single["greedy"])
        assert torch.equal(tp["sample"], single["sample"])


def test_tp_rowwise_lora_is_added_before_the_all_reduce(ranks):
    expected, got = ranks
    single = expected["rowwise"]
    # The LoRA term is far above the tolerance, so counting it twice could not pass.
    assert rel_err(single["open"], single["unpatched"]) > 1000 * MODEL_REL_TOL
    for rank in got:
        assert rel_err(rank["rowwise"]["open"], single["open"]) <= MODEL_REL_TOL
        assert rel_err(rank["rowwise"]["mixed"], single["mixed"]) <= MODEL_REL_TOL


def test_tp_refusals(ranks):
    _, got = ranks
    errors = got[0]["refusals"]
    assert re.search(r"o_proj is sharded with tp_plan style 'rowwise_rep'; patch_model handles "
                     r"'colwise' and 'rowwise'", errors["style"])
    assert "sequence parallelism (model.norm: sequence_parallel)" in errors["sequence"]
    assert re.search(r"down_proj \(rowwise\): its 95 input columns do not divide evenly over 2",
                     errors["uneven"])


def test_tp_not_sharded_model_is_untouched_by_sharding():
    """A model without DTensor weights takes the single-device path (tp_plan returns None),
    unless its weights are local shards without DTensor (older tensor parallelism): refused."""
    from prism_fast import sharding

    base = M.base_model()
    up = base.model.layers[1].mlp.up_proj
    assert sharding.tp_plan(base, {"model.layers.1.mlp.up_proj": up}, peft=False) is None
    up.weight = torch.nn.Parameter(up.weight[:48])            # this rank's half of the rows
    with pytest.raises(ValueError, match=r"declares \(96, 64\) but holds a \(48, 64\) weight"):
        sharding.tp_plan(base, {"model.layers.1.mlp.up_proj": up}, peft=False)


def test_readme_tp_example_runs_under_torchrun(tmp_path):
    """The README's 'Several GPUs' script, run as it says: torchrun --nproc-per-node 2."""
    readme = (ROOT / "README.md").read_text()
    (script,) = re.findall(r"```python prism_tp\.py\n(.*?)```", readme, flags=re.S)
    (tmp_path / "prism_tp.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    model_dir, prism_dir = _readme_case(tmp_path)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), str(tmp_path / "prism_tp.py"),
                          str(model_dir), str(prism_dir)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = run.stdout.strip().splitlines()[-1]
    base = M.base_model(vocab=TP_VOCAB)
    model = prism_fast.patch_model(base, prism_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert printed == f"{prism_fast.get_routes(model).tolist()} {out.tolist()}"


def _readme_case(tmp_path: Path):
    base = M.base_model(vocab=TP_VOCAB)
    M.save_prism_dir(M.peft_model(M.clone(base)), M.random_gate(64), tmp_path / "prism")
    base.save_pretrained(tmp_path / "model")
    return tmp_path / "model", tmp_path / "prism"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_tp_on_two_gpus_nccl(tmp_path):
    import torch.multiprocessing as mp

    expected = _make_cases(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), tmp_path, "nccl"), nprocs=2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for arch in ARCHS:
            tp, single = got[arch, "auto"], expected[arch]
            assert torch.equal(tp["gate_routes"], single["gate_routes"])
            for name in ("gate", *MIXES):    # fp32 on GPU: tf32 matmuls may be on (SPEC §2)
                assert rel_err(tp[name], single[name]) <= 1e-3, name
