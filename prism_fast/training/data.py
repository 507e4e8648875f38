"""The trainer's data: an official Stage 2 directory read and checked, chat encoding as the
official `_format_to_ids` / `build_chat_messages`, the model's own logits (checked), the
context teacher, and the samples that can train (the others skipped with a count)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from prism_fast.hf import decoder_and_root

FIELDS = ("instruction", "output")
TEACHER_TOPK = 64


# ----------------------------------------------------------------------------- reading

def _read_samples(path: Path) -> list[dict]:
    """A JSON list of {"instruction": str, "output": str, "system": str (optional)}."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    for i, s in enumerate(data):
        if not isinstance(s, dict):
            raise ValueError(f"{path}: sample {i}: expected an object, got {type(s).__name__}")
        for key in FIELDS:
            if not isinstance(s.get(key), str):
                raise ValueError(f"{path}: sample {i}: expected {key!r} as a string, got "
                                 f"{'no such key' if key not in s else type(s[key]).__name__}"
                                 f" (keys: {sorted(s)})")
        if s.get("system") is not None and not isinstance(s["system"], str):
            raise ValueError(f"{path}: sample {i}: expected 'system' as a string, got "
                             f"{type(s['system']).__name__}")
    return data


def load_stage2(data_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """distill_set.json (gate 1, at least one sample) and retain_set.json (gate 0, optional) of
    an official Stage 2."""
    data_dir = Path(data_dir)
    distill_path = data_dir / "distill_set.json"
    if not distill_path.is_file():
        raise FileNotFoundError(f"data_dir: expected {distill_path} (official Stage 2 output), "
                                f"not found")
    distill = _read_samples(distill_path)
    if not distill:
        raise ValueError(f"{distill_path}: no distill data (an empty list); nothing to train")
    retain_path = data_dir / "retain_set.json"
    retain = _read_samples(retain_path) if retain_path.is_file() else []
    return distill, retain


def load_teacher_file(path: str | os.PathLike, n_vocab: int | None = None) -> dict:
    """One official teacher file: topk_values [L, k] fp16, topk_indices [L, k] (in 0…V−1),
    prompt_len."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher file: expected {path}, not found")
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("topk_values", "topk_indices", "prompt_len"):
        if key not in data:
            raise ValueError(f"teacher file {path}: expected key {key!r}, got {sorted(data)}")
    idx = data["topk_indices"]
    if n_vocab is not None and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_vocab):
        raise ValueError(f"teacher file {path}: expected topk_indices in 0…{n_vocab - 1} (the "
                         f"model's vocabulary), got {int(idx.min())}…{int(idx.max())}")
    return data


# ----------------------------------------------------------------------------- encoding

def supports_system(tokenizer) -> bool:
    """Whether the chat template takes a system turn (Gemma's raises on one)."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "t"},
                                       {"role": "user", "content": "t"}], tokenize=False)
        return True
    except Exception:   # jinja2's TemplateError, whatever the template raises
        return False


def chat_messages(system: str | None, instruction: str, with_system: bool) -> list[dict]:
    """The official `build_chat_messages`: without a system role, a non-empty persona is folded
    into the user turn (persona, blank line, user message); "" is an explicit empty system."""
    if system is None:
        return [{"role": "user", "content": instruction}]
    if with_system:
        return [{"role": "system", "content": system}, {"role": "user", "content": instruction}]
    return [{"role": "user", "content": f"{system}\n\n{instruction}" if system else instruction}]


def encode(tokenizer, system: str | None, instruction: str, output: str | None,
           max_len: int | None, with_system: bool | None = None) -> tuple[torch.Tensor, int]:
    """(input_ids [T], prompt_len) as the official `_format_to_ids`: the chat template over
    system (an explicit "" when cleared) + user (+ assistant), truncated to max_len if given.
    prompt_len may exceed T when truncation cut into the prompt."""
    if with_system is None:
        with_system = supports_system(tokenizer)
    msgs = chat_messages(system, instruction, with_system)

    def text(with_output: bool) -> str:
        full = msgs + [{"role": "assistant", "content": output}] if with_output else msgs
        return tokenizer.apply_chat_template(full, tokenize=False,
                                             add_generation_prompt=not with_output)
    ids = tokenizer(text(True), truncation=max_len is not None, max_length=max_len,
                    return_tensors="pt").input_ids[0]
    prompt_len = len(tokenizer(text(False), return_tensors="pt").input_ids[0])
    return ids, prompt_len


class Skips:
    """Samples left out, by reason; one warning per reason with its count."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def warn(self, what: str) -> None:
        for reason, n in self.counts.items():
            warnings.warn(f"prism_fast.train: {n} {what} sample(s) skipped: {reason}",
                          stacklevel=3)


def usable(ids: torch.Tensor, prompt_len: int, max_len: int, positions: int | None,
           need_response: bool, skips: Skips) -> bool:
    """False (and counted) for a sample that cannot train: its prompt is cut by max_len (the
    official trainer skips a sample with no response token), or it is longer than the model's
    positions."""
    if prompt_len > len(ids) or (need_response and prompt_len >= len(ids)):
        skips.add(f"the prompt fills max_len = {max_len} tokens (no response token left)")
        return False
    if positions is not None and len(ids) > positions:
        skips.add(f"longer than the model's {positions} positions (max_position_embeddings)")
        return False
    return True


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask [B, T] plus each sample's teacher and prompt_len."""
    t = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)
    att = torch.zeros(len(samples), t, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, :len(s["input_ids"])] = s["input_ids"]
        att[b, :len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": att, "samples": samples}


# ----------------------------------------------------------------------------- the model's logits

def logit_cap(root) -> float | None:
    """Gemma-2's final_logit_softcapping (its logits are cap · tanh(z / cap)); None otherwise."""
    cap = getattr(root.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def head_logits(root, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final hidden states: lm_head, soft-capped where it is."""
    logits = root.lm_head(hidden)
    cap = logit_cap(root)
    return logits if cap is None else cap * torch.tanh(logits / cap)


@torch.no_grad()
def check_model(model) -> None:
    """The student's logits are computed as `head_logits(decoder(x))`, only at the teacher's
    ids: refuse a model whose own logits are something else (a scale, another head)."""
    root, decoder, _ = decoder_and_root(model)
    head = getattr(root, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model: expected an nn.Linear lm_head, got {type(head).__name__}")
    ids = torch.arange(min(8, head.weight.shape[0]), device=head.weight.device)[None]   # [1, 8]
    training = root.training
    root.eval()                      # dropout would make the two forwards differ
    try:
        own = root(input_ids=ids).logits.float()
        ours = head_logits(root, decoder(input_ids=ids).last_hidden_state).float()
    finally:
        root.train(training)
    if not torch.allclose(ours, own, rtol=1e-2, atol=1e-2 * float(own.abs().max())):
        raise ValueError(f"model: {type(root).__name__}'s logits are not lm_head(hidden states) "
                         f"(soft-capped where the config says so); prism_fast.train cannot "
                         f"compute them at the teacher's ids")



@torch.no_grad()
def context_teacher(model, ids: torch.Tensor, prompt_len: int, k: int = TEACHER_TOPK) -> dict:
    """Teacher top-k at the response positions of `ids` (the prompt *with* the persona), from the
    model's own logits (soft-capped where the model caps them); k at most the vocabulary."""
    root, _, _ = decoder_and_root(model)
    logits = root(input_ids=ids[None]).logits[0, prompt_len - 1:-1]                 # [L, V]
    vals, idx = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
    return {"topk_values": vals.half(), "topk_indices": idx.int(), "prompt_len": prompt_len}


def build_samples(model, tokenizer, data_dir, distill: list[dict], retain: list[dict],
                  cfg, teacher: str) -> tuple[list[dict], list[dict], dict]:
    """Encoded distill samples with their teacher's top-k, encoded retain samples, and the count
    of samples skipped by reason (each reason warned once)."""
    root, _, _ = decoder_and_root(model)
    positions = getattr(root.config, "max_position_embeddings", None)
    n_vocab = root.lm_head.weight.shape[0]
    dev = root.lm_head.weight.device
    with_system = supports_system(tokenizer)
    skipped, skipped_retain = Skips(), Skips()
    no_persona = 0
    samples = []
    for i, s in enumerate(distill):
        ids, pl = encode(tokenizer, "", s["instruction"], s["output"], cfg.max_len, with_system)
        if not usable(ids, pl, cfg.max_len, positions, True, skipped):
            continue
        if teacher == "files":
            t = load_teacher_file(Path(data_dir) / "teacher_logits_topk" / f"sample_{i}.pt",
                                  n_vocab)
        else:
            no_persona += not s.get("system")
            t_ids, t_pl = encode(tokenizer, s.get("system") or "", s["instruction"], s["output"],
                                 None, with_system)
            # The persona lengthens the prompt: keep exactly the student's response tokens.
            t_ids = t_ids[:t_pl + len(ids) - pl]
            if not usable(t_ids, t_pl, cfg.max_len, positions, True, skipped):
                continue
            t = context_teacher(model, t_ids.to(dev), t_pl)
        samples.append({"input_ids": ids, "prompt_len": pl, "gate_target": 1,
                        "topk_values": t["topk_values"].float(),
                        "topk_indices": t["topk_indices"].long()})
    retain_samples = []
    for s in retain:
        ids, pl = encode(tokenizer, "", s["instruction"], s["output"], cfg.max_len, with_system)
        if usable(ids, pl, cfg.max_len, positions, False, skipped_retain):
            retain_samples.append({"input_ids": ids, "prompt_len": pl, "gate_target": 0})
    if no_persona:
        warnings.warn(f"prism_fast.train: {no_persona} distill sample(s) have no 'system' "
                      f"persona: their context teacher is the student itself, so they teach "
                      f"the LoRA nothing (KL 0)", stacklevel=2)
    skipped.warn("distill")
    skipped_retain.warn("retain")
    if not samples:
        raise ValueError(f"data_dir: no distill sample left to train on: all {len(distill)} "
                         f"skipped ({'; '.join(skipped.counts)})")
    counts = {"distill": sum(skipped.counts.values()),
              "retain": sum(skipped_retain.counts.values())}
    return samples, retain_samples, counts
