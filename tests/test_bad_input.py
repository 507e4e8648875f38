"""Bad input on the serving side (issue 17): each case a clear error naming the argument, what was
expected and what was given, or the right result; nothing silently wrong."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prism_fast
from tests import models as M

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served(prism_dir):
    """A fresh (never hooked by output_hidden_states) tiny Llama patched with the PRISM dir."""
    path, _, pm, _ = prism_dir
    return prism_fast.patch_model(M.base_model(), path, backend="torch"), path, pm


def _generate(model, b: int, **kw):
    ids, mask = M.prompts(b, 8, "left")
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                              **{"do_sample": False, **kw})


# ---- generate: one route per prompt ----------------------------------------------------------


def test_generate_refuses_a_routes_count_other_than_the_prompts(served):
    model, _, _ = served
    with pytest.raises(ValueError, match="prism_routes gave 2 routes but generate.. was given 4 "
                                         "prompts .expected one route per prompt"):
        _generate(model, 4, prism_routes=[0, -1])
    with pytest.raises(ValueError, match="prism_routes gave 1 routes but generate.. was given 2"):
        _generate(model, 2, prism_routes=[0])
    prism_fast.set_routes(model, [0, -1])
    with pytest.raises(ValueError, match="set_routes gave 2 routes but generate.. was given 4"):
        _generate(model, 4)
    # beams: the count is still one per prompt, never one per beam group
    with pytest.raises(ValueError, match="prism_routes gave 2 routes but generate.. was given 3"):
        _generate(model, 3, prism_routes=[0, -1], num_beams=2)
    prism_fast.set_routes(model, None)
    _generate(model, 3, prism_routes=[0, -1, 0], num_beams=2)
    assert prism_fast.get_routes(model).tolist() == [0, 0, -1, -1, 0, 0]   # per prompt, per beam
    _generate(model, 2, prism_routes=[-1, 0], num_return_sequences=3, do_sample=True)
    assert prism_fast.get_routes(model).tolist() == [-1, -1, -1, 0, 0, 0]


def test_generate_with_zero_rows(served):
    model, _, _ = served
    ids, mask = M.prompts(2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="input_ids: expected at least one prompt, got a "
                                             "batch of 0 rows"):
            model.generate(input_ids=ids[:0], attention_mask=mask[:0], max_new_tokens=2)
        with pytest.raises(ValueError, match="input_ids: expected at least one row, got a batch "
                                             "of 0 rows"):
            model(input_ids=ids[:0], attention_mask=mask[:0])
    _generate(model, 2)                                   # still serves


# ---- unpatched models, copies, pickles ----------------------------------------------------------


def test_routes_after_unpatch_are_refused_and_repatching_takes_them(served):
    model, path, _ = served
    ids, mask = M.prompts(2, 8)
    prism_fast.unpatch_model(model)
    # what unpatch_model leaves: exactly one forward pre-hook, the refusal
    assert [h.__name__ for h in model._forward_pre_hooks.values()] == ["_refuse_routes_kwarg"]
    assert not model._forward_hooks and not model.model._forward_pre_hooks
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(ValueError, match="prism_routes: this model was unpatched"):
            model(input_ids=ids, attention_mask=mask, prism_routes=[0, 0])
        with pytest.raises(ValueError, match="prism_routes"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                           prism_routes=[0, 0])
    assert torch.equal(M.forward(model, ids, mask), base)
    prism_fast.patch_model(model, path, backend="torch")
    assert "_refuse_routes_kwarg" not in [getattr(h, "__name__", "")
                                          for h in model._forward_pre_hooks.values()]
    with torch.no_grad():
        opened = model(input_ids=ids, attention_mask=mask, prism_routes=[0, 0]).logits
    assert not torch.equal(opened, base)


def test_deepcopy_is_independent(served):
    model, _, _ = served
    ids, mask = M.prompts(3, 8)
    twin = copy.deepcopy(model)
    prism_fast.set_routes(model, [-1, -1, -1])
    prism_fast.set_routes(twin, [0, 0, 0])
    closed, opened = M.forward(model, ids, mask), M.forward(twin, ids, mask)
    assert prism_fast.get_routes(model).tolist() == [-1, -1, -1]
    assert prism_fast.get_routes(twin).tolist() == [0, 0, 0]
    assert torch.equal(closed, M.forward(M.base_model(), ids, mask))
    assert not torch.equal(opened, closed)
    # the copy's gate writes the copy's routes; its generate runs the copy
    prism_fast.set_routes(twin, None)
    with torch.no_grad():
        twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, prism_routes=[0, -1, 0])
    assert prism_fast.get_routes(twin).tolist() == [0, -1, 0]
    assert prism_fast.get_routes(model).tolist() == [-1, -1, -1]
    prism_fast.unpatch_model(twin)                        # the copy's own hooks come off
    assert torch.equal(M.forward(model, ids, mask), closed)


def _unpicklable_upstream() -> str | None:
    """Why an unpatched model of this transformers + kernels cannot be pickled, if it cannot
    (transformers 5.17 with kernels 0.16 attach local function modules to the layers)."""
    try:
        pickle.dumps(M.base_model())
    except Exception as e:  # noqa: BLE001 - any failure here is upstream's, not ours
        return f"{type(e).__name__}: {e}"
    return None


def test_pickle_and_torch_save_of_a_patched_model(served):
    why = _unpicklable_upstream()
    if why is not None:
        pytest.skip(f"the unpatched model cannot be pickled with this transformers: {why}")
    model, _, _ = served
    ids, mask = M.prompts(2, 8)
    prism_fast.set_routes(model, [0, -1])
    ref = M.forward(model, ids, mask)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for loaded in (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False)):
        assert torch.equal(M.forward(loaded, ids, mask), ref)
        prism_fast.set_routes(loaded, [-1, -1])           # its own routes
        assert prism_fast.get_routes(model).tolist() == [0, -1]
        prism_fast.unpatch_model(loaded)
        assert torch.equal(M.forward(loaded, ids, mask), M.forward(M.base_model(), ids, mask))


def test_inference_mode_then_normal_calls(served):
    model, _, _ = served
    ids, mask = M.prompts(2, 8)
    with torch.inference_mode():
        prism_fast.set_routes(model, [0, -1])
        ref = model(input_ids=ids, attention_mask=mask).logits.clone()
        prism_fast.set_routes(model, None)
        model(input_ids=ids, attention_mask=mask)            # routes made by the gate
    prism_fast.set_routes(model, [0, -1])                     # once "Inplace update to inference…"
    assert torch.equal(M.forward(model, ids, mask), ref)
    _generate(model, 2)
    prism_fast.set_routes(model, None)
    assert M.forward(model, ids, mask).shape == ref.shape


def test_routes_on_the_meta_device(served):
    model, _, _ = served
    with pytest.raises(ValueError, match="routes: expected ids with values .* meta device"):
        prism_fast.set_routes(model, torch.zeros(2, dtype=torch.long, device="meta"))


def test_training_through_a_patched_model_says_how_to_train(served):
    model, _, _ = served
    ids, mask = M.prompts(2, 8)
    model.train()
    out = model(input_ids=ids, attention_mask=mask).logits     # a forward still serves
    assert torch.equal(out.detach(), M.forward(model.eval(), ids, mask))
    model.train()
    with pytest.raises(RuntimeError, match="patched model serves; it cannot train.*"
                                           "unpatch_model.*prism_fast.train"):
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    with torch.no_grad():                                       # serving in train mode is fine
        model(input_ids=ids, attention_mask=mask)


def test_triton_interpret_set_after_import_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import os, torch, prism_fast\n"
            "from prism_fast.ops import use_triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n"
            "    use_triton('triton', torch.device('cpu'))\n"
            "except ValueError as e:\n"
            "    print('ValueError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "ValueError backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before " \
           "triton is imported" in out.stdout, out.stdout + out.stderr
    assert "it is set now, but was not when triton and prism_fast were imported" in out.stdout


# ---- adapter directories ------------------------------------------------------------------------


def _v_only_with_a_q_pair(tmp_path) -> Path:
    """A PEFT dir whose config targets only v_proj but whose weights also hold q_proj pairs."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    d = tmp_path / "v_only"
    pm = get_peft_model(M.base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"],
                                                   layers_to_transform=[1, 2]))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.1)
    pm.save_pretrained(str(d))
    weights = load_file(str(d / "adapter_model.safetensors"))
    for key in list(weights):
        weights[key.replace("v_proj", "q_proj")] = torch.randn_like(weights[key])
    save_file(weights, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize("use_peft", [True, False])
def test_untargeted_weights_are_ignored_as_peft_does(tmp_path, monkeypatch, use_peft):
    from peft import PeftModel

    d = _v_only_with_a_q_pair(tmp_path)
    pm = PeftModel.from_pretrained(M.base_model(), str(d)).eval()
    if not use_peft:
        monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.warns(UserWarning, match="does not target; ignored, as PEFT does: "
                                         "model.layers.1.self_attn.q_proj"):
        persona = prism_fast.load_prism(d).personas[0]
    assert sorted(persona.modules) == ["model.layers.1.self_attn.v_proj",
                                       "model.layers.2.self_attn.v_proj"]
    ids, mask = M.prompts(2, 6)
    routes = torch.tensor([0, -1])
    with pytest.warns(UserWarning):
        model = prism_fast.patch_model(M.base_model(), d, backend="torch")
    prism_fast.set_routes(model, routes)
    M.check_rows(M.forward(model, ids, mask), M.peft_logits(pm, ids, mask, routes, ("default",)),
                 M.forward(M.base_model(), ids, mask), routes)


def _copy_adapter(prism_dir_path: Path, tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    shutil.copytree(prism_dir_path / "persona_expert", d)
    return d


@pytest.mark.parametrize("use_peft", [True, False])
@pytest.mark.parametrize("field,value,words", [
    ("r", "8", "r .and its pattern's values. expected a positive integer, got '8' .str."),
    ("r", 0, "r .and its pattern's values. expected a positive integer, got 0"),
    ("lora_alpha", "16", "lora_alpha .and its pattern's values. expected a number, got '16'"),
])
def test_config_numbers_of_the_wrong_type(prism_dir, tmp_path, monkeypatch, use_peft, field,
                                          value, words):
    d = _copy_adapter(prism_dir[0], tmp_path)
    config = json.loads((d / "adapter_config.json").read_text())
    config[field] = value
    (d / "adapter_config.json").write_text(json.dumps(config))
    if not use_peft:
        monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ValueError, match=f"adapter_config.json: {words}"):
        prism_fast.load_prism(d)


def test_config_that_is_not_an_object(prism_dir, tmp_path):
    d = _copy_adapter(prism_dir[0], tmp_path)
    (d / "adapter_config.json").write_text("[8, 16]")
    with pytest.raises(ValueError, match=r"adapter_config.json: expected a JSON object in .*"
                                         r"adapter.adapter_config.json, got a JSON list"):
        prism_fast.load_prism(d)
    (d / "adapter_config.json").write_text('{"r": 8,')
    with pytest.raises(ValueError, match=r"adapter_config.json: expected valid JSON in .*"
                                         r"adapter.adapter_config.json"):
        prism_fast.load_prism(d)


def _unreadable(path: Path) -> str:
    """Load `path` with prism_fast in a process that cannot read files mode 000 (root loses
    CAP_DAC_OVERRIDE); its exception type and message."""
    code = ("import prism_fast, sys\n"
            "try:\n"
            "    prism_fast.load_prism(sys.argv[1])\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    cmd = [sys.executable, "-c", code, str(path)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300).stdout


def test_unreadable_files_are_named_unreadable(prism_dir, tmp_path):
    d = _copy_adapter(prism_dir[0], tmp_path)
    (d / "adapter_model.safetensors").chmod(0)
    out = _unreadable(d)
    assert out.startswith("PermissionError adapter_model.safetensors:"), out
    assert "exists but cannot be read (permission denied)" in out
    (d / "adapter_model.safetensors").chmod(0o644)
    (d / "adapter_config.json").chmod(0)
    out = _unreadable(d)
    assert out.startswith("PermissionError adapter_config.json:"), out
    assert "exists but cannot be read" in out


def test_a_dict_where_a_list_of_adapters_is_expected(prism_dir):
    path, base, _, _ = prism_dir
    with pytest.raises(TypeError, match=r"adapter: expected a directory path, a list of them, or "
                                        r"a PrismAdapter, got dict .for several personas pass a "
                                        r"list"):
        prism_fast.patch_model(M.clone(base), {"a": str(path)})
    with pytest.raises(TypeError, match=r"adapter\[1\]: expected a directory path .str or Path., "
                                        r"got dict"):
        prism_fast.load_prism([path, {"a": str(path)}])


@pytest.mark.skipif(__import__("prism_fast.batching").batching.engine_supported(),
                    reason="transformers >= 5.25: its engine is supported (tests/test_batching.py)")
def test_older_engine_is_refused_clearly(served):
    """transformers < 5.25: continuous batching of a patched model names the version it needs."""
    model = served[0]
    with pytest.raises(RuntimeError, match=r"transformers >= 5\.25.*found"):
        model.generate_batch([[3, 4, 5]])
