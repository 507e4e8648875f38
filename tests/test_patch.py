"""patch_model against PEFT on tiny random models of every supported architecture."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import prism_fast
from prism_fast.kernels import gated_lora as gl
from prism_fast.kernels import gated_lora_launch
from tests import models as M
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# Both backends on every architecture: Qwen2-MoE's shared expert runs the per-token ids path.
CASES = [(a, b) for a in M.ARCHS for b in ("torch", "triton")]


@pytest.mark.parametrize("arch,backend", CASES)
def test_drop_in_peft_mixed_routes(arch, backend):
    base = M.base_model(arch)
    ids, mask = M.prompts(4, 9, "left")
    base_out = M.forward(base, ids, mask)
    pm = M.peft_model(M.clone(base), arch, n_adapters=2)
    routes = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    ref = M.peft_logits(pm, ids, mask, routes, names=("persona_expert", "p1"), arch=arch)
    prism_fast.patch_model(pm, backend=backend)
    prism_fast.set_routes(pm, routes)
    M.check_rows(M.forward(pm, ids, mask), ref, base_out, routes, arch)
    # all closed: bit-identical to the unpatched model
    prism_fast.set_routes(pm, torch.full((4,), -1))
    assert torch.equal(M.forward(pm, ids, mask), base_out)
    # no gate and no routes: every sequence uses adapter 0, like PEFT's active adapter
    prism_fast.set_routes(pm, None)
    out = M.forward(pm, ids, mask)
    assert torch.equal(prism_fast.get_routes(pm), torch.zeros(4, dtype=torch.int32))
    pm_ref = M.peft_model(M.clone(base), arch, 2)
    assert rel_err(out, M.peft_logits(pm_ref, ids, mask, torch.zeros(4, dtype=torch.int32),
                                    arch=arch)) <= MODEL_REL_TOL


@pytest.mark.parametrize("arch", M.ARCHS)
def test_unpatch_is_exact(arch):
    base = M.base_model(arch)
    pm = M.peft_model(M.clone(base), arch)
    ids, mask = M.prompts(2, 6)
    before = {n: m for n, m in pm.named_modules()}
    params = {n: p for n, p in pm.named_parameters()}
    ref = M.forward(pm, ids, mask)
    prism_fast.patch_model(pm, backend="torch")
    prism_fast.unpatch_model(pm)
    assert {n: m for n, m in pm.named_modules()} == before
    assert all(p is params[n] for n, p in pm.named_parameters())
    assert torch.equal(M.forward(pm, ids, mask), ref)
    with pytest.raises(ValueError, match="unpatched"):
        prism_fast.unpatch_model(pm)


def test_parameter_names_kept_and_base_weights_not_copied():
    """The patched model has the same parameter names, holding the very same Parameters; a
    load_prism() result is accepted as the adapter."""
    from prism_fast.loading import PrismAdapter
    from prism_fast.peft_loading import personas_from_peft_model

    base = M.base_model()
    adapter = PrismAdapter(personas=personas_from_peft_model(M.peft_model(M.clone(base)))[0])
    params = dict(base.named_parameters())
    state = base.state_dict()
    prism_fast.patch_model(base, adapter)
    assert isinstance(base.model.layers[1].self_attn.q_proj, prism_fast.patch.GatedLoraLinear)
    assert list(dict(base.named_parameters())) == list(params)
    assert all(p is params[n] for n, p in base.named_parameters())
    assert list(base.state_dict()) == list(state)


# ---- the gate: single pass, equal to the official two-pass formula ---------------------------


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gate_routes_match_two_pass(prism_dir, padding, backend):
    path, base, pm, gate = prism_dir
    ids, mask = M.prompts(8, 10, padding, seed=5)
    official = M.official_routes(base, gate, ids, mask)
    assert 0 < (official >= 0).sum() < 8, "the fixture should mix open and closed rows"
    base_out = M.forward(base, ids, mask)
    ref = M.peft_logits(pm, ids, mask, official)
    model = prism_fast.patch_model(M.clone(base), path, backend=backend)
    out = M.forward(model, ids, mask)
    assert torch.equal(prism_fast.get_routes(model), official)
    M.check_rows(out, ref, base_out, official)


def test_single_pass_gate_runs_once_per_prefill(prism_dir, monkeypatch):
    """One forward computes the gate once (after layer 0) and never reruns the model."""
    path, base, _, _ = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="torch")
    calls = {"gate": 0, "layer0": 0}
    real_gate = prism_fast.reference.prism_gate
    monkeypatch.setattr(prism_fast.reference, "prism_gate",
                        lambda *a: calls.__setitem__("gate", calls["gate"] + 1) or real_gate(*a))
    model.model.layers[0].register_forward_hook(
        lambda *a: calls.__setitem__("layer0", calls["layer0"] + 1))
    ids, mask = M.prompts(3, 7)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert calls == {"gate": 1, "layer0": 4}   # gate at prefill only; 1 prefill + 3 decodes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_generate_greedy_matches_peft_and_routes_redecided(prism_dir, backend):
    path, base, pm, gate = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend=backend)
    for seed in (5, 6):
        ids, mask = M.prompts(4 if seed == 5 else 3, 10, "left", seed=seed)
        routes = M.official_routes(base, gate, ids, mask)
        names = ["__base__" if r < 0 else "persona_expert" for r in routes.tolist()]
        with torch.no_grad():
            ref = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                              do_sample=False, adapter_names=names)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                 do_sample=False)
        assert torch.equal(prism_fast.get_routes(model), routes)
        assert torch.equal(out, ref)


def test_generate_sampling_and_beam_search(prism_dir):
    path, base, pm, _ = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="torch")
    ids, mask = M.prompts(2, 8, "left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5)
    with torch.no_grad():
        prism_fast.set_routes(model, torch.full((2,), -1))      # all closed: the base model
        torch.manual_seed(0)
        a = model.generate(**kw, do_sample=True, top_k=20)
        torch.manual_seed(0)
        b = base.generate(**kw, do_sample=True, top_k=20)
        assert torch.equal(a, b)
        assert torch.equal(model.generate(**kw, num_beams=3, do_sample=False),
                           base.generate(**kw, num_beams=3, do_sample=False))
        prism_fast.set_routes(model, torch.zeros(2, dtype=torch.int32))   # per prompt, 3 beams each
        out = model.generate(**kw, num_beams=3, do_sample=False)
        assert torch.equal(out, pm.generate(**kw, num_beams=3, do_sample=False))


# ---- launches: groups share one op; all-closed decodes launch nothing --------------------------


def test_few_launches(prism_dir, monkeypatch):
    path, base, _, gate = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="triton")
    launches = []
    real = gl._gated_lora_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(gated_lora_launch, "_gated_lora_kernel", Counting())   # what it launches
    ids, mask = M.prompts(2, 5)
    prism_fast.set_routes(model, torch.tensor([0, -1]))
    M.forward(model, ids, mask)
    # 2 LoRA layers × (q/k/v, o, gate/up, down) = 8 groups, a shrink and an expand launch each
    # (split, the default path)
    assert len(launches) == 16
    launches.clear()
    # all closed, known on the host: neither the prefill nor the decode steps launch
    prism_fast.set_routes(model, torch.tensor([-1, -1]))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert launches == [], "an all-closed batch must launch no LoRA work"
    # all closed by the gate's decision: the prefill launches (early exits), its decodes don't
    closed_gate = dict(gate, **{"gate.3.bias": torch.tensor([100.0, -100.0])})
    model = prism_fast.patch_model(M.clone(base), path, gate=closed_gate, backend="triton")
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(prism_fast.get_routes(model), torch.tensor([-1, -1], dtype=torch.int32))
    assert len(launches) == 16, "the prefill launches (twice per group), the decodes never"


def test_bf16_model_closed_rows_bit_exact(prism_dir):
    path, _, _, _ = prism_dir
    base = M.base_model(dtype=torch.bfloat16)
    ids, mask = M.prompts(3, 7)
    model = prism_fast.patch_model(M.clone(base), path, backend="triton")
    prism_fast.set_routes(model, torch.tensor([-1, 0, -1]))
    out, ref = M.forward(model, ids, mask), M.forward(base, ids, mask)
    assert torch.equal(out[[0, 2]], ref[[0, 2]])
    assert not torch.equal(out[1], ref[1])
    assert model.model.layers[1].mlp.down_proj.group.lora_a.dtype == torch.bfloat16


# ---- refusals (SPEC §5) --------------------------------------------------------------------


def test_refuse_layer0_lora_with_gate(tmp_path):
    base = M.base_model()
    pm = M.peft_model(M.clone(base), layers=[0, 1, 2])
    d = M.save_prism_dir(pm, M.random_gate(64), tmp_path / "l0")
    with pytest.raises(ValueError, match="layer 0.*set_routes"):
        prism_fast.patch_model(M.clone(base), d)
    # without the gate, routes come from set_routes and layer-0 LoRA is fine
    model = prism_fast.patch_model(M.clone(base), d / "persona_expert")
    prism_fast.set_routes(model, torch.tensor([0, -1]))
    ids, mask = M.prompts(2, 6)
    M.check_rows(M.forward(model, ids, mask), M.peft_logits(pm, ids, mask, torch.tensor([0, -1])),
               M.forward(base, ids, mask), torch.tensor([0, -1]))


def test_refuse_other_models(prism_dir):
    path, base, pm, _ = prism_dir
    # another model: more layers in the adapter than in the model
    small = M.base_model()
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    with pytest.raises(ValueError, match="layer 2 but the model has 2 layers"):
        prism_fast.patch_model(small, path)
    # another model: hidden size
    import transformers as tf

    wide = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=96, intermediate_size=96,
                                              num_hidden_layers=3, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=97))
    with pytest.raises(ValueError, match="lora_A .r, 96.*another model"):
        prism_fast.patch_model(wide, path)
    # gate for another hidden size / with the wrong number of classes
    with pytest.raises(ValueError, match="gate: expected gate.0.weight .D, 64."):
        prism_fast.patch_model(M.clone(base), path, gate=M.random_gate(32))
    with pytest.raises(ValueError, match="gate: expected 2 classes"):
        prism_fast.patch_model(M.clone(base), path, gate=M.random_gate(64, 3))
    with pytest.raises(ValueError, match="gate: expected keys"):
        prism_fast.patch_model(M.clone(base), path, gate={"gate.0.weight": torch.zeros(1)})


def test_refuse_misuse(prism_dir):
    path, base, pm, _ = prism_dir
    model = prism_fast.patch_model(M.clone(base), path)
    with pytest.raises(ValueError, match="already patched"):
        prism_fast.patch_model(model, path)
    with pytest.raises(ValueError, match="routes: expected values in -1…0"):
        prism_fast.set_routes(model, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="routes: expected an integer tensor"):
        prism_fast.set_routes(model, torch.zeros(2))
    prism_fast.set_routes(model, [0, -1, 0])             # a list is fine too
    ids, mask = M.prompts(2, 5)
    with pytest.raises(ValueError, match="routes: set_routes gave 3 routes but the batch has 2 rows"):
        M.forward(model, ids, mask)
    with pytest.raises(ValueError, match="adapter: expected None for a PeftModel"):
        prism_fast.patch_model(pm, path)
    with pytest.raises(ValueError, match="adapter: expected a PRISM/PEFT"):
        prism_fast.patch_model(M.clone(base))
    with pytest.raises(ValueError, match="model.model.layers"):
        prism_fast.patch_model(torch.nn.Linear(2, 2), path)
    with pytest.raises(ValueError, match="backend: expected one of"):
        prism_fast.patch_model(M.clone(base), path, backend="cuda")


def test_refuse_moe_expert_targets(tmp_path):
    from safetensors.torch import save_file

    base = M.base_model("qwen2_moe")
    d = tmp_path / "experts"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    save_file({"base_model.model.model.layers.1.mlp.experts.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.1.mlp.experts.lora_B.weight": torch.zeros(96, 4)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="Qwen2MoeExperts; only nn.Linear targets"):
        prism_fast.patch_model(base, d)
    (d / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "target_parameters": ["mlp.experts.gate_up_proj"]}')
    with pytest.raises(ValueError, match="target_parameters"):
        prism_fast.load_prism(d)
    # attention and shared-expert targets of the same model are fine (test_drop_in_peft…)


# ---- the README example runs as written ----------------------------------------------------


def test_readme_examples():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has python examples"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# ---- generate without a cache, copies, PEFT methods, gates of PRISM dirs -------------------


def test_generate_without_cache_decides_once(prism_dir):
    """generate(use_cache=False) re-feeds the whole sequence each step; the decision is still
    the prefill's (SPEC: kept for every decode step), so tokens equal the cached generate."""
    path, base, pm, gate = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="torch")
    ids, mask = M.prompts(6, 10, "left", seed=5)
    routes = M.official_routes(base, gate, ids, mask)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**kw)
        uncached = model.generate(**kw, use_cache=False)
    assert torch.equal(prism_fast.get_routes(model), routes)
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_static_cache_generate_gates_at_the_last_prompt_token(prism_dir, padding):
    """With a static cache, generate hands the decoder a 4-D mask; the gate still reads each
    row's last non-pad token from the 2-D mask given to generate (right padding: not t − 1),
    also with beams (the mask repeated per beam)."""
    path, base, _, gate = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="torch")
    for seed in range(4):
        ids, mask = M.prompts(4, 9, padding, seed=seed)
        routes = M.official_routes(base, gate, ids, mask)
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                  cache_implementation="static")
        with torch.no_grad():
            model.generate(**kw)
            assert torch.equal(prism_fast.get_routes(model), routes), f"seed {seed}"
            model.generate(**kw, num_beams=2)
            assert torch.equal(prism_fast.get_routes(model), routes.repeat_interleave(2))


def test_routes_are_copies(prism_dir):
    path, base, _, _ = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="torch")
    assert prism_fast.get_routes(model) is None          # no prefill yet
    mine = torch.tensor([0, -1], dtype=torch.int32)
    prism_fast.set_routes(model, mine)
    ids, mask = M.prompts(2, 6)
    M.forward(model, ids, mask)
    first = prism_fast.get_routes(model)
    prism_fast.set_routes(model, torch.tensor([-1, 0], dtype=torch.int32))
    M.forward(model, ids, mask)
    assert torch.equal(mine, torch.tensor([0, -1], dtype=torch.int32)), "caller's tensor kept"
    assert torch.equal(first, mine) and not torch.equal(prism_fast.get_routes(model), first)
    with pytest.raises(ValueError, match="set_routes gave 2 routes but the batch has 4 rows"):
        M.forward(model, *M.prompts(4, 6))                 # outside generate: exactly B routes


def test_peft_methods_after_drop_in(tmp_path):
    base = M.base_model()
    pm = M.peft_model(M.clone(base))
    ids, mask = M.prompts(2, 6)
    ref = M.forward(pm, ids, mask)
    prism_fast.patch_model(pm, backend="torch")
    with pm.disable_adapter():
        assert torch.equal(M.forward(pm, ids, mask), M.forward(base, ids, mask))
    pm.disable_adapter_layers()
    assert torch.equal(M.forward(pm, ids, mask), M.forward(base, ids, mask))
    pm.enable_adapter_layers()
    assert rel_err(M.forward(pm, ids, mask), ref) <= MODEL_REL_TOL
    with pytest.raises(ValueError, match="adapter_names: .*set_routes"):
        pm(input_ids=ids, attention_mask=mask, adapter_names=["__base__", "persona_expert"])
    with pytest.raises(ValueError, match="adapter_names: .*set_routes"):
        pm.generate(input_ids=ids, max_new_tokens=2, adapter_names=["__base__"] * 2)
    pm.save_pretrained(str(tmp_path / "saved"))          # PEFT's own modules, weights included
    assert isinstance(pm.base_model.model.model.layers[1].mlp.up_proj,
                      prism_fast.patch.GatedLoraLinear)
    # PEFT writes a non-"default" adapter into its own subfolder: the PRISM layout
    reloaded = prism_fast.patch_model(M.clone(base), tmp_path / "saved" / "persona_expert",
                                      backend="torch")
    assert rel_err(M.forward(reloaded, ids, mask), ref) <= MODEL_REL_TOL
    prism_fast.unpatch_model(pm)
    assert "disable_adapter" not in pm.__dict__ and "generate" not in pm.__dict__


def test_per_call_routes_leave_the_sticky_routes(prism_dir):
    """prism_routes= on a forward or generate routes that call only; set_routes stays."""
    path, base, pm, _ = prism_dir
    model = prism_fast.patch_model(M.clone(base), path, backend="torch")
    ids, mask = M.prompts(2, 6)
    prism_fast.set_routes(model, [-1, -1])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, prism_routes=[0, -1]).logits
        ref = M.peft_logits(pm, ids, mask, torch.tensor([0, -1]))
        M.check_rows(out, ref, M.forward(base, ids, mask), torch.tensor([0, -1]))
        assert torch.equal(M.forward(model, ids, mask), M.forward(base, ids, mask))   # sticky: closed
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        got = model.generate(**kw, prism_routes=torch.tensor([0, 0]))
        assert torch.equal(got, pm.generate(**kw, adapter_names=["persona_expert"] * 2))
        assert torch.equal(model.generate(**kw), base.generate(**kw))
        with pytest.raises(ValueError, match="routes: expected values in -1…0"):
            model(input_ids=ids, attention_mask=mask, prism_routes=[3, 0])
        with pytest.raises(ValueError, match="routes: prism_routes gave 1 routes but the batch"):
            model(input_ids=ids, attention_mask=mask, prism_routes=[0])
        assert torch.equal(M.forward(model, ids, mask), M.forward(base, ids, mask))


# ---- adapter dtype; adapters for other models; quantized targets ----------------------------


def test_fp32_adapters_are_closer_to_peft_on_a_bf16_model():
    """PEFT keeps LoRA weights in fp32 on a bf16 model; adapter_dtype=torch.float32 does too."""
    base = M.base_model(dtype=torch.bfloat16)
    pm = M.peft_model(M.clone(base))
    assert pm.base_model.model.model.layers[1].self_attn.q_proj.lora_A["persona_expert"] \
        .weight.dtype == torch.float32
    ids, mask = M.prompts(4, 9)
    routes = torch.zeros(4, dtype=torch.int32)
    ref = M.peft_logits(pm, ids, mask, routes)
    errs = {}
    for dtype in (None, torch.float32):
        model = prism_fast.patch_model(M.clone(pm), backend="torch", adapter_dtype=dtype)
        group = model.base_model.model.model.layers[1].self_attn.q_proj.group
        assert group.lora_a.dtype == group.lora_b.dtype == (dtype or torch.bfloat16)
        errs[dtype] = rel_err(M.forward(model, ids, mask), ref)
    assert errs[torch.float32] < errs[None], errs
    for bad, exc in (("float32", TypeError), (torch.int8, ValueError), (torch.float64, ValueError)):
        with pytest.raises(exc, match="adapter_dtype: expected None .* or a floating dtype"):
            prism_fast.patch_model(M.clone(pm), adapter_dtype=bad)
    with pytest.raises(ValueError, match="adapter_dtype: expected None, torch.float32 or the "
                                         "layers' own dtype, got torch.float16"):
        prism_fast.patch_model(M.clone(pm), adapter_dtype=torch.float16)


def test_refuse_prism_adapter_of_a_model_with_other_layer_count(tmp_path):
    """PRISM puts LoRA on layers 1…N−1: a 4-layer model's adapter names its layer count."""
    small, big = M.base_model(n_layers=4), M.base_model(n_layers=6)
    d = M.save_prism_dir(M.peft_model(M.clone(small)), M.random_gate(64), tmp_path / "four")
    with pytest.raises(ValueError, match="made for a model with 4 layers.*this model has 6 layers"):
        prism_fast.patch_model(big, d)
    prism_fast.patch_model(small, d)                     # its own model is fine
    # a plain PEFT directory may target any layers: only targets beyond the model are refused
    prism_fast.patch_model(M.base_model(n_layers=6), d / "persona_expert")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning",
                            "ignore::DeprecationWarning")
def test_refuse_quantized_targets(prism_dir):
    path, base, _, _ = prism_dir
    quantized = torch.ao.quantization.quantize_dynamic(M.clone(base), {torch.nn.Linear},
                                                       dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"a torch\.ao\.nn\.quantized\.dynamic\.modules\.linear"
                                         r"\.Linear: quantized layers are not supported yet"):
        prism_fast.patch_model(quantized, path)


def test_set_routes_of_another_batch_size_reach_its_decode_steps():
    """Routes for a batch of 8 set while the last forward was a closed batch of 1: the next
    decode step of the batch of 8 runs open, not skipped on the old routes' `closed` (the
    decode-floor benchmark measured B = 8 "open" steps this way on the base path)."""
    base = M.base_model()
    pm = M.peft_model(M.clone(base))
    ref = copy.deepcopy(pm)
    prism_fast.patch_model(pm, backend="torch")
    prism_fast.patch_model(ref, backend="torch")
    ids = torch.randint(3, M.VOCAB, (8, 6))
    with torch.no_grad():
        out = {}
        for m in (pm, ref):
            prism_fast.set_routes(m, [0] * 8)
            out[m] = m(input_ids=ids, use_cache=True)
        prism_fast.set_routes(pm, [-1])
        pm(input_ids=ids[:1], use_cache=True)              # a closed prefill of one row
        prism_fast.set_routes(pm, [0] * 8)
        got, want = (m(input_ids=ids[:, -1:], past_key_values=out[m].past_key_values,
                       use_cache=True).logits for m in (pm, ref))
    assert torch.equal(got, want)
