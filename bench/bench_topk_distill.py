"""Top-k distillation loss (kernels/topk_distill.py): the LM head + loss alone, forward and
backward from hidden states that require grad, PRISM's official Stage B loss (one sample's full
[T, V] fp32 logits) against prism_fast's top-k loss over a micro-batch at once, at the head
shapes of SmolLM2-135M, Llama-3-8B and Qwen2.5-7B: time per sample and peak memory.

    python -m bench --topk-distill [--head-shapes …] [--resp 128 512] [--prompt 32]
        [--micro-batch 8] [--reps 3] [--device cuda|cpu] [--out STEM]

Medians of interleaved rounds (bench.timing.medians); peak memory in a separate call
(bench.common.peak_memory), above what was allocated before it. On CPU the top-k loss runs its
torch path, on CUDA the Triton kernel. bench_train.py prints the same table beside the whole
Stage B step whose share of time it bounds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import report
from bench.common import CPU_LABEL, peak_memory
from bench.report import times
from bench.timing import medians
from prism_fast.ops import topk_distill_loss
from prism_fast.reference import official_stage_b_loss
from prism_fast.testing.shapes import MODELS
from prism_fast.training import TEACHER_TOPK

MIB = 2 ** 20
HEAD_SHAPES = ("smollm2-135m", "llama3-8b", "qwen2.5-7b")


def official_loss(logits: torch.Tensor, s: dict, temperature: float = 2.0) -> torch.Tensor:
    """run_gated_lora.py Stage B's loss of one sample from its logits [1, T, V]."""
    return official_stage_b_loss(logits[0, s["prompt_len"] - 1:-1], s["topk_values"],
                                 s["topk_indices"], temperature)


def samples(n: int, prompt: int, resp: int, vocab: int, device) -> list[dict]:
    """n Stage B samples: random ids, the teacher's top-k logits (fp16-rounded, as PRISM
    stores them) and indices over the response."""
    return [{"input_ids": torch.randint(3, vocab, (prompt + resp,), device=device),
             "prompt_len": prompt,
             "topk_values": (torch.randn(resp, TEACHER_TOPK, device=device).half().float() * 3),
             "topk_indices": torch.randint(0, vocab, (resp, TEACHER_TOPK), device=device)}
            for _ in range(n)]


def loss_row(shape_name: str, head: torch.Tensor, resp: int, a, device: torch.device) -> dict:
    """The head [V, H] + loss alone, forward and backward from hidden states that require
    grad: one sample's official loss against prism_fast's over a micro-batch."""
    vocab, hidden = head.shape
    t, mb = a.prompt + resp, a.micro_batch
    batch = samples(mb, a.prompt, resp, vocab, device)
    h1 = torch.randn(1, t, hidden, device=device, dtype=head.dtype, requires_grad=True)
    hb = torch.randn(mb * resp, hidden, device=device, dtype=head.dtype, requires_grad=True)
    values = torch.cat([s["topk_values"] for s in batch])                   # [mb · resp, k]
    indices = torch.cat([s["topk_indices"] for s in batch])

    def official():
        official_loss(F.linear(h1, head), batch[0]).backward()

    def ours():
        topk_distill_loss(hb, head, None, values, indices, 2.0).backward()

    med = medians({"official": official, "ours": ours}, a.reps, device)
    row = {"shape": shape_name, "vocab": vocab, "hidden": hidden, "response": resp, "tokens": t,
           "official_s_per_sample": med["official"],
           f"prism_fast_mb{mb}_s_per_sample": med["ours"] / mb}
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


def loss_table(loss: list[dict], mb: int) -> list[str]:
    """The loss-alone table's markdown lines."""
    ours = f"prism_fast_mb{mb}"
    lines = ["## The loss alone: LM head + loss, forward + backward, from hidden states", "",
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
            f"{times(r['official_s_per_sample'] / r[f'{ours}_s_per_sample'])} | "
            f"{r['official_peak_mib']:.1f} | {r[f'{ours}_peak_mib']:.2f} | "
            f"{times(r['official_peak_mib'] / r[f'{ours}_peak_mib'])} |")
    return lines


def add_options(p: argparse.ArgumentParser) -> None:
    """The options this table reads (bench_train's parser takes them too)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resp", type=int, nargs="+", default=[128, 512])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--head-shapes", nargs="*", default=list(HEAD_SHAPES), choices=list(MODELS),
                   help="head shapes of the loss-alone table")


def check_options(p: argparse.ArgumentParser, a: argparse.Namespace, stem: Path) -> None:
    """Sizes positive and the output folder writable, before anything is measured."""
    for flag, values in (("--resp", a.resp), ("--prompt", [a.prompt]),
                         ("--micro-batch", [a.micro_batch]), ("--reps", [a.reps])):
        if min(values) < 1:
            p.error(f"{flag}: expected positive integers, got {values}")
    report.check_writable(stem.parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --topk-distill",
                                description=__doc__.split("\n\n")[0])
    add_options(p)
    p.add_argument("--out", default=None, help="output stem (.md and .json); default "
                   "bench/results/cpu/topk-distill on CPU, bench/results/topk-distill on CUDA")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    stem = Path(a.out or ("bench/results/cpu/topk-distill" if device.type == "cpu"
                          else "bench/results/topk-distill"))
    check_options(p, a, stem)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = loss_rows(a, device, dtype)
    label = CPU_LABEL if device.type == "cpu" else torch.cuda.get_device_name(device)
    text = "\n".join([f"# Top-k distillation loss ({label}, {str(dtype)[6:]})", "",
                      *loss_table(rows, a.micro_batch)]) + "\n"
    print(text)
    report.write(stem, {"meta": report.run_meta("python -m bench --topk-distill", argv),
                        "rows": rows}, text)
    return 0
