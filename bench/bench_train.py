"""Training a PRISM adapter: the official Stage B step (full [T, V] logits, one sample at a time)
against prism_fast's (top-k loss, padded micro-batches), and gate features (full forward with
output_hidden_states vs embeddings + layer 0 only), on SmolLM2-135M-Instruct.

    python -m bench.bench_train [--resp 128 512] [--micro-batch 8] [--out bench/results/cpu/train.md]

Timings are medians of perf_counter around each call in the same process. On CPU the top-k
loss runs its torch path (the Triton kernel would run under the interpreter, which is no speed
measurement); on CUDA it runs the Triton kernel. Logits memory is computed from the shapes of
the tensors each loss keeps for backward (official: fp32 [T, V] logits, its gathered copy and
log-softmax; prism_fast: [N, k] fp32 coefficients): it is not a measured peak.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import CPU_LABEL
from bench.models import load_smollm2
from prism_fast.train import TEACHER_TOPK, TrainConfig, add_lora, collate, distill_loss, gate_features


def _median(fn, reps: int) -> float:
    fn()                                                   # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _official_step(model, s, temperature=2.0):
    """run_gated_lora.py Stage B for one sample: full logits, gather, kl_div batchmean · T²."""
    logits = model(input_ids=s["input_ids"][None]).logits
    s_resp = logits[0, s["prompt_len"] - 1:-1, :]
    n = min(s_resp.shape[0], s["topk_values"].shape[0])
    t_log = F.log_softmax(s["topk_values"][:n] / temperature, dim=-1)
    s_log = F.log_softmax(s_resp[:n].gather(1, s["topk_indices"][:n]).float() / temperature, -1)
    (F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * temperature ** 2).backward()


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--resp", type=int, nargs="+", default=[128, 512])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="bench/results/cpu/train.md")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    base, _ = load_smollm2(torch.float32)
    vocab, dev = base.config.vocab_size, "cpu"
    label = CPU_LABEL if not torch.cuda.is_available() else "GPU"
    model = add_lora(copy.deepcopy(base), TrainConfig(lora_dropout=0.0)).train()
    lines = [f"# Training a PRISM adapter, SmolLM2-135M-Instruct fp32 ({label})", "",
             f"Stage B, prompt {a.prompt} tokens, k = {TEACHER_TOPK}; loss implementation of "
             f"prism_fast: {'torch top-k path' if dev == 'cpu' else 'Triton kernel'}; medians "
             f"of {a.reps} after a warm-up.", "",
             "| response | official s/sample (batch 1, full logits) | prism_fast s/sample "
             f"(micro-batch {a.micro_batch}, top-k) | speed-up | official logits MB/sample | "
             "prism_fast logits MB/sample | ratio |", "|---|---|---|---|---|---|---|"]
    for resp in a.resp:
        samples = []
        for _ in range(a.micro_batch):
            samples.append({"input_ids": torch.randint(3, vocab, (a.prompt + resp,)),
                            "prompt_len": a.prompt,
                            "topk_values": torch.randn(resp, TEACHER_TOPK).half().float() * 3,
                            "topk_indices": torch.randint(0, vocab, (resp, TEACHER_TOPK))})
        official = _median(lambda s=samples[0]: _official_step(model, s), a.reps)
        batch = collate(samples, 0)
        ours = _median(lambda b=batch: distill_loss(model, b, 2.0).backward(), a.reps) / a.micro_batch
        t = a.prompt + resp
        # Official: logits [T, V] and their gradient, fp32 (the model's dtype here).
        off_mb = 2 * t * vocab * 4 / 2 ** 20
        ours_mb = 2 * resp * TEACHER_TOPK * 4 / 2 ** 20     # z is never stored; coef + gather
        lines.append(f"| {resp} | {official:.3f} | {ours:.3f} | {official / ours:.2f}× | "
                     f"{off_mb:.1f} | {ours_mb:.2f} | {off_mb / ours_mb:.0f}× |")
        print(lines[-1], flush=True)
    # Gate features: 8 prompts of 128 tokens.
    ids = torch.randint(3, vocab, (8, 128))
    att = torch.ones_like(ids)
    last = torch.full((8,), 127)
    base.eval()

    def full():
        with torch.no_grad():
            base(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[1]
    t_full = _median(full, a.reps + 1)
    t_l0 = _median(lambda: gate_features(base, ids, att, last), a.reps + 1)
    lines += ["", f"Gate features, 8 prompts × 128 tokens, {base.config.num_hidden_layers} "
              f"layers ({label})", "", "| full forward s | layer 0 only s | speed-up |",
              "|---|---|---|", f"| {t_full:.3f} | {t_l0:.4f} | {t_full / t_l0:.1f}× |"]
    print("\n".join(lines[-5:]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
