"""Stage A of the trainer: the gate's features from the embeddings and decoder layer 0 only,
and the official BinaryGate trained on them (`prism/run_gated_lora.py` `_train_gate_only`)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from prism_fast.hf import decoder_and_root
from prism_fast.training.data import collate


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


def train_gate(features: torch.Tensor, targets: torch.Tensor, cfg,
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



def stage_a(model, samples: list[dict], cfg, pad_id: int) -> tuple[dict, float]:
    """Gate features at each sample's last prompt token (micro-batches of 32), then the gate."""
    dev = next(model.parameters()).device
    feats = []
    for s in range(0, len(samples), 32):
        chunk = samples[s:s + 32]
        batch = collate(chunk, pad_id)
        last = torch.tensor([c["prompt_len"] - 1 for c in chunk], device=dev)
        feats.append(gate_features(model, batch["input_ids"].to(dev),
                                   batch["attention_mask"].to(dev), last).float())
    targets = torch.tensor([c["gate_target"] for c in samples], device=dev)
    return train_gate(torch.cat(feats), targets, cfg)


