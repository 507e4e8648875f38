"""The trainer's settings: official defaults of `train_gated_lora`, checked before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
