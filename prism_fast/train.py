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

Arguments, the data and the output folder are checked before any work. The output is written
into a temporary sibling folder and renamed into place when complete (an interrupted run leaves
the previous output whole); an existing output is replaced only with `overwrite=True`
(`--overwrite`). Samples that cannot train (the prompt fills max_len, or longer than the model's
positions) are skipped with a warning and counted in gated_lora_config.json ("n_skipped").
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prism_fast import train_output
from prism_fast.hf import LORA_TARGETS, decoder_and_root
from prism_fast.ops import topk_distill_loss

# Re-exported: prism_fast.train is the trainer's one public module.
from prism_fast.train_data import (  # noqa: F401
    TEACHER_TOPK,
    build_samples,
    check_model,
    collate,
    context_teacher,
    encode,
    head_logits,
    load_stage2,
    load_teacher_file,
    logit_cap,
)
from prism_fast.train_gate import BinaryGate, gate_features, stage_a, train_gate  # noqa: F401


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


# ----------------------------------------------------------------------------- checks

_POSITIVE_INTS = ("epochs", "micro_batch", "max_batch_tokens", "max_len", "lora_r", "gate_epochs")
_POSITIVE_FLOATS = ("lr", "lora_alpha", "temperature", "max_grad_norm", "gate_lr")


def check_config(cfg: TrainConfig) -> None:
    """ValueError naming the field, what was expected and what was given; before any work."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    for name in _POSITIVE_INTS:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    for name in _POSITIVE_FLOATS:
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a number in [0, 1), got {cfg.lora_dropout!r}")
    if cfg.weight_decay < 0 or cfg.gate_patience < 0:
        raise ValueError(f"weight_decay / gate_patience: expected ≥ 0, got {cfg.weight_decay!r} "
                         f"/ {cfg.gate_patience!r}")


# ----------------------------------------------------------------------------- Stage B

def add_lora(model, cfg: TrainConfig):
    """PEFT LoRA "persona_expert" on the seven projections of layers 1…N−1 (never layer 0)."""
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        bias="none", task_type="CAUSAL_LM", target_modules=list(LORA_TARGETS),
                        layers_to_transform=list(range(1, n_layers)))
    return get_peft_model(model, config, adapter_name="persona_expert")


def distill_loss(model, batch: dict, temperature: float) -> torch.Tensor:
    """Mean over the batch's samples of the official per-sample loss, with one padded forward
    and the student's logits only at the teacher's top-k ids (never [T, V])."""
    root, decoder, _ = decoder_and_root(model)
    head, cap = root.lm_head, logit_cap(root)
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
    args = (torch.cat(rows), head.weight, head.bias, torch.cat(vals).to(dev),
            torch.cat(idx).to(dev), temperature)
    per_row = topk_distill_loss(*args, reduction="none") if cap is None \
        else capped_topk_kl(*args, cap)
    return (per_row * torch.cat(weight)).sum()


def capped_topk_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   values: torch.Tensor, indices: torch.Tensor, temperature: float,
                   cap: float) -> torch.Tensor:
    """kl [N] of `topk_distill_loss` with the student's logits soft-capped as the model's are
    (Gemma-2): by autograd over the gathered head rows [N, k, H] (no fused kernel)."""
    s = torch.bmm(weight[indices], hidden[:, :, None])[..., 0]                     # [N, k]
    if bias is not None:
        s = s + bias[indices]
    s = cap * torch.tanh(s.float() / cap)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(values.float() / temperature, dim=-1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)


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
          teacher: str = "context", progress: bool = True, overwrite: bool = False) -> Path:
    """Both stages from an official Stage 2 directory; writes the official output layout into a
    temporary sibling of `output_dir`, renamed into place when complete. An existing training
    output is replaced only with `overwrite=True`. Everything is checked before any work."""
    cfg = TrainConfig() if cfg is None else cfg
    check_config(cfg)
    if teacher not in ("context", "files"):
        raise ValueError(f"teacher: expected 'context' or 'files', got {teacher!r}")
    distill, retain = load_stage2(data_dir)
    check_model(model)
    out = train_output.check(output_dir, overwrite)
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tmp = train_output.start(out)
    try:
        samples, retain_samples, skipped = build_samples(model, tokenizer, data_dir, distill,
                                                         retain, cfg, teacher)
        gate_state, gate_acc = stage_a(model, samples + retain_samples, cfg, pad_id)
        torch.save(gate_state, tmp / "gate.pt")
        model = add_lora(model, cfg)
        history = train_lora(model, samples, cfg, pad_id, progress)
        model.save_pretrained(tmp)
        (tmp / "gated_lora_config.json").write_text(json.dumps({
            "architecture": "GatedSingleLoRA_TwoStage", "model": str(model.config.name_or_path),
            "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_epochs": cfg.epochs,
            "gate_epochs": cfg.gate_epochs, "learning_rate": cfg.lr, "gate_lr": cfg.gate_lr,
            "temperature": cfg.temperature, "n_distill": len(samples),
            "n_retain": len(retain_samples), "n_skipped": skipped,
            "final_gate_acc": gate_acc, "gate_target_acc": cfg.gate_target_acc,
            "training": "two-stage (A: router → B: LoRA)", "teacher": teacher,
            "loss_type": "KL distillation, top-k (prism_fast)", "final_kl": history[-1] if history
            else None, "prism_fast_config": asdict(cfg)}, indent=2))
    except BaseException:
        train_output.abandon(tmp)     # an interrupted run leaves the previous output as it was
        raise
    return train_output.finish(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a PRISM adapter (gate + LoRA) fast.")
    p.add_argument("--model", required=True, help="Hugging Face model directory or id")
    p.add_argument("--data", required=True, help="official Stage 2 dir (distill_set.json, ...)")
    p.add_argument("--out", required=True, help="output dir (persona_expert/, gate.pt, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing training output in --out (kept otherwise)")
    p.add_argument("--teacher", default="context", choices=["context", "files"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for f, v in asdict(TrainConfig()).items():
        p.add_argument(f"--{f}", type=type(v), default=v)
    a = p.parse_args(argv)
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    try:       # what can be checked before the model loads (minutes for a 7B one)
        check_config(cfg)
        load_stage2(a.data)
        train_output.check(a.out, a.overwrite)
    except (ValueError, OSError) as e:
        p.error(str(e))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    print(train(model, tok, a.data, a.out, cfg, teacher=a.teacher, overwrite=a.overwrite))


if __name__ == "__main__":
    main()
