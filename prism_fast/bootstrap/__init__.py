"""From a persona to a routed adapter: PRISM's Stage 1 (queries) → Stage 2 (answers,
self-judging in both orders, distill / retain split) → prism_fast.train, then a routing check.

    python -m prism_fast.bootstrap --model M --persona persona.txt --out DIR

Python: `bootstrap(model, tokenizer, persona_text, out_dir, BootstrapConfig(...))`.

Same prompts, sampling settings and selection rules as the official code
(github.com/zizhao-hu/PRISM, prism/stage1_query_gen.py and prism/stage2_verify_recycle.py;
see official.py). Our changes, on purpose:
- generation runs on faster batching (generate.py); sampled texts differ from the official
  path's (other batch shapes draw other random numbers), greedy ones match it up to fp32
  rounding of differently padded batches (bench/bench_bootstrap.py counts the differences);
- both judging orders run as one batch;
- `heldout` extra Stage 1 requests give queries kept out of training, for the routing check;
- one persona per run, from a file; the official loop runs its twelve fixed personas;
- the inline Stage 2 of run_gated_lora.py passes a dict as the persona (a TypeError with
  templates that have no system role): here the persona text is always used, as in
  stage2_verify_recycle.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prism_fast.bootstrap.generate import BACKENDS, GenConfig
from prism_fast.bootstrap.stages import (
    BootstrapConfig,
    NothingToTrain,
    read_json,
    stage1,
    stage2,
    stage3,
    write_json,
)

__all__ = ["BootstrapConfig", "GenConfig", "NothingToTrain", "bootstrap", "check_args"]


def check_args(persona: str, out: Path, cfg: BootstrapConfig) -> None:
    """Every argument checked before any work; a folder from other settings is refused."""
    if not isinstance(persona, str) or not persona.strip():
        raise ValueError(f"persona: expected a non-empty persona text, got {persona!r}")
    for name in ("queries", "query_tokens", "answer_tokens", "judge_tokens"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected an integer ≥ 1, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.heldout, int) or cfg.heldout < 0:
        raise ValueError(f"heldout: expected an integer ≥ 0, got {cfg.heldout!r}")
    for name in ("query_temperature", "answer_temperature"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name}: expected a temperature ≥ 0, got {getattr(cfg, name)!r}")
    if cfg.gen.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.gen.backend!r}")
    if cfg.gen.batch_size < 1:
        raise ValueError(f"batch_size: expected an integer ≥ 1, got {cfg.gen.batch_size!r}")
    if not cfg.persona_name or "/" in cfg.persona_name or cfg.persona_name.startswith("."):
        raise ValueError(f"persona_name: expected a plain folder name, got {cfg.persona_name!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a directory, got the file {out}")
    saved = out / "bootstrap_config.json"
    if out.is_dir() and any(out.iterdir()) and not saved.is_file():
        raise ValueError(f"out: {out} is not empty and holds no bootstrap_config.json; expected a "
                         f"new folder or one from an earlier bootstrap run")
    if saved.is_file() and read_json(saved)["data"] != _settings(persona, cfg):
        raise ValueError(f"out: {out} was made with other settings or another persona "
                         f"(see {saved}); use a new --out to run with these")


def _settings(persona: str, cfg: BootstrapConfig) -> dict:
    """What decides the generated data (not the backend: it changes speed, not the method)."""
    d = {k: v for k, v in cfg.__dict__.items() if k != "gen"}
    return {**d, "persona": persona}


def bootstrap(model, tokenizer, persona: str, out_dir, cfg: BootstrapConfig | None = None,
              train_cfg=None, progress: bool = True, check_routes: bool = True,
              reload=None) -> dict:
    """Run (or resume) every stage; returns the summary (also written to out/summary.json).

    Training adds LoRA layers to `model` in place; the routing check needs the base model, so
    it calls `reload()` for a fresh one (default: a deep copy taken before training).
    """
    import copy

    from prism_fast.training import TrainConfig

    cfg, out = cfg or BootstrapConfig(), Path(out_dir)
    persona = persona.strip() if isinstance(persona, str) else persona  # official load_text strips
    check_args(persona, out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bootstrap_config.json", {"data": _settings(persona, cfg),
                                               "gen": cfg.gen.__dict__})
    data, times, summary = out / "data", {}, {}
    for name, run in (("stage1", lambda: stage1(model, tokenizer, persona, data, cfg, progress)),
                      ("stage2", lambda: stage2(model, tokenizer, persona, data, cfg, progress))):
        t0 = time.perf_counter()
        summary[name] = run()
        times[name] = time.perf_counter() - t0
    base = None
    if check_routes and reload is None and not (out / "route_check.json").is_file():
        base = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        summary["train"] = stage3(model, tokenizer, data, out, train_cfg or TrainConfig(), progress)
    except NothingToTrain as e:       # Stages 1-2 stand: their summary is written, then we stop
        write_json(out / "summary.json", {**summary, "seconds": times, "stopped": str(e)})
        raise
    times["train"] = time.perf_counter() - t0
    if check_routes:
        t0 = time.perf_counter()
        summary["route_check"] = _route_check(base, reload, tokenizer, out, data, cfg, progress)
        times["route_check"] = time.perf_counter() - t0
    summary["seconds"] = times
    write_json(out / "summary.json", summary)
    if progress:
        print(format_summary(summary))
    return summary


def _route_check(base, reload, tok, out: Path, data: Path, cfg, progress) -> dict:
    from prism_fast.bootstrap.route_check import route_check

    done = out / "route_check.json"
    if done.is_file():
        return {"skipped": True, **read_json(done)}
    model = reload() if base is None else base
    heldout = read_json(data / "per_persona" / cfg.persona_name / "heldout_queries.json")
    report = route_check(model, tok, out / "adapter", heldout, cfg, progress)
    write_json(done, report)
    return report


def format_summary(s: dict) -> str:
    """A few lines for the terminal."""
    s1, s2, tr = s["stage1"], s["stage2"], s["train"]
    w = s2.get("wins", {})
    lines = [
        f"Stage 1: {s1.get('kept')} queries kept of {s1.get('requested', '?')} requested, "
        f"{s1.get('heldout', '?')} held out",
        f"Stage 2: distill {s2.get('distill')} / retain {s2.get('retain')}; expert wins both "
        f"{w.get('expert')}, baseline both {w.get('baseline')}, mixed {w.get('mixed')}, "
        f"tie {w.get('tie')}",
        f"train: final KL {tr.get('final_kl')}, gate accuracy {tr.get('final_gate_acc')} %",
    ]
    for k, v in s.get("route_check", {}).items():
        if isinstance(v, dict):
            lines.append(f"route check ({k}, n={v['n']}): gate open {v['gate_open_rate']:.0%}, "
                         f"routed wins {v['routed_wins']}, base wins {v['base_wins']}")
    lines.append("seconds: " + json.dumps({k: round(v, 1) for k, v in s["seconds"].items()}))
    return "\n".join(lines)
