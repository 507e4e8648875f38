"""python -m prism_fast.bootstrap --model M --persona persona.txt --out DIR [options]

--model: a Hugging Face model directory, or a .gguf file (its folder must hold the tokenizer's
GGUF metadata, as the file itself does for llama.cpp exports).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from prism_fast.bootstrap import BootstrapConfig, GenConfig, NothingToTrain, bootstrap, check_args
from prism_fast.bootstrap.generate import BACKENDS


def load(model: str, dtype: str):
    """(model, tokenizer) from a model directory or a .gguf file; fp32 on CPU unless asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    where = path.parent if kw else path
    if not (path.is_file() if kw else path.is_dir()):
        raise FileNotFoundError(f"model: expected a model directory or a .gguf file, got {model} "
                                f"(not found)")
    gpu = torch.cuda.is_available()
    dt = getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if gpu else torch.float32)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    m = AutoModelForCausalLM.from_pretrained(where, dtype=dt, **kw).eval()
    return (m.cuda() if gpu else m), tok


def parser() -> argparse.ArgumentParser:
    from prism_fast.training import TrainConfig

    p = argparse.ArgumentParser(prog="python -m prism_fast.bootstrap",
                                description="PRISM Stages 1-2 and training from a persona file.")
    p.add_argument("--model", required=True, help="model directory or .gguf file")
    p.add_argument("--persona", required=True, help="text file with the persona description")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-route-check", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for f in fields(BootstrapConfig):
        if f.name != "gen":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                           default=f.default)
    p.add_argument("--backend", default=GenConfig.backend, choices=BACKENDS)
    for f in fields(GenConfig):
        if f.name not in ("backend", "extra"):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                           default=f.default)
    for k, v in asdict(TrainConfig()).items():
        p.add_argument(f"--train-{k.replace('_', '-')}", type=type(v), default=v, dest=f"train_{k}")
    return p


def main(argv: list[str] | None = None) -> None:
    from prism_fast.training import TrainConfig

    a = parser().parse_args(argv)
    persona_path = Path(a.persona)
    if not persona_path.is_file():
        raise FileNotFoundError(f"persona: expected a text file, got {a.persona} (not found)")
    persona = persona_path.read_text().strip()
    gen = GenConfig(**{f.name: getattr(a, f.name) for f in fields(GenConfig) if f.name != "extra"})
    cfg = BootstrapConfig(gen=gen, **{f.name: getattr(a, f.name) for f in fields(BootstrapConfig)
                                      if f.name != "gen"})
    if cfg.persona_name == "persona":                       # default: the file's name
        cfg.persona_name = persona_path.stem
    train_cfg = TrainConfig(**{k: getattr(a, f"train_{k}") for k in asdict(TrainConfig())})
    out = Path(a.out)
    check_args(persona, out, cfg)                           # before the model is loaded
    model, tok = load(a.model, a.dtype)
    try:
        bootstrap(model, tok, persona, out, cfg, train_cfg, progress=not a.quiet,
                  check_routes=not a.no_route_check, reload=lambda: load(a.model, a.dtype)[0])
    except NothingToTrain as e:     # a clear stop, not a traceback: Stages 1-2 are in --out
        s = json.loads((out / "summary.json").read_text())
        sys.exit(f"stopped after Stage 2: {e}\nStage 2: {json.dumps(s['stage2'].get('wins'))}; "
                 f"Stages 1-2 are in {out} (summary.json)")


if __name__ == "__main__":
    main()
