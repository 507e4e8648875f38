"""PEFT's LoRA on MoE experts (target_parameters): inert wrappers (every B exactly zero, what
PEFT ≥ 0.22 adds when it loads an adapter naming gate_proj/up_proj/down_proj onto a model with
fused experts) are unwrapped by patch_model and restored by unpatch_model; trained ones are
refused; the trainer adapts nn.Linear projections only."""

from __future__ import annotations

import json

import pytest
import torch

import prism_fast
from tests import models as M

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _moe_peft(base, expert_b: float):
    """PEFT on Qwen2-MoE's seven Linear projections and, through target_parameters, on its
    fused experts, whose B is filled with `expert_b`."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=M.MOE7, target_parameters=EXPERTS,
                     layers_to_transform=[1, 2], lora_dropout=0.0)
    pm = get_peft_model(M.clone(base), cfg, adapter_name="persona_expert")
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.1 if "lora_B" in n else 0.2)
    for m in pm.modules():
        if isinstance(m, LoraLayer) and not isinstance(m.get_base_layer(), torch.nn.Linear):
            for b in m.lora_B.values():
                torch.nn.init.constant_(b.weight, expert_b)
    return pm.eval()


def _is_wrapped(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def test_inert_expert_wrappers_are_unwrapped_and_restored():
    base = M.base_model("qwen2_moe")
    ids, mask = M.prompts(4, 9, "left")
    base_out = M.forward(base, ids, mask)
    pm = _moe_peft(base, expert_b=0.0)
    assert _is_wrapped(pm.base_model.model.model.layers[1].mlp.experts)
    routes = torch.tensor([0, -1, 0, -1], dtype=torch.int32)
    ref = M.peft_logits(pm, ids, mask, routes, arch="qwen2_moe")
    before = dict(pm.named_modules())
    unpatched = M.forward(pm, ids, mask)

    prism_fast.patch_model(pm, backend="torch")
    experts = pm.base_model.model.model.layers[1].mlp.experts
    assert not _is_wrapped(experts) and type(experts).__name__ == "Qwen2MoeExperts"
    prism_fast.set_routes(pm, routes)
    M.check_rows(M.forward(pm, ids, mask), ref, base_out, routes, "qwen2_moe")
    prism_fast.set_routes(pm, torch.full((4,), -1))
    assert torch.equal(M.forward(pm, ids, mask), base_out)

    prism_fast.unpatch_model(pm)
    assert dict(pm.named_modules()) == before
    assert torch.equal(M.forward(pm, ids, mask), unpatched)


def test_adapter_naming_plain_projections_loads_with_any_peft(tmp_path):
    """An adapter whose config says gate_proj/up_proj/down_proj (how PRISM's and PEFT's MoE
    adapters are written) loaded by PeftModel.from_pretrained: with PEFT ≥ 0.22 this adds
    zero-B expert wrappers, with older PEFT it does not; patching gives the same rows."""
    from peft import PeftModel

    base = M.base_model("qwen2_moe")
    ids, mask = M.prompts(4, 9, "left")
    pm = M.peft_model(M.clone(base), "qwen2_moe")
    routes = torch.tensor([0, 0, -1, 0], dtype=torch.int32)
    ref = M.peft_logits(pm, ids, mask, routes, arch="qwen2_moe")
    pm.save_pretrained(str(tmp_path))
    path = tmp_path / "persona_expert"
    path = path if path.is_dir() else tmp_path
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = list(M.ALL7)
    (path / "adapter_config.json").write_text(json.dumps(config))

    loaded = PeftModel.from_pretrained(M.clone(base), str(path), adapter_name="persona_expert")
    prism_fast.patch_model(loaded, backend="torch")
    prism_fast.set_routes(loaded, routes)
    M.check_rows(M.forward(loaded, ids, mask), ref, M.forward(base, ids, mask), routes,
                 "qwen2_moe")


def test_trained_expert_lora_is_refused():
    pm = _moe_peft(M.base_model("qwen2_moe"), expert_b=0.01)
    before = dict(pm.named_modules())
    with pytest.raises(ValueError, match=r"persona_expert.*trained LoRA on model\.layers\.\d+\."
                                         r"mlp\.experts.*Qwen2MoeExperts.*nn\.Linear"):
        prism_fast.patch_model(pm)
    assert dict(pm.named_modules()) == before and getattr(pm, "_prism_patch", None) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_trainer_adapts_linear_projections_only(arch):
    from prism_fast.training import TrainConfig, add_lora

    base = M.base_model(arch)
    pm = add_lora(M.clone(base), TrainConfig(lora_r=4, lora_alpha=8))
    adapted = {path for path, m in pm.base_model.model.named_modules()
               if _is_wrapped(m) and "base_layer" not in path}
    linear = {path for path, m in base.named_modules() if isinstance(m, torch.nn.Linear)
              and path.rpartition(".")[2] in M.ALL7 and not path.startswith("model.layers.0.")}
    assert adapted == linear
    targets = pm.peft_config["persona_expert"].target_modules
    assert (set(targets) == set(M.ALL7)) == (arch == "llama")
