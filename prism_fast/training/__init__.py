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

import json
from dataclasses import asdict
from pathlib import Path

import torch

from prism_fast.training import output
from prism_fast.training.cli import main
from prism_fast.training.config import TrainConfig, check_config
from prism_fast.training.data import (
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
from prism_fast.training.gate import BinaryGate, gate_features, stage_a, train_gate
from prism_fast.training.lora import (
    TARGETS,
    add_lora,
    capped_topk_kl,
    distill_loss,
    forward_groups,
    make_optimizer,
    step_backward,
    train_lora,
)

# The trainer's public names: the pipeline below and the building blocks its tests and
# benchmarks reach (`prism_fast.train` re-exports them under its old name).
__all__ = ["TEACHER_TOPK", "TARGETS", "BinaryGate", "TrainConfig", "add_lora", "build_samples",
           "capped_topk_kl", "check_config", "check_model", "collate", "context_teacher",
           "distill_loss", "encode", "forward_groups", "gate_features", "head_logits",
           "load_stage2", "load_teacher_file", "logit_cap", "main", "make_optimizer",
           "stage_a", "step_backward", "train", "train_gate", "train_lora"]


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
    out = output.check(output_dir, overwrite)
    torch.manual_seed(cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tmp = output.start(out)
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
        output.abandon(tmp)     # an interrupted run leaves the previous output as it was
        raise
    return output.finish(tmp, out)
