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
from prism_fast.training.pipeline import train

# The trainer's public names: the pipeline below and the building blocks its tests and
# benchmarks reach (`prism_fast.train` re-exports them under its old name).
__all__ = ["TEACHER_TOPK", "TARGETS", "BinaryGate", "TrainConfig", "add_lora", "build_samples",
           "capped_topk_kl", "check_config", "check_model", "collate", "context_teacher",
           "distill_loss", "encode", "forward_groups", "gate_features", "head_logits",
           "load_stage2", "load_teacher_file", "logit_cap", "main", "make_optimizer",
           "stage_a", "step_backward", "train", "train_gate", "train_lora"]
