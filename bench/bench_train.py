"""Training a PRISM adapter: the official Stage B step (full [T, V] logits, one sample at a time)
against prism_fast's (top-k loss, padded micro-batches), and gate features (full forward with
output_hidden_states vs embeddings + layer 0 only).

    python -m bench.bench_train                      # SmolLM2-135M-Instruct (real weights), CPU
    python -m bench.bench_train --model llama3-8b    # random-init Llama-3-8B shape, bf16 (GPU)

Tables: the Stage B step (time per sample and peak memory: official batch 1, prism_fast at
micro-batch 1 and the trainer's step of 8); the LM head + loss alone at the head shapes of
SmolLM2-135M, Llama-3-8B and Qwen2.5-7B (bench_topk_distill.py's; its share of the official step
bounds what removing the head can gain); gate features. Medians of interleaved rounds
(bench.timing); peak memory in a separate call (bench.common.peak_memory), above what was
allocated before it. On CPU the top-k loss runs its torch path, on CUDA the Triton kernel.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from bench import report
from bench.bench_topk_distill import (
    MIB,
    add_options,
    check_options,
    loss_rows,
    loss_table,
    official_loss,
    samples,
)
from bench.common import CPU_LABEL, peak_memory
from bench.models import load_model
from bench.report import times
from bench.timing import medians
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


def _official_step(model, s: dict) -> None:
    official_loss(model(input_ids=s["input_ids"][None]).logits, s).backward()   # [1, T, V]


def stage_b_row(model, resp: int, a, device: torch.device) -> dict:
    batch = samples(a.micro_batch, a.prompt, resp, model.config.vocab_size, device)
    one, cfg = collate(batch[:1], 0), TrainConfig()
    calls = {
        "official": (lambda: _official_step(model, batch[0]), 1),
        "prism_fast_mb1": (lambda: distill_loss(model, one, 2.0).backward(), 1),
        # The trainer's step: the micro-batch in forwards of ≤ cfg.max_batch_tokens tokens.
        f"prism_fast_mb{a.micro_batch}": (lambda: step_backward(model, batch, cfg, 0),
                                          a.micro_batch),
    }
    row = {"response": resp, "tokens": a.prompt + resp}
    med = medians({name: fn for name, (fn, _) in calls.items()}, a.reps, device)
    for name, (fn, n) in calls.items():
        row[f"{name}_s_per_sample"] = med[name] / n
        model.zero_grad(set_to_none=True)
        row[f"{name}_peak_mib"] = peak_memory(fn, device) / MIB
        model.zero_grad(set_to_none=True)
    print(row, flush=True)
    return row


def gate_row(base, a, device: torch.device) -> dict:
    """Gate features of 8 prompts × 128 tokens: full forward with hidden states vs layer 0."""
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (8, 128), device=device)
    att = torch.ones_like(ids)
    last = torch.full((8,), 127, device=device)

    def full():
        with torch.no_grad():
            base(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[1]
    med = medians({"full": full, "layer0": lambda: gate_features(base, ids, att, last)},
                       a.reps + 1, device)
    return {"layers": base.config.num_hidden_layers, "full_s": med["full"],
            "layer0_s": med["layer0"]}


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
            f"{times(r['official_s_per_sample'] / r[f'{ours}_s_per_sample'])} | "
            f"{r['official_peak_mib']:.0f} | {r['prism_fast_mb1_peak_mib']:.0f} | "
            f"{r[f'{ours}_peak_mib']:.0f} ({r[f'{ours}_peak_mib'] / mb:.0f}) |")
    lines += ["", *loss_table(loss, mb)]
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
                         f"{share:.0%} | {times(bound)} | "
                         f"{times(r['official_s_per_sample'] / r['prism_fast_mb1_s_per_sample'])} |")
    lines += ["", f"## Gate features, 8 prompts × 128 tokens, {gate['layers']} layers", "",
              "| full forward s | layer 0 only s | speed-up |", "|---|---|---|",
              f"| {gate['full_s']:.3f} | {gate['layer0_s']:.4f} | "
              f"{gate['full_s'] / gate['layer0_s']:.1f}× |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench --train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=list(MODELS),
                   help="smollm2-135m: the real SmolLM2-135M-Instruct; else a random-init shape")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of a random model "
                   "(default: the model's own count)")
    add_options(p)   # device, responses, prompt, micro-batch, rounds, head shapes
    p.add_argument("--out", default=None, help="output stem (.md and .json); default "
                   "bench/results/cpu/train on CPU, bench/results/train-<model> on CUDA")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    stem = Path(a.out or ("bench/results/cpu/train" if device.type == "cpu"
                          else f"bench/results/train-{a.model}"))
    check_options(p, a, stem)
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
    report.write(stem, {"meta": meta, "stage_b": stage_b, "loss": loss, "gate": gate}, text)


if __name__ == "__main__":
    main()
