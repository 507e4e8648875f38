"""Adapter precision on a bf16 model: greedy tokens until the first divergence from PEFT.

PEFT keeps LoRA weights in fp32 on a bf16 model (`autocast_adapter_dtype=True`); prism_fast
stacks them in the layer's dtype unless `patch_model(..., adapter_dtype=torch.float32)`. On the
real SmolLM2-135M-Instruct (bf16, CPU, torch backend) with a rank-16 PEFT LoRA on the seven
projections of layers 1…29 (random non-zero B), this decodes chat-templated prompts greedily
with PEFT and with prism_fast (bf16 and fp32 adapters, every route open) and reports, per
prompt, the number of generated tokens that equal PEFT's before the first difference, and the
extra bytes that fp32 adapters cost.

    python -m bench.bench_adapter_dtype [--out DIR] [--new-tokens N]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.report import table, write

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves.",
    "What is the capital of Australia, and why was it chosen?",
    "Give me three tips for learning a new language.",
    "Summarise the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "List the planets of the solar system in order.",
    "What should I pack for a weekend hiking trip?",
]


def _first_divergence(a: torch.Tensor, b: torch.Tensor) -> int:
    """Generated tokens equal in a and b before their first difference (len if none)."""
    diff = (a != b).nonzero()
    return int(diff[0, 0]) if len(diff) else a.shape[0]


def run(new_tokens: int = 128, b_std: float = 0.02, seed: int = 0) -> dict:
    import prism_fast
    from bench.models import add_peft_adapter
    from prism_fast.testing.smollm2 import load_smollm2

    model, tok = load_smollm2(torch.bfloat16)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pm = add_peft_adapter(model, init_lora_weights=True, task_type=None)   # PEFT's own init
    torch.manual_seed(seed)
    lora_numel = 0
    for name, p in pm.named_parameters():
        if "lora_" in name:
            lora_numel += p.numel()
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=b_std)   # PEFT inits B to 0: the adapter would be a no-op
    peft_dtype = next(p.dtype for n, p in pm.named_parameters() if "lora_A" in n)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True)
    kw = dict(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    t = enc["input_ids"].shape[1]
    with torch.no_grad():
        ref = pm.generate(**kw)[:, t:]
        with pm.disable_adapter():
            base = pm.generate(**kw)[:, t:]
    rows = {"base model (no adapter)": [_first_divergence(b, r) for b, r in zip(base, ref)]}
    for label, dtype in (("prism_fast, bf16 adapters (default)", None),
                         ("prism_fast, fp32 adapters", torch.float32)):
        prism_fast.patch_model(pm, backend="torch", adapter_dtype=dtype)
        prism_fast.set_routes(pm, torch.zeros(len(PROMPTS), dtype=torch.int32))
        with torch.no_grad():
            out = pm.generate(**kw)[:, t:]
        prism_fast.unpatch_model(pm)
        rows[label] = [_first_divergence(o, r) for o, r in zip(out, ref)]
    return {
        "label": "CPU (SmolLM2-135M-Instruct, bf16, torch backend)",
        "peft_adapter_dtype": str(peft_dtype), "new_tokens": new_tokens, "prompts": len(PROMPTS),
        "lora_params": lora_numel, "extra_bytes_fp32_adapters": lora_numel * 2,
        "tokens_equal_to_peft": rows,
    }


def markdown(res: dict) -> str:
    body = [[label, f"{statistics.median(counts):g}", str(min(counts)),
             f"{sum(c == res['new_tokens'] for c in counts)} / {len(counts)}"]
            for label, counts in res["tokens_equal_to_peft"].items()]
    lines = [f"# Adapter precision vs PEFT — {res['label']}", "",
             f"Greedy decoding of {res['prompts']} chat prompts, {res['new_tokens']} new tokens "
             f"each, every route open; PEFT keeps its LoRA weights in {res['peft_adapter_dtype']}. "
             f"Generated tokens equal to PEFT's before the first difference:", "",
             table(["variant", "median", "min", "prompts identical to the end"], body)]
    lines += ["", f"fp32 adapters cost {res['extra_bytes_fp32_adapters'] / 2**20:.1f} MiB more "
              f"than bf16 ones ({res['lora_params']:,} LoRA parameters × 2 bytes)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench --adapter-dtype",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu"))
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    res = run(args.new_tokens)
    write(args.out / "adapter_dtype", res, markdown(res))
    print(f"wrote {args.out / 'adapter_dtype.md'} and .json")


if __name__ == "__main__":
    main()
