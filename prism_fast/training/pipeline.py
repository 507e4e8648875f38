"""The trainer's pipeline: both stages from an official Stage 2 directory to the official
output layout, written atomically (the package docstring lists the differences from the
official code)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from prism_fast.training import output
from prism_fast.training.config import TrainConfig, check_config
from prism_fast.training.data import build_samples, check_model, load_stage2
from prism_fast.training.gate import stage_a
from prism_fast.training.lora import add_lora, train_lora


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
