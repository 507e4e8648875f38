"""`python -m prism_fast.train` (or `python -m prism_fast.training`): arguments, the data and
the output folder checked before the model loads (minutes for a 7B one), then both stages."""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

from prism_fast.training.config import TrainConfig, check_config
from prism_fast.training.data import load_stage2
from prism_fast.training.output import check as check_output


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a PRISM adapter (gate + LoRA) fast.")
    p.add_argument("--model", required=True, help="Hugging Face model directory or id")
    p.add_argument("--data", required=True, help="official Stage 2 dir (distill_set.json, ...)")
    p.add_argument("--out", required=True, help="output dir (persona_expert/, gate.pt, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing training output in --out (kept otherwise)")
    p.add_argument("--teacher", default="context", choices=["context", "files"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    for f, v in asdict(TrainConfig()).items():
        p.add_argument(f"--{f}", type=type(v), default=v)
    a = p.parse_args(argv)
    cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(TrainConfig())})
    try:       # what can be checked before the model loads (minutes for a 7B one)
        check_config(cfg)
        load_stage2(a.data)
        check_output(a.out, a.overwrite)
    except (ValueError, OSError) as e:
        p.error(str(e))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prism_fast.training.pipeline import train

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    if torch.cuda.is_available():
        model = model.cuda()
    print(train(model, tok, a.data, a.out, cfg, teacher=a.teacher, overwrite=a.overwrite))

