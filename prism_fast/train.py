"""Train a PRISM adapter fast: layer-0-only gate features (Stage A) and batched top-k
distillation of the LoRA (Stage B), reading the official Stage 2 data and writing the official
output layout (`persona_expert/`, `gate.pt`, `gated_lora_config.json`).

    python -m prism_fast.train --model <HF dir> --data <Stage 2 dir> --out <output dir>

Differences from the official `prism/run_gated_lora.py`, each on purpose:
- the teacher sees the context: its top-k is computed with the persona as system message (the
  distill set's "system" field) and the student's loss without it, aligned on the response
  tokens. The official code clears the system prompt before computing the teacher, so its
  teacher is the student at initialisation and the KL is zero up to fp16 rounding.
  `teacher="files"` reads the official `teacher_logits_topk/sample_{i}.pt` instead.
- Stage B runs micro-batches of padded samples through one forward, and the loss never forms
  the [T, V] logits (`topk_distill_loss`); a step's loss is the mean over its samples of each
  sample's official loss (kl_div "batchmean" · T²). The official loop instead backpropagates
  the sum over its micro-batch of 2 divided by grad_accum = 8; under AdamW only the scale of
  the gradient differs, which clipping at 1.0 can see.
- gate features run the embeddings and decoder layer 0 only, at the last prompt token (where
  prism_fast's routing reads them); the official code runs every layer and reads the last
  non-pad token of prompt + response. The best-accuracy gate is kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from prism_fast.hf import decoder_and_root
from prism_fast.ops import topk_distill_loss

TEACHER_TOPK = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Official defaults of `train_gated_lora` (epochs: rounds 5 × epochs_per_round 2)."""
    epochs: int = 10
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    micro_batch: int = 8             # samples per optimiser step
    # Padded tokens per forward within a step (`forward_groups`). Measured on this project's
    # 2-core CPU (SmolLM2, s/sample of a step of 8): 160-token samples 0.64 / 0.53 / 0.49 / 0.46
    # at 1 / 2 / 4 / 8 per forward (1280 tokens best); 544-token samples 2.23 / 1.95 / 2.45 /
    # 2.74 (1088 best; 2176 and more are slower and hold 2–4× the activations). No GPU number
    # yet: raise it there (GEMMs of 1.5k rows are already compute-bound on an H100).
    max_batch_tokens: int = 1536
    temperature: float = 2.0
    max_len: int = 1024
    max_grad_norm: float = 1.0
    weight_decay: float = 0.01
    gate_lr: float = 1e-3            # official: lr × gate_lr_mult 5
    gate_epochs: int = 30
    gate_target_acc: float = 95.0
    gate_patience: int = 5
    seed: int = 0


# ----------------------------------------------------------------------------- data

def encode(tokenizer, system: str | None, instruction: str, output: str | None,
           max_len: int | None) -> tuple[torch.Tensor, int]:
    """(input_ids [T], prompt_len) as the official `_format_to_ids`: the chat template over
    system (an explicit "" when cleared) + user (+ assistant), truncated to max_len if given."""
    def text(with_output: bool) -> str:
        msgs = [] if system is None else [{"role": "system", "content": system}]
        msgs.append({"role": "user", "content": instruction})
        if with_output:
            msgs.append({"role": "assistant", "content": output})
        return tokenizer.apply_chat_template(msgs, tokenize=False,
                                             add_generation_prompt=not with_output)
    ids = tokenizer(text(True), truncation=max_len is not None, max_length=max_len,
                    return_tensors="pt").input_ids[0]
    prompt_len = len(tokenizer(text(False), return_tensors="pt").input_ids[0])
    return ids, prompt_len


def load_stage2(data_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """distill_set.json (gate 1) and retain_set.json (gate 0, optional) of an official Stage 2."""
    data_dir = Path(data_dir)
    distill_path = data_dir / "distill_set.json"
    if not distill_path.is_file():
        raise FileNotFoundError(f"data_dir: expected {distill_path} (official Stage 2 output), "
                                f"not found")
    distill = json.loads(distill_path.read_text())
    retain_path = data_dir / "retain_set.json"
    retain = json.loads(retain_path.read_text()) if retain_path.is_file() else []
    return distill, retain


def load_teacher_file(path: str | os.PathLike) -> dict:
    """One official teacher file: topk_values [L, k] fp16, topk_indices [L, k], prompt_len."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher file: expected {path}, not found")
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("topk_values", "topk_indices", "prompt_len"):
        if key not in data:
            raise ValueError(f"teacher file {path}: expected key {key!r}, got {sorted(data)}")
    return data


@torch.no_grad()
def context_teacher(model, ids: torch.Tensor, prompt_len: int, k: int = TEACHER_TOPK) -> dict:
    """Teacher top-k at the response positions of `ids` (the prompt *with* the persona)."""
    root, decoder, _ = decoder_and_root(model)
    hidden = decoder(input_ids=ids[None]).last_hidden_state[0, prompt_len - 1:-1]    # [L, H]
    logits = root.lm_head(hidden)                                                    # [L, V]
    vals, idx = logits.float().topk(k, dim=-1)
    return {"topk_values": vals.half(), "topk_indices": idx.int(), "prompt_len": prompt_len}


# ----------------------------------------------------------------------------- Stage A

class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


@torch.no_grad()
def gate_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  last: torch.Tensor) -> torch.Tensor:
    """hidden_states[1] (decoder layer 0's output) at positions `last` [B]: [B, H].

    Runs the embeddings and layer 0 only: a hook on layer 0 stops the forward there (the
    official `get_hidden_state` runs every layer with output_hidden_states=True).
    """
    _, decoder, layers = decoder_and_root(model)

    def stop(_module, _args, out):
        raise _Stop(out[0] if isinstance(out, tuple) else out)

    handle = layers[0].register_forward_hook(stop)
    try:
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        raise RuntimeError("gate_features: decoder layer 0 never ran")
    except _Stop as s:
        hidden = s.hidden                                                   # [B, T, H]
    finally:
        handle.remove()
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class BinaryGate(nn.Module):
    """PRISM's BinaryGate: `gate.0` Linear(H, 256) → GELU → Dropout(0.1) → `gate.3`
    Linear(256, C), built as the official code builds it, so its state_dict has exactly the keys
    of `gate.pt`."""

    def __init__(self, hidden: int, classes: int = 2, width: int = 256):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Dropout(0.1),
                                  nn.Linear(width, classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, H] → [B, C] logits
        return self.gate(h)


def train_gate(features: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
               dtype: torch.dtype = torch.float32) -> tuple[dict, float]:
    """Stage A as the official `_train_gate_only`: class weights N / (2 N_c), AdamW (wd 0.01),
    cosine schedule, clipping 1.0, batch min(32, N), target accuracy and patience; returns the
    best-accuracy state dict and that accuracy (%)."""
    n = features.shape[0]
    gate = BinaryGate(features.shape[1]).to(features.device, dtype)
    n_pos = int(targets.sum())
    weights = torch.tensor([n / (2.0 * max(n - n_pos, 1)), n / (2.0 * max(n_pos, 1))],
                           device=features.device, dtype=dtype)
    opt = torch.optim.AdamW(gate.parameters(), lr=cfg.gate_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.gate_epochs)
    batch = min(32, n)
    best, best_state, no_improve = -1.0, None, 0
    for _ in range(cfg.gate_epochs):
        gate.train()
        perm = torch.randperm(n)
        correct = 0
        for s in range(0, n, batch):
            i = perm[s:s + batch]
            logits = gate(features[i].to(dtype))
            loss = F.cross_entropy(logits, targets[i], weight=weights)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gate.parameters(), 1.0)
            opt.step()
            correct += int((logits.argmax(-1) == targets[i]).sum())
        sched.step()
        acc = 100.0 * correct / n
        if acc > best:
            best, best_state, no_improve = acc, copy.deepcopy(gate.state_dict()), 0
        else:
            no_improve += 1
        if acc >= cfg.gate_target_acc or (no_improve >= cfg.gate_patience and acc > 85.0):
            break
    return best_state, best


# ----------------------------------------------------------------------------- Stage B

def add_lora(model, cfg: TrainConfig):
    """PEFT LoRA "persona_expert" on the seven projections of layers 1…N−1 (never layer 0)."""
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        bias="none", task_type="CAUSAL_LM", target_modules=TARGETS,
                        layers_to_transform=list(range(1, n_layers)))
    return get_peft_model(model, config, adapter_name="persona_expert")


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask [B, T] plus each sample's teacher and prompt_len."""
    t = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)
    att = torch.zeros(len(samples), t, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :len(s["input_ids"])] = s["input_ids"]
        att[b, :len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": att, "samples": samples}


def distill_loss(model, batch: dict, temperature: float) -> torch.Tensor:
    """Mean over the batch's samples of the official per-sample loss, with one padded forward
    and the student's logits only at the teacher's top-k ids (never [T, V])."""
    root, decoder, _ = decoder_and_root(model)
    head = root.lm_head
    dev = head.weight.device
    # No attention mask, on purpose: the batch is right-padded and attention is causal, so every
    # pad comes after all of its row's real tokens and no real position can attend to it;
    # positions are 0…len−1 either way, and the loss reads real positions only (pads get no
    # gradient). Without a mask SDPA takes its causal path instead of a materialised [B, 1, T, T]
    # mask: measured on CPU (SmolLM2, B = 8, T = 544, forward + backward) 1.86 s/sample
    # against 2.45 s with the mask.
    hidden = decoder(input_ids=batch["input_ids"].to(dev)).last_hidden_state        # [B, T, H]
    rows, vals, idx, weight = [], [], [], []
    samples = batch["samples"]
    for b, s in enumerate(samples):
        pl, n_tok = s["prompt_len"], len(s["input_ids"])
        # The official code truncates to the shorter of the response and the teacher's rows.
        n = min(n_tok - pl, s["topk_values"].shape[0])
        if n <= 0:
            continue
        rows.append(hidden[b, pl - 1:pl - 1 + n])                                   # [n, H]
        vals.append(s["topk_values"][:n])
        idx.append(s["topk_indices"][:n])
        weight.append(torch.full((n,), 1.0 / (n * len(samples)), device=dev))
    if not rows:
        return hidden.sum() * 0.0
    per_row = topk_distill_loss(torch.cat(rows), head.weight, head.bias,
                                torch.cat(vals).to(dev), torch.cat(idx).to(dev), temperature,
                                reduction="none")
    return (per_row * torch.cat(weight)).sum()


def forward_groups(samples: list[dict], max_tokens: int) -> list[list[dict]]:
    """The samples sorted by length and grouped greedily so that each group's padded size
    (count × longest) stays within `max_tokens`; a longer sample gets a group of its own."""
    groups, group = [], []
    for s in sorted(samples, key=lambda s: len(s["input_ids"])):
        if group and (len(group) + 1) * len(s["input_ids"]) > max_tokens:
            groups.append(group)
            group = []
        group.append(s)
    return groups + [group] if group else groups


def step_backward(model, samples: list[dict], cfg: TrainConfig, pad_id: int) -> torch.Tensor:
    """Backpropagate one optimiser step's loss, the mean over `samples` of each sample's official
    loss, in forwards of at most `cfg.max_batch_tokens` padded tokens (each group's mean weighted
    by its share of the samples); returns the loss, detached."""
    total = 0.0
    for group in forward_groups(samples, cfg.max_batch_tokens):
        loss = distill_loss(model, collate(group, pad_id), cfg.temperature)
        (loss * (len(group) / len(samples))).backward()
        total = total + loss.detach() * (len(group) / len(samples))
    return total


def make_optimizer(params, cfg: TrainConfig, total_steps: int):
    """AdamW (wd 0.01) with the official linear schedule, warm-up min(50, total // 10)."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=min(50, total_steps // 10),
                                            num_training_steps=total_steps)
    return opt, sched


def train_lora(model, samples: list[dict], cfg: TrainConfig, pad_id: int, progress: bool = True):
    """Stage B on a PEFT model: one optimiser step per `cfg.micro_batch` samples."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    steps = math.ceil(len(samples) / cfg.micro_batch) * cfg.epochs
    opt, sched = make_optimizer(params, cfg, steps)
    model.train()
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(samples)).tolist()
        bar = tqdm(range(0, len(samples), cfg.micro_batch), desc=f"LoRA epoch {epoch + 1}",
                   disable=not progress)
        total = 0.0
        for i, s in enumerate(bar):
            opt.zero_grad()
            loss = step_backward(model, [samples[j] for j in order[s:s + cfg.micro_batch]], cfg,
                                 pad_id)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            total += float(loss)
            history.append(float(loss))
            bar.set_postfix(kl=f"{total / (i + 1):.4f}")
    return history


# ----------------------------------------------------------------------------- pipeline

def train(model, tokenizer, data_dir, output_dir, cfg: TrainConfig | None = None,
          teacher: str = "context", progress: bool = True) -> Path:
    """Both stages from an official Stage 2 directory; writes the official output layout."""
    cfg = cfg or TrainConfig()
    if teacher not in ("context", "files"):
        raise ValueError(f"teacher: expected 'context' or 'files', got {teacher!r}")
    torch.manual_seed(cfg.seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    distill, retain = load_stage2(data_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dev = next(model.parameters()).device

    samples = []
    for i, s in enumerate(distill):
        ids, pl = encode(tokenizer, "", s["instruction"], s["output"], cfg.max_len)
        if teacher == "files":
            t = load_teacher_file(Path(data_dir) / "teacher_logits_topk" / f"sample_{i}.pt")
        else:
            # The persona lengthens the prompt: keep exactly the student's response tokens.
            t_ids, t_pl = encode(tokenizer, s.get("system", ""), s["instruction"], s["output"],
                                 None)
            t = context_teacher(model, t_ids[:t_pl + len(ids) - pl].to(dev), t_pl)
        samples.append({"input_ids": ids, "prompt_len": pl, "gate_target": 1,
                        "topk_values": t["topk_values"].float(),
                        "topk_indices": t["topk_indices"].long()})
    retain_samples = []
    for s in retain:
        ids, pl = encode(tokenizer, "", s["instruction"], s["output"], cfg.max_len)
        retain_samples.append({"input_ids": ids, "prompt_len": pl, "gate_target": 0})

    # Stage A: features at each sample's last prompt token, micro-batches of 32.
    everything = samples + retain_samples
    feats = []
    for s in range(0, len(everything), 32):
        chunk = everything[s:s + 32]
        batch = collate(chunk, pad_id)
        last = torch.tensor([c["prompt_len"] - 1 for c in chunk], device=dev)
        feats.append(gate_features(model, batch["input_ids"].to(dev),
                                   batch["attention_mask"].to(dev), last).float())
    targets = torch.tensor([c["gate_target"] for c in everything], device=dev)
    gate_state, gate_acc = train_gate(torch.cat(feats), targets, cfg)
    torch.save(gate_state, out / "gate.pt")

    # Stage B.
    model = add_lora(model, cfg)
    history = train_lora(model, samples, cfg, pad_id, progress)
    model.save_pretrained(out)
    (out / "gated_lora_config.json").write_text(json.dumps({
        "architecture": "GatedSingleLoRA_TwoStage", "model": str(model.config.name_or_path),
        "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_epochs": cfg.epochs,
        "gate_epochs": cfg.gate_epochs, "learning_rate": cfg.lr, "gate_lr": cfg.gate_lr,
        "temperature": cfg.temperature, "n_distill": len(distill), "n_retain": len(retain),
        "final_gate_acc": gate_acc, "gate_target_acc": cfg.gate_target_acc,
        "training": "two-stage (A: router → B: LoRA)", "teacher": teacher,
        "loss_type": "KL distillation, top-k (prism_fast)", "final_kl": history[-1] if history
        else None, "prism_fast_config": asdict(cfg)}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a PRISM adapter (gate + LoRA) fast.")
    p.add_argument("--model", required=True, help="Hugging Face model directory or id")
    p.add_argument("--data", required=True, help="official Stage 2 dir (distill_set.json, ...)")
    p.add_argument("--out", required=True, help="output dir (persona_expert/, gate.pt, ...)")
    p.add_argument("--teacher", default="context", choices=["context", "files"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for f, v in asdict(TrainConfig()).items():
        p.add_argument(f"--{f}", type=type(v), default=v)
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    print(train(model, tok, a.data, a.out, cfg, teacher=a.teacher))


if __name__ == "__main__":
    main()
