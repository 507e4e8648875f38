"""Training a PRISM adapter: the official Stage B step (full [T, V] logits, one sample at a time)
against prism_fast's (top-k loss, padded micro-batches), and gate features (full forward with
output_hidden_states vs embeddings + layer 0 only).

    python -m bench.bench_train                      # SmolLM2-135M-Instruct (real weights), CPU
    python -m bench.bench_train --model llama3-8b    # random-init Llama-3-8B shape, bf16 (GPU)

Tables: the Stage B step (time per sample and peak memory: official batch 1, prism_fast at
micro-batch 1 and the trainer's step of 8); the LM head + loss alone at the head shapes of
SmolLM2-135M, Llama-3-8B and Qwen2.5-7B (its share of the official step bounds what removing the
head can gain); gate features. Medians of interleaved rounds (bench.timing); peak memory in a
separate call (bench.common.peak_memory), above what was allocated before it. On CPU the top-k
loss runs its torch path, on CUDA the Triton kernel.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import report
from bench.common import CPU_LABEL, peak_memory
from bench.models import load_model
from bench.timing import rounds, seconds
from prism_fast.ops import topk_distill_loss
from prism_fast.reference import official_stage_b_loss
from prism_fast.testing.shapes import MODELS
from prism_fast.training import (
    TEACHER_TOPK,
    TrainConfig,
    add_lora,
    collate,
    distill_loss,
    gate_features,
    step_backward,
)

MIB = 2 ** 20
HEAD_SHAPES = ("smollm2-135m", "llama3-8b", "qwen2.5-7b")


def _x(ratio: float) -> str:
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.0f}×"


def _medians(calls: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each call over interleaved rounds, after a warm-up round."""
    runs = rounds({name: seconds(fn, device) for name, fn in calls.items()}, reps)
    return {name: statistics.median(ts) for name, ts in runs.items()}


def _official_loss(logits: torch.Tensor, s: dict, temperature: float = 2.0) -> torch.Tensor:
    """run_gated_lora.py Stage B's loss of one sample from its logits [1, T, V]."""
    return official_stage_b_loss(logits[0, s["prompt_len"] - 1:-1], s["topk_values"],
                                 s["topk_indices"], temperature)


def _official_step(model, s: dict) -> None:
    _official_loss(model(input_ids=s["input_ids"][None]).logits, s).backward()   # [1, T, V]


def _samples(n: int, prompt: int, resp: int, vocab: int, device) -> list[dict]:
    return [{"input_ids": torch.randint(3, vocab, (prompt + resp,), device=device),
             "prompt_len": prompt,
             "topk_values": (torch.randn(resp, TEACHER_TOPK, device=device).half().float() * 3),
             "topk_indices": torch.randint(0, vocab, (resp, TEACHER_TOPK), device=device)}
            for _ in range(n)]


def stage_b_row(model, resp: int, a, device: torch.device) -> dict:
    samples = _samples(a.micro_batch, a.prompt, resp, model.config.vocab_size, device)
    one, cfg = collate(samples[:1], 0), TrainConfig()
    calls = {
        "official": (lambda: _official_step(model, samples[0]), 1),
        "prism_fast_mb1": (lambda: distill_loss(model, one, 2.0).backward(), 1),
        # The trainer's step: the micro-batch in forwards of ≤ cfg.max_batch_tokens tokens.
        f"prism_fast_mb{a.micro_batch}": (lambda: step_backward(model, samples, cfg, 0),
                                          a.micro_batch),
    }
    row = {"response": resp, "tokens": a.prompt + resp}
    medians = _medians({name: fn for name, (fn, _) in calls.items()}, a.reps, device)
    for name, (fn, n) in calls.items():
        row[f"{name}_s_per_sample"] = medians[name] / n
        model.zero_grad(set_to_none=True)
        row[f"{name}_peak_mib"] = peak_memory(fn, device) / MIB
        model.zero_grad(set_to_none=True)
    print(row, flush=True)
    return row


def loss_row(shape_name: str, head: torch.Tensor, resp: int, a, device: torch.device) -> dict:
    """The head [V, H] + loss alone, forward and backward from hidden states that require
    grad: one sample's official loss against prism_fast's over a micro-batch."""
    vocab, hidden = head.shape
    t, mb = a.prompt + resp, a.micro_batch
    samples = _samples(mb, a.prompt, resp, vocab, device)
    h1 = torch.randn(1, t, hidden, device=device, dtype=head.dtype, requires_grad=True)
    hb = torch.randn(mb * resp, hidden, device=device, dtype=head.dtype, requires_grad=True)
    values = torch.cat([s["topk_values"] for s in samples])                   # [mb · resp, k]
    indices = torch.cat([s["topk_indices"] for s in samples])

    def official():
        _official_loss(F.linear(h1, head), samples[0]).backward()

    def ours():
        topk_distill_loss(hb, head, None, values, indices, 2.0).backward()

    medians = _medians({"official": official, "ours": ours}, a.reps, device)
    row = {"shape": shape_name, "vocab": vocab, "hidden": hidden, "response": resp, "tokens": t,
           "official_s_per_sample": medians["official"],
           f"prism_fast_mb{mb}_s_per_sample": medians["ours"] / mb}
    h1.grad = hb.grad = None
    row["official_peak_mib"] = peak_memory(official, device) / MIB
    row[f"prism_fast_mb{mb}_peak_mib"] = peak_memory(ours, device) / MIB
    print(row, flush=True)
    return row


def loss_rows(a, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for shape_name in a.head_shapes:
        shape = MODELS[shape_name]
        head = torch.randn(shape.vocab, shape.hidden, device=device, dtype=dtype) * 0.02
        rows += [loss_row(shape_name, head, resp, a, device) for resp in a.resp]
    return rows


def gate_row(base, a, device: torch.device) -> dict:
    """Gate features of 8 prompts × 128 tokens: full forward with hidden states vs layer 0."""
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (8, 128), device=device)
    att = torch.ones_like(ids)
    last = torch.full((8,), 127, device=device)

    def full():
        with torch.no_grad():
            base(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[1]
    medians = _medians({"full": full, "layer0": lambda: gate_features(base, ids, att, last)},
                       a.reps + 1, device)
    return {"layers": base.config.num_hidden_layers, "full_s": medians["full"],
            "layer0_s": medians["layer0"]}


def markdown(meta: dict, stage_b: list[dict], loss: list[dict], gate: dict, mb: int) -> str:
    label, ours = meta["label"], f"prism_fast_mb{mb}"
    lines = [f"# Training a PRISM adapter: {meta['model']}, {meta['dtype']} ({label})", "",
             f"{meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}; "
             f"prompt {meta['prompt']} tokens, k = {TEACHER_TOPK}, LoRA r = 16 on the seven "
             f"projections of layers 1…N−1; top-k loss: {meta['loss_impl']}; medians of "
             f"{meta['reps']} interleaved rounds after a warm-up; peak memory measured above "
             "the loaded model.", "",
             "## Stage B step (forward + backward)", "",
             "| response | official s/sample (batch 1, full logits) | prism_fast s/sample, "
             f"micro-batch 1 | micro-batch {mb} (forwards of ≤ {TrainConfig.max_batch_tokens} "
             "tokens) | speed-up | official step peak MiB | "
             f"prism_fast mb 1 peak MiB | mb {mb} peak MiB (per sample) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in stage_b:
        lines.append(
            f"| {r['response']} | {r['official_s_per_sample']:.3f} | "
            f"{r['prism_fast_mb1_s_per_sample']:.3f} | {r[f'{ours}_s_per_sample']:.3f} | "
            f"{_x(r['official_s_per_sample'] / r[f'{ours}_s_per_sample'])} | "
            f"{r['official_peak_mib']:.0f} | {r['prism_fast_mb1_peak_mib']:.0f} | "
            f"{r[f'{ours}_peak_mib']:.0f} ({r[f'{ours}_peak_mib'] / mb:.0f}) |")
    lines += ["", "## The loss alone: LM head + loss, forward + backward, from hidden states", "",
              f"Official: one sample's [T, V] logits (T = prompt + response). prism_fast: the "
              f"top-k loss over a micro-batch of {mb} samples at once. Peak memory is what each "
              f"holds at once: one sample against {mb}.", "",
              "| head shape [V, H] | response | official s/sample | prism_fast s/sample | "
              f"speed-up | official peak MiB (1 sample) | prism_fast peak MiB ({mb} samples) | "
              "ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in loss:
        lines.append(
            f"| {r['shape']} [{r['vocab']}, {r['hidden']}] | {r['response']} | "
            f"{r['official_s_per_sample']:.4f} | {r[f'{ours}_s_per_sample']:.5f} | "
            f"{_x(r['official_s_per_sample'] / r[f'{ours}_s_per_sample'])} | "
            f"{r['official_peak_mib']:.1f} | {r[f'{ours}_peak_mib']:.2f} | "
            f"{_x(r['official_peak_mib'] / r[f'{ours}_peak_mib'])} |")
    bounds = [(r, b) for r in stage_b for b in loss
              if b["shape"] == meta.get("head_shape") and b["response"] == r["response"]]
    if bounds:
        lines += ["", "## What removing the head can gain (Amdahl)", "",
                  "| response | official head + loss s | share of the official step | speed-up "
                  "expected from the loss alone | measured, micro-batch 1 |",
                  "|---|---|---|---|---|"]
        for r, b in bounds:
            share = b["official_s_per_sample"] / r["official_s_per_sample"]
            bound = r["official_s_per_sample"] / (r["official_s_per_sample"]
                                                  - b["official_s_per_sample"]
                                                  + b[f"{ours}_s_per_sample"])
            lines.append(f"| {r['response']} | {b['official_s_per_sample']:.3f} | "
                         f"{share:.0%} | {_x(bound)} | "
                         f"{_x(r['official_s_per_sample'] / r['prism_fast_mb1_s_per_sample'])} |")
    lines += ["", f"## Gate features, 8 prompts × 128 tokens, {gate['layers']} layers", "",
              "| full forward s | layer 0 only s | speed-up |", "|---|---|---|",
              f"| {gate['full_s']:.3f} | {gate['layer0_s']:.4f} | "
              f"{gate['full_s'] / gate['layer0_s']:.1f}× |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=list(MODELS),
                   help="smollm2-135m: the real SmolLM2-135M-Instruct; else a random-init shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of a random model "
                   "(default: the model's own count)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resp", type=int, nargs="+", default=[128, 512])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--head-shapes", nargs="*", default=list(HEAD_SHAPES), choices=list(MODELS),
                   help="head shapes of the loss-alone table")
    p.add_argument("--out", default=None, help="output stem (.md and .json); default "
                   "bench/results/cpu/train on CPU, bench/results/train-<model> on CUDA")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.manual_seed(0)
    real = a.model == "smollm2-135m"
    # Real SmolLM2 weights in fp32; a random-init shape in bf16 on CUDA, fp32 on CPU.
    dtype = torch.bfloat16 if device.type == "cuda" and not real else torch.float32
    base, layers = load_model(a.model, a.layers, dtype, device)
    description = ("SmolLM2-135M-Instruct (real weights)" if real else
                   f"{a.model} shape, {layers} of {MODELS[a.model].layers} layers, random init")
    model = add_lora(copy.deepcopy(base), TrainConfig(lora_dropout=0.0)).train()
    import transformers

    meta = {"model": description, "dtype": str(dtype).replace("torch.", ""),
            "label": CPU_LABEL if device.type == "cpu" else "GPU",
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else "CPU"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "prompt": a.prompt, "reps": a.reps,
            "loss_impl": "Triton kernel" if device.type == "cuda" else "torch path (chunked)",
            "head_shape": a.model}
    stage_b = [stage_b_row(model, resp, a, device) for resp in a.resp]
    del model
    loss = loss_rows(a, device, dtype)
    gate = gate_row(base.eval(), a, device)
    text = markdown(meta, stage_b, loss, gate, a.micro_batch)
    print(text)
    stem = Path(a.out or ("bench/results/cpu/train" if device.type == "cpu"
                          else f"bench/results/train-{a.model}"))
    report.write(stem, {"meta": meta, "stage_b": stage_b, "loss": loss, "gate": gate}, text)


if __name__ == "__main__":
    main()
