"""The bootstrap's stages: Stage 1 (queries), Stage 2 (answers, self-judging, split), training.

Each stage writes the official layout under `out/data` (`per_persona/<name>/queries.json`,
`graded_answers.json`, `distill.json`, `retain.json`, `stats.json`; `distill_set.json`,
`retain_set.json`, `generation_stats.json`) and `out/adapter` (`persona_expert/`, `gate.pt`,
`gated_lora_config.json`), every file atomically; a stage whose last file exists is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prism_fast.bootstrap import official as O
from prism_fast.bootstrap.generate import GenConfig, decode, encode_chats, generate


@dataclass
class BootstrapConfig:
    """Official defaults (stage1_query_gen.py, stage2_verify_recycle.py) unless noted."""
    persona_name: str = "persona"
    queries: int = O.QUERIES_PER_PERSONA
    heldout: int = 8                 # ours: extra Stage 1 requests kept out of training
    query_tokens: int = O.QUERY_MAX_TOKENS
    query_temperature: float = O.QUERY_TEMPERATURE
    answer_tokens: int = O.ANSWER_MAX_TOKENS
    answer_temperature: float = O.ANSWER_TEMPERATURE
    judge_tokens: int = O.JUDGE_MAX_TOKENS
    seed: int = 0
    gen: GenConfig = field(default_factory=GenConfig)


def write_json(path: Path, data) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _generate_texts(model, tok, chats, tokens, temperature, cfg: BootstrapConfig, desc, progress):
    rows, st = generate(model, tok, encode_chats(tok, chats), tokens, temperature, cfg.gen, desc,
                        progress)
    return decode(tok, rows), st


def stage1(model, tok, persona: str, data: Path, cfg: BootstrapConfig, progress: bool) -> dict:
    """n + heldout curator requests (sampled); requests n+1… give the held-out queries."""
    folder = data / "per_persona" / cfg.persona_name
    done = folder / "queries.json"
    if done.is_file():
        return {"skipped": True, "kept": len(read_json(done))}
    torch.manual_seed(cfg.seed)
    chats = O.query_messages(persona, cfg.queries + cfg.heldout, O.supports_system(tok))
    texts, st = _generate_texts(model, tok, chats, cfg.query_tokens, cfg.query_temperature, cfg,
                                "Stage 1 queries", progress)
    kept, heldout = O.keep_queries(texts[:cfg.queries]), O.keep_queries(texts[cfg.queries:])
    write_json(folder / "stage1_responses.json", texts)
    write_json(folder / "heldout_queries.json", heldout)
    write_json(done, kept)                                   # last: marks the stage complete
    return {"requested": cfg.queries, "kept": len(kept), "heldout": len(heldout),
            "tokens": st["tokens"], "seconds_generating": st["seconds"]}


def answer(model, tok, queries: list[str], personas: list[str | None], cfg: BootstrapConfig,
           desc: str, progress: bool, temperature: float | None = None) -> list[list[str]]:
    """Answers to every query under each persona, all in one batch (a larger batch decodes
    faster); a persona is the system turn (folded in without a system role), None gives no
    system turn at all (the official baseline). Returns one list of answers per persona."""
    has_system = O.supports_system(tok)
    chats = [O.messages(p, q, has_system) for p in personas for q in queries]
    temp = cfg.answer_temperature if temperature is None else temperature
    texts, st = _generate_texts(model, tok, chats, cfg.answer_tokens, temp, cfg, desc, progress)
    n = len(queries)
    return [texts[i * n:(i + 1) * n] for i in range(len(personas))], st


def judge(model, tok, queries: list[str], first: list[str], second: list[str],
          cfg: BootstrapConfig, progress: bool) -> tuple[list[dict], dict]:
    """Both orders of every pair in one greedy batch; `second` plays the official expert."""
    has_system = O.supports_system(tok)
    chats = [c for q, a, b in zip(queries, first, second) for c in O.judge_messages(q, a, b,
                                                                                      has_system)]
    texts, st = _generate_texts(model, tok, chats, cfg.judge_tokens, 0.0, cfg, "judge (both orders)",
                                progress)
    verdicts = [O.pairwise(texts[2 * i], texts[2 * i + 1]) for i in range(len(queries))]
    return verdicts, {**st, "replies": [texts[2 * i:2 * i + 2] for i in range(len(queries))]}


def stage2(model, tok, persona: str, data: Path, cfg: BootstrapConfig, progress: bool) -> dict:
    """Baseline and expert answers, self-judging in both orders, the official split."""
    done = data / "generation_stats.json"
    if done.is_file():
        return {"skipped": True, **read_json(done)[cfg.persona_name]}
    folder = data / "per_persona" / cfg.persona_name
    queries = read_json(folder / "queries.json")
    torch.manual_seed(cfg.seed + 1)
    (baseline, expert), st_a = answer(model, tok, queries, [None, persona], cfg,
                                      "Stage 2 answers (baseline + expert)", progress)
    verdicts, st_j = judge(model, tok, queries, baseline, expert, cfg, progress)
    records = [{"query": q, "baseline": b, "expert": e, "pairwise": v}
               for q, b, e, v in zip(queries, baseline, expert, verdicts)]
    result = O.split(records, cfg.persona_name, persona)
    graded = [{"query": r["query"], "answers": {"baseline": r["baseline"],
                                                cfg.persona_name: r["expert"]},
               "persona_source": cfg.persona_name, "pairwise": r["pairwise"]} for r in records]
    write_json(folder / "graded_answers.json", graded)
    write_json(folder / "judge_replies.json", st_j["replies"])    # ours: the unparsed replies
    write_json(folder / "distill.json", result.distill)
    write_json(folder / "retain.json", result.retain)
    write_json(folder / "stats.json", result.stats)
    write_json(data / "distill_set.json", result.distill)
    write_json(data / "retain_set.json", result.retain)
    wins = {w: sum(v["winner"] == w for v in verdicts) for w in ("expert", "baseline", "tie")}
    # Official counting: "tie" is a TIE in both passes, any other non-decision is "mixed".
    mixed = sum(v["winner"] == "tie" and not v["pass1_raw"] == v["pass2_raw"] == "TIE"
                for v in verdicts)
    wins["tie"] -= mixed
    stats = {**result.stats, "wins": {**wins, "mixed": mixed}, "distill": len(result.distill),
             "retain": len(result.retain),
             "answer_tokens": st_a["tokens"], "answer_seconds": st_a["seconds"],
             "judge_tokens": st_j["tokens"], "judge_seconds": st_j["seconds"]}
    write_json(done, {cfg.persona_name: stats})              # last: marks the stage complete
    return stats


class NothingToTrain(ValueError):
    """Stage 2 kept no distill sample: Stages 1–2 are written, training cannot run."""


def stage3(model, tok, data: Path, out: Path, train_cfg, progress: bool) -> dict:
    """prism_fast.train into a temporary folder, renamed to `out/adapter` when complete."""
    from prism_fast.training import train

    final = out / "adapter"
    if (final / "gated_lora_config.json").is_file():
        return {"skipped": True, **_train_summary(final)}
    tmp = out / ".adapter.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)                                   # a crashed earlier attempt
    if not read_json(data / "distill_set.json"):
        raise NothingToTrain(f"data: {data}/distill_set.json is empty (the expert won no pair in both "
                         f"orders), nothing to train; raise --queries or --answer-tokens")
    t0 = time.perf_counter()
    train(model, tok, data, tmp, train_cfg, progress=progress)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {**_train_summary(final), "seconds": time.perf_counter() - t0}


def _train_summary(adapter: Path) -> dict:
    c = read_json(adapter / "gated_lora_config.json")
    return {"final_kl": c.get("final_kl"), "final_gate_acc": c.get("final_gate_acc"),
            "n_distill": c.get("n_distill"), "n_retain": c.get("n_retain")}
