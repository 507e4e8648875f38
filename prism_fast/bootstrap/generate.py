"""Batched generation for the bootstrap: the official path and the faster ones, one interface.

- "official": `model.generate` on left-padded batches of 8 in the given order, as PRISM's
  `utils.batch_generate` (each batch decodes until its slowest row ends).
- "sorted": the same `generate` call on larger batches of prompts sorted by length (less
  padding, fewer decode loops); results returned in the caller's order.
- "retire" (retire.py): our own decode loop on length-sorted batches: finished rows leave at
  once, each shared prompt prefix is prefilled once per batch (a batch may mix groups), the
  KV cache grows in place.
- "cb": Hugging Face's continuous batching (`model.generate_batch`): finished rows leave the
  batch at once, new ones join, and a shared prefix (the persona, the judge instruction) is
  cached once.
"retire" is the default: on this CPU a decode step's cost grows with its rows, so what pays is
not computing dead rows, full batches (baseline and expert answers share one; from 8 rows up a
row costs less) and shared prefixes computed once; it measured fastest of the four here
(bench/results/cpu/bootstrap.md; SmolLM2-135M fp32, CPU, not a GPU result). "sorted" stays
for patched PRISM models (the route check), whose gate needs each prompt prefilled whole.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

BACKENDS = ("official", "sorted", "retire", "cb")


@dataclass
class GenConfig:
    backend: str = "retire"
    batch_size: int = 32             # "sorted" / "retire"; "official" is always 8
    cb_max_batch_tokens: int = 512   # "cb": tokens per forward
    cb_num_blocks: int = 256         # "cb": KV-cache pages
    cb_block_size: int = 32          # "cb": tokens per page
    cb_attn: str = "sdpa"            # "cb": "sdpa" or "paged|eager"
    extra: dict = field(default_factory=dict)


def encode_chats(tokenizer, chats: list[list[dict]]) -> list[list[int]]:
    """Prompt ids per chat as the official code makes them (template + generation prompt)."""
    out = []
    for msgs in chats:
        r = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        ids = r["input_ids"] if hasattr(r, "keys") else r
        out.append(ids[0].tolist())
    return out


def _gen_config(model, max_new_tokens: int, temperature: float, eos: int):
    """The model's own generation config with the official call's overrides."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.max_new_tokens, cfg.do_sample = max_new_tokens, temperature > 0
    cfg.temperature = temperature if temperature > 0 else None
    cfg.pad_token_id = eos
    return cfg


def _trim(row: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-sequence id (pads after it dropped)."""
    for i, t in enumerate(row):
        if t in eos_ids:
            return row[:i + 1]
    return row


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | {tokenizer.eos_token_id}


@torch.no_grad()
def _static(model, tokenizer, prompts, cfg, order, batch_size, bar):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    dev = next(model.parameters()).device
    out: list[list[int] | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):                       # left padding, as the official code
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             generation_config=cfg)
        for r, i in enumerate(idx):
            out[i] = _trim(gen[r, width:].tolist(), eos_ids)
        bar(sum(len(out[i]) for i in idx), len(idx))
    return out


@torch.no_grad()
def _continuous(model, prompts, cfg, g: GenConfig, eos_ids, bar):
    from transformers import ContinuousBatchingConfig

    from prism_fast.batching import check_engine

    check_engine()

    cb = ContinuousBatchingConfig(max_batch_tokens=g.cb_max_batch_tokens,
                                  num_blocks=g.cb_num_blocks, page_size=g.cb_block_size,
                                  **g.extra)
    previous = model.config._attn_implementation
    model.set_attn_implementation(g.cb_attn)
    try:
        res = model.generate_batch(prompts, generation_config=cfg, continuous_batching_config=cb,
                                   progress_bar=False, warmup=False)
    finally:
        model.set_attn_implementation(previous)
    # Request ids are "req_<i>" in submission order.
    outs = sorted(res.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))
    rows = [_trim(list(o.generated_tokens), eos_ids) for o in outs]
    bar(sum(map(len, rows)), len(rows))
    return rows


def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             g: GenConfig | None = None, desc: str = "generate", progress: bool = True
             ) -> tuple[list[list[int]], dict]:
    """Generated ids per prompt (through the first EOS) and {tokens, seconds, cpu_seconds}."""
    from tqdm import tqdm

    g = g or GenConfig()
    if g.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {g.backend!r}")
    eos = tokenizer.eos_token_id
    cfg = _gen_config(model, max_new_tokens, temperature, eos)
    t0, c0, done = time.perf_counter(), time.process_time(), [0]
    pbar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress)

    def bar(tokens: int, rows: int) -> None:
        done[0] += tokens
        pbar.update(rows)
        pbar.set_postfix(tok_s=f"{done[0] / max(time.perf_counter() - t0, 1e-9):.1f}")

    try:
        if not prompts:
            rows = []
        elif g.backend == "cb":
            rows = _continuous(model, prompts, cfg, g, _eos_ids(model, tokenizer), bar)
        elif g.backend == "retire":
            from prism_fast.bootstrap.retire import generate_retiring

            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            rows = generate_retiring(model, prompts, cfg, _eos_ids(model, tokenizer), pad,
                                     g.batch_size, bar)
        elif g.backend == "official":
            rows = _static(model, tokenizer, prompts, cfg, list(range(len(prompts))), 8, bar)
        else:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            rows = _static(model, tokenizer, prompts, cfg, order, g.batch_size, bar)
    finally:
        pbar.close()
    # CPU seconds too: on a shared machine they vary far less than wall time.
    return rows, {"tokens": done[0], "seconds": time.perf_counter() - t0,
                  "cpu_seconds": time.process_time() - c0}


def decode(tokenizer, rows: list[list[int]]) -> list[str]:
    """Texts as the official code decodes them: special tokens skipped, whitespace stripped."""
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
