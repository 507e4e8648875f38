"""Loading adapters and gates: PRISM output directories, PEFT directories (read by PEFT's own
loaders where peft is installed, by hand where it is not), lists of them, gate files."""

from __future__ import annotations

import sys

import pytest
import torch

import prism_fast
from prism_fast.loading import load_peft_dir
from tests import models as M

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_load_formats(tmp_path, prism_dir):
    path, base, pm, gate = prism_dir
    adapter = prism_fast.load_prism(path)
    assert len(adapter.personas) == 1 and adapter.gate is not None
    assert adapter.prism_config["architecture"] == "GatedSingleLoRA_TwoStage"
    assert prism_fast.load_prism(path / "persona_expert").gate is None   # plain PEFT dir
    # several personas: a list of PEFT dirs and a 3-class gate
    pm2 = M.peft_model(M.clone(base), n_adapters=2)
    pm2.save_pretrained(str(tmp_path / "two"))
    dirs = [tmp_path / "two" / "persona_expert", tmp_path / "two" / "p1"]   # plain PEFT dirs
    ids, mask = M.prompts(4, 8)
    gate3 = M.random_gate(64, n_classes=3)
    model = prism_fast.patch_model(M.clone(base), dirs, gate=gate3, backend="torch")
    out = M.forward(model, ids, mask)
    routes = prism_fast.get_routes(model)
    official = M.official_routes(base, gate3, ids, mask)
    assert torch.equal(routes, official)
    ref = M.peft_logits(pm2, ids, mask, routes, names=("persona_expert", "p1"))
    M.check_rows(out, ref, M.forward(base, ids, mask), routes)
    # a gate.pt path works too, and gate weights are cast to the model's dtype and device
    torch.save(gate3, tmp_path / "g3.pt")
    model2 = prism_fast.patch_model(M.clone(base), dirs, gate=tmp_path / "g3.pt")
    assert torch.equal(M.forward(model2, ids, mask), out)


def test_gates_of_prism_dirs(tmp_path, prism_dir):
    path, base, pm, _ = prism_dir
    assert prism_fast.load_prism([path]).gate is not None          # a list of one: same dir
    other = M.save_prism_dir(M.peft_model(M.clone(base), seed=9), M.random_gate(64),
                             tmp_path / "other")
    with pytest.raises(ValueError, match="gate: 2 PRISM directories each bring a binary gate"):
        prism_fast.patch_model(M.clone(base), [path, other])
    model = prism_fast.patch_model(M.clone(base), [path, other], gate=M.random_gate(64, 3))
    assert prism_fast.patch.GatedLoraLinear in {type(m) for m in model.modules()}
    (other / "gate.pt").unlink()
    with pytest.raises(FileNotFoundError, match="gate: expected .*gate.pt.*persona_expert"):
        prism_fast.load_prism(other)
    assert prism_fast.load_prism(other / "persona_expert").gate is None


def test_gate_pt_with_pickled_code_is_refused(tmp_path, prism_dir):
    path, _, _, _ = prism_dir

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"gate.0.weight": Evil()}, path / "gate.pt")
    with pytest.raises(ValueError, match="gate.pt: could not read"):
        prism_fast.load_prism(path)


def test_missing_and_corrupt_files(tmp_path, prism_dir):
    path, base, _, _ = prism_dir
    # missing and corrupt files
    with pytest.raises(FileNotFoundError, match="adapter: expected"):
        prism_fast.load_prism(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="gate: expected a gate.pt"):
        prism_fast.patch_model(M.clone(base), path, gate=tmp_path / "nowhere.pt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((path / "persona_expert" /
                                              "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        prism_fast.load_prism(bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: expected valid JSON"):
        prism_fast.load_prism(bad)
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        prism_fast.load_prism(bad)
    (path / "gate.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="gate.pt: could not read"):
        prism_fast.load_prism(path)


def _save_peft(tmp_path, name: str, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(target_modules=M.ALL7, layers_to_transform=[1, 2], **lora_kwargs)
    pm = get_peft_model(M.base_model(), cfg)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.1)
    pm.save_pretrained(str(tmp_path / name), safe_serialization=name != "bin")
    return tmp_path / name


@pytest.mark.parametrize("name,kwargs", [
    ("plain", dict(r=8, lora_alpha=16)),
    ("patterns", dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "layers.2.mlp.up_proj": 2},
                      alpha_pattern={"down_proj": 3})),
    ("rslora", dict(r=16, lora_alpha=8, use_rslora=True)),
    ("bin", dict(r=4, lora_alpha=4)),
])
def test_hand_path_equals_the_peft_path(tmp_path, monkeypatch, name, kwargs):
    """Without peft installed, the hand-written reader gives exactly what PEFT's loaders give."""
    d = _save_peft(tmp_path, name, **kwargs)
    with_peft = load_peft_dir(d)
    monkeypatch.setitem(sys.modules, "peft", None)          # `import peft` now fails
    by_hand = load_peft_dir(d)
    assert by_hand.modules.keys() == with_peft.modules.keys()
    for path, lw in with_peft.modules.items():
        other = by_hand.modules[path]
        assert torch.equal(lw.a, other.a) and torch.equal(lw.b, other.b), path
        assert lw.scaling == other.scaling, path
    assert (by_hand.layers_to_transform, by_hand.made_for) == \
        (with_peft.layers_to_transform, with_peft.made_for)
    if name == "patterns":
        q = with_peft.modules["model.layers.1.self_attn.q_proj"]
        assert q.a.shape[0] == 4 and q.scaling == 16 / 4
        assert with_peft.modules["model.layers.2.mlp.up_proj"].a.shape[0] == 2
        assert with_peft.modules["model.layers.1.mlp.up_proj"].a.shape[0] == 8
        assert with_peft.modules["model.layers.1.mlp.down_proj"].scaling == 3 / 8
    if name == "rslora":
        assert with_peft.modules["model.layers.1.mlp.up_proj"].scaling == 8 / 4


def test_the_peft_path_matches_peft_outputs(tmp_path):
    """A PEFT directory with rank and alpha patterns, patched, gives PEFT's own logits."""
    from peft import PeftModel

    d = _save_peft(tmp_path, "patterns", r=8, lora_alpha=16, rank_pattern={"q_proj": 4},
                   alpha_pattern={"down_proj": 3})
    pm = PeftModel.from_pretrained(M.base_model(), str(d)).eval()
    ids, mask = M.prompts(2, 6)
    routes = torch.tensor([0, -1])
    model = prism_fast.patch_model(M.base_model(), d, backend="torch")
    prism_fast.set_routes(model, routes)
    M.check_rows(M.forward(model, ids, mask), M.peft_logits(pm, ids, mask, routes, ("default",)),
                 M.forward(M.base_model(), ids, mask), routes)
