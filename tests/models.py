"""Tiny random-init Hugging Face models of each supported architecture, and PRISM artifacts.

Built from configs: nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from prism_fast.hf import LORA_TARGETS
from tests.tolerances import MODEL_REL_TOL, rel_err

ALL7 = list(LORA_TARGETS)   # a fresh list: callers hand it to LoraConfig
# Qwen2-MoE's seven nn.Linear projections: attention and the shared expert. Qualified, because
# PEFT ≥ 0.22 maps plain gate_proj/up_proj/down_proj onto the fused routed experts as well.
MOE7 = [f"self_attn.{p}" for p in ALL7[:4]] + [f"shared_expert.{p}" for p in ALL7[4:]]
N_LAYERS = 3
VOCAB = 97


def _config(arch: str, n_layers: int = N_LAYERS, vocab: int = VOCAB):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(**common), ALL7
    if arch == "mistral":
        return tf.MistralConfig(**common), ALL7
    if arch == "qwen2":
        return tf.Qwen2Config(**common), ALL7
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=16, **common), ALL7
    if arch == "gemma2":   # not in ARCHS: the trainer's soft-capped logits (final cap 0.5)
        return tf.Gemma2Config(head_dim=16, final_logit_softcapping=0.5, **common), ALL7
    if arch == "phi3":
        return tf.Phi3Config(**common), ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=80,
                                 num_experts=4, num_experts_per_tok=2, **common), MOE7
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "qwen2_moe"]


def base_model(arch: str = "llama", dtype=torch.float32, seed: int = 0, n_layers: int = N_LAYERS,
               vocab: int = VOCAB):
    """A tiny random model; `vocab` ≥ VOCAB (prompts' ids are below VOCAB)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config, _ = _config(arch, n_layers, vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # Stronger biases than the zero init, so Qwen2's q/k/v biases are exercised.
    for name, p in model.named_parameters():
        if name.endswith("proj.bias"):
            torch.nn.init.normal_(p, std=0.1)
    return model


def peft_model(model, arch: str = "llama", n_adapters: int = 1, rank: int = 8, seed: int = 1,
               layers=None, std_a: float = 0.2, std_b: float = 0.1):
    """PEFT LoRA adapters "persona_expert", "p1", … on layers 1…N−1 with random B (PEFT inits
    B to zero, which would make every test pass trivially): A ~ N(0, std_a), B ~ N(0, std_b)."""
    from peft import LoraConfig, get_peft_model

    _, targets = _config(arch)
    layers = list(range(1, model.config.num_hidden_layers)) if layers is None else layers
    names = ["persona_expert"] + [f"p{i}" for i in range(1, n_adapters)]
    torch.manual_seed(seed)
    pm = None
    for i, name in enumerate(names):
        cfg = LoraConfig(r=rank + 4 * i, lora_alpha=2 * rank, target_modules=targets,
                         layers_to_transform=layers, lora_dropout=0.0, bias="none")
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=std_b if "lora_B" in n else std_a)
    return pm.eval()


def random_gate(hidden: int, n_classes: int = 2, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"gate.0.weight": torch.randn(256, hidden, generator=g) / hidden**0.5,
            "gate.0.bias": torch.randn(256, generator=g) * 0.1,
            "gate.3.weight": torch.randn(n_classes, 256, generator=g) / 16,
            "gate.3.bias": torch.zeros(n_classes)}


def official_routes(model, gate: dict, input_ids, attention_mask) -> torch.Tensor:
    """PRISM's two-pass formula: hidden_states[1] of the model with the adapter off, at each
    row's last non-pad token, through the gate MLP in the model's dtype, argmax − 1."""
    import torch.nn.functional as F

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hs = out.hidden_states[1]
    last = torch.tensor([int(torch.nonzero(m).max()) for m in attention_mask])
    h = hs[torch.arange(hs.shape[0]), last]
    w1, b1, w2, b2 = (gate[f"gate.{k}"].to(hs.device, hs.dtype)
                      for k in ("0.weight", "0.bias", "3.weight", "3.bias"))
    return (F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2).argmax(-1) - 1).to(torch.int32)


def balance_gate(model, gate: dict, input_ids, attention_mask) -> dict:
    """Shift the 'lora' logit bias so that about half of these prompts open the gate."""
    import torch.nn.functional as F

    with torch.no_grad():
        hs = model(input_ids=input_ids, attention_mask=attention_mask,
                   output_hidden_states=True).hidden_states[1]
    last = torch.tensor([int(torch.nonzero(m).max()) for m in attention_mask])
    h = hs[torch.arange(hs.shape[0]), last].float()
    logits = F.linear(F.gelu(F.linear(h, gate["gate.0.weight"], gate["gate.0.bias"])),
                      gate["gate.3.weight"])
    diff = logits[:, 1] - logits[:, 0]
    gate = dict(gate)
    gate["gate.3.bias"] = torch.tensor([0.0, -float(diff.median()) + 1e-3])
    return gate


def save_prism_dir(pm, gate: dict, root: Path) -> Path:
    """Write an official PRISM output directory (layout of prism/run_gated_lora.py)."""
    root.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(root), selected_adapters=["persona_expert"])
    if not (root / "persona_expert").is_dir():   # PEFT puts the default-named adapter at root
        (root / "persona_expert").mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (root / f).rename(root / "persona_expert" / f)
    torch.save(gate, root / "gate.pt")
    (root / "gated_lora_config.json").write_text(json.dumps({
        "architecture": "GatedSingleLoRA_TwoStage", "lora_r": 8, "lora_alpha": 16}))
    return root


def prompts(b: int = 4, t: int = 9, padding: str = "left", seed: int = 3):
    """input_ids [b, t] with ragged lengths padded on one side, and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(b):
        n_pad = (i * 2) % (t - 2)
        if n_pad:
            if padding == "left":
                mask[i, :n_pad] = 0
            else:
                mask[i, t - n_pad:] = 0
    return torch.where(mask.bool(), ids, torch.zeros_like(ids)), mask


def clone(model):
    return copy.deepcopy(model)


def prism_case(root: Path, n_prompts: int = 8, t: int = 10):
    """A tiny Llama, its PEFT twin and a PRISM output dir whose gate opens about half of
    `prompts(n_prompts, t, seed=5)`: (path, base, peft_model, gate)."""
    base = base_model()
    ids, mask = prompts(n_prompts, t, "left", seed=5)
    gate = balance_gate(base, random_gate(64), ids, mask)
    pm = peft_model(clone(base))
    return save_prism_dir(pm, gate, root), base, pm, gate


# ---- comparing patched models with PEFT ------------------------------------------------------


def peft_logits(pm, ids, mask, routes, names=("persona_expert",), arch="llama"):
    """PEFT with adapter_names per row = the route. Qwen2-MoE's shared expert sees flattened
    (B·T, H) inputs, which PEFT's adapter_names cannot split, so there every route runs as a
    whole batch with that adapter set, and each row is taken from its route's run."""
    adapter_names = ["__base__" if r < 0 else names[r] for r in routes.tolist()]
    with torch.no_grad():
        if arch != "qwen2_moe":
            return pm(input_ids=ids, attention_mask=mask, adapter_names=adapter_names).logits
        out = None
        for r in sorted(set(routes.tolist())):
            if r < 0:
                with pm.disable_adapter():
                    full = pm(input_ids=ids, attention_mask=mask).logits
            else:
                pm.set_adapter(names[r])
                full = pm(input_ids=ids, attention_mask=mask).logits
            out = full.clone() if out is None else out
            out[routes == r] = full[routes == r]
        pm.set_adapter(names[0])
        return out


def forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def check_rows(out, ref, base, routes, arch="llama"):
    """Open rows within bounds of PEFT; closed rows bit-identical to the unpatched model.

    Qwen2-MoE is the exception for closed rows of *mixed* batches: its routed experts batch the
    tokens of all rows per expert, so the expert GEMM sizes (and CPU GEMM kernels) depend on the
    other rows' routing, in the unpatched model as much as in the patched one. Those rows are
    held to the accuracy bound; all-closed batches stay bit-exact for every architecture.
    """
    closed = routes < 0
    if arch == "qwen2_moe":
        assert rel_err(out[closed], base[closed]) <= MODEL_REL_TOL
    else:
        assert torch.equal(out[closed], base[closed]), "closed rows must equal the unpatched model"
    if (~closed).any():
        err = rel_err(out[~closed], ref[~closed])
        assert err <= MODEL_REL_TOL, f"open rows: rel err {err:.3g} vs PEFT"
