"""Does the trained adapter route? The gate's open rate on held-out Stage 1 queries and on
general prompts, and the routed model's self-judged win rate over the base model (the Stage 2
judge, both orders, the official rule: a win needs both orders)."""

from __future__ import annotations

import torch

from prism_fast.bootstrap import official as O
from prism_fast.bootstrap.generate import GenConfig, encode_chats
from prism_fast.bootstrap.stages import BootstrapConfig, answer, judge

# Our own general prompts (no persona in mind): the gate should mostly stay closed on them.
GENERAL_PROMPTS = [
    "What is the capital of Canada?",
    "Give me a synonym for 'happy'.",
    "How many minutes are there in three hours?",
    "Write a two-line poem about autumn leaves.",
    "What does a thermometer measure?",
    "Name three animals that live in the ocean.",
    "Translate 'thank you' into Spanish.",
    "Summarise in one sentence why people exercise.",
]


@torch.no_grad()
def open_rate(model, tok, prompts: list[str]) -> tuple[float, list[int]]:
    """Fraction of prompts (user turn only, as at inference) whose gate opens, and the routes."""
    import prism_fast

    if not prompts:
        return float("nan"), []
    ids = encode_chats(tok, [O.messages(None, p, O.supports_system(tok)) for p in prompts])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, ids))
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for r, row in enumerate(ids):
        x[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    dev = next(model.parameters()).device
    model(input_ids=x.to(dev), attention_mask=mask.to(dev), use_cache=False)
    routes = prism_fast.get_routes(model).tolist()
    return sum(r >= 0 for r in routes) / len(routes), routes


def route_check(model, tok, adapter_dir, heldout: list[str], cfg: BootstrapConfig,
                progress: bool = True) -> dict:
    """`model` is the base model (unpatched); it is patched for the routed answers and
    unpatched again before judging. Answers are greedy so that a closed gate gives the base
    answer exactly (a tie, not a coin flip)."""
    import prism_fast

    static = BootstrapConfig(**{**cfg.__dict__, "gen": GenConfig("sorted", cfg.gen.batch_size)})
    sets = {"heldout": heldout, "general": GENERAL_PROMPTS}
    prompts = heldout + GENERAL_PROMPTS
    (base,), _ = answer(model, tok, prompts, [None], static, "route check: base answers",
                        progress, temperature=0.0)
    prism_fast.patch_model(model, adapter_dir)
    try:
        rates = {k: open_rate(model, tok, v) for k, v in sets.items()}
        (routed,), _ = answer(model, tok, prompts, [None], static,
                              "route check: routed answers", progress, temperature=0.0)
    finally:
        prism_fast.unpatch_model(model)
    verdicts, _ = judge(model, tok, prompts, base, routed, static, progress)
    report, start = {}, 0
    for k, v in sets.items():
        vs = verdicts[start:start + len(v)]
        start += len(v)
        report[k] = {"n": len(v), "gate_open_rate": rates[k][0], "routes": rates[k][1],
                     "routed_wins": sum(x["winner"] == "expert" for x in vs),
                     "base_wins": sum(x["winner"] == "baseline" for x in vs),
                     "identical_answers": sum(b == r for b, r in
                                              zip(base[start - len(v):start],
                                                  routed[start - len(v):start]))}
        report[k]["routed_win_rate"] = report[k]["routed_wins"] / len(v) if v else float("nan")
    return report
