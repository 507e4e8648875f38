"""PRISM's Stage 1–2 prompts, settings and selection rules, as pure functions.

The prompt strings below are data that must match the official code word for word (they are
what the model reads); they come from github.com/zizhao-hu/PRISM, `prism/stage1_query_gen.py`
(the curator instruction and the per-query request) and `prism/stage2_verify_recycle.py` (the
pairwise judge instruction and the comparison prompt). Everything else is our own code,
written from reading those files and `prism/utils.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --- settings of the official code (stage1_query_gen.py, stage2_verify_recycle.py) ---------------
QUERIES_PER_PERSONA = 50          # NUM_SAMPLES_PER_PERSONA
QUERY_MAX_TOKENS, QUERY_TEMPERATURE = 200, 0.9
ANSWER_MAX_TOKENS, ANSWER_TEMPERATURE = 512, 0.7
JUDGE_MAX_TOKENS = 5              # greedy (temperature 0.0)
JUDGE_ANSWER_CHARS = 1500         # each answer cut to this many characters before judging
MIN_QUERY_CHARS = 15              # a cleaned query must be longer than this
OFFICIAL_BATCH = 8                # GEN_BATCH_SIZE = GRADE_BATCH_SIZE = 8

# --- prompt strings, verbatim from the official code (source named above) ---------------------
CURATOR_SYSTEM = (  # stage1_query_gen.py, generate_persona_queries: system_prompt
    "You are a dataset curator creating evaluation queries. "
    "Generate a diverse, specific question that would greatly benefit from "
    "being answered by the following expert persona."
)
QUERY_REQUEST = (  # stage1_query_gen.py, generate_persona_queries: user_prompt (i = 1, 2, ...)
    "Expert persona description:\n{persona}\n\n"
    "Generate exactly 1 challenging but realistic user question that "
    "this expert would excel at answering. The question should be "
    "specific and detailed, not generic. "
    "Output ONLY the question, nothing else.\n"
    "Question #{i}:"
)
PAIRWISE_SYSTEM = (  # stage2_verify_recycle.py: PAIRWISE_SYSTEM
    "You are a fair and rigorous evaluator. You will be given a question and "
    "two candidate answers (Answer A and Answer B). Compare them carefully.\n\n"
    "Evaluation criteria (in order of importance):\n"
    "1. CORRECTNESS: Is the answer factually accurate and logically sound?\n"
    "2. RELEVANCE: Does it directly address the question?\n"
    "3. HELPFULNESS: Is it useful and complete?\n"
    "4. CLARITY: Is it well-organized and easy to follow?\n\n"
    "IMPORTANT: Do NOT favor longer answers. A concise, correct answer is "
    "better than a verbose, padded answer. Unnecessary elaboration or "
    "repetition should count AGAINST an answer.\n\n"
    "Output ONLY the letter of the better answer: 'A' or 'B'. "
    "If they are equally good, output 'TIE'."
)
PAIRWISE_PROMPT = (  # stage2_verify_recycle.py, grade_answers_pairwise: prompt
    "Question: {query}\n\n"
    "Answer A:\n{a}\n\n"
    "Answer B:\n{b}\n\n"
    "Which answer is better? Output A, B, or TIE:"
)


# --- chat messages ---------------------------------------------------------------------------------

def supports_system(tokenizer) -> bool:
    """Whether the chat template accepts a system turn (the official check: try it)."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "t"},
                                       {"role": "user", "content": "t"}], tokenize=False)
        return True
    except Exception:  # noqa: BLE001 - templates raise anything (TemplateError, ValueError, ...)
        return False


def messages(system: str | None, user: str, has_system: bool) -> list[dict]:
    """Chat turns as the official `build_chat_messages`: None = no system turn (the template's
    default applies); a template without a system role gets a non-empty system text folded in
    front of the user turn, separated by a blank line."""
    if system is None:
        return [{"role": "user", "content": user}]
    if has_system:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{system}\n\n{user}" if system else user}]


def query_messages(persona: str, n: int, has_system: bool) -> list[list[dict]]:
    """Stage 1's n requests, numbered from 1."""
    return [messages(CURATOR_SYSTEM, QUERY_REQUEST.format(persona=persona, i=i + 1), has_system)
            for i in range(n)]


def judge_messages(query: str, baseline: str, expert: str, has_system: bool) -> list[list[dict]]:
    """The two comparisons of one pair: pass 1 A = baseline, B = expert; pass 2 swapped."""
    bl, ex = baseline[:JUDGE_ANSWER_CHARS], expert[:JUDGE_ANSWER_CHARS]
    return [messages(PAIRWISE_SYSTEM, PAIRWISE_PROMPT.format(query=query, a=a, b=b), has_system)
            for a, b in ((bl, ex), (ex, bl))]


# --- rules -----------------------------------------------------------------------------------------

def clean_query(text: str) -> str:
    """First line, numbering ("Q3.", "Question 2)", "4 -") and surrounding quotes removed."""
    line = text.strip().split("\n")[0].strip()
    line = re.sub(r"^(?:Q(?:uestion)?\s*)?(\d+)[.):\-]\s*", "", line)
    return line.strip().strip('"').strip("'")


def keep_queries(responses: list[str]) -> list[str]:
    """Cleaned responses longer than MIN_QUERY_CHARS, in order (duplicates kept, as officially)."""
    return [q for q in map(clean_query, responses) if len(q) > MIN_QUERY_CHARS]


def parse_verdict(response: str) -> str:
    """'A', 'B' or 'TIE' from a judge's reply; anything unclear is a TIE."""
    r = response.strip().upper()
    if r in ("A", "B", "TIE"):
        return r
    if "ANSWER A" in r and "ANSWER B" not in r:
        return "A"
    if "ANSWER B" in r and "ANSWER A" not in r:
        return "B"
    if r.startswith("A"):
        return "A"
    if r.startswith("B"):
        return "B"
    return "TIE"  # the official code's last two branches both give TIE


def pairwise(pass1: str, pass2: str) -> dict:
    """The official record of one pair from its two replies (pass 1: expert is B, pass 2: A).
    The expert wins only if chosen in both orders; the baseline only if neither pass chose the
    expert and neither was a tie; both ties are a tie; anything else is mixed (winner "tie")."""
    p1, p2 = parse_verdict(pass1), parse_verdict(pass2)
    e1, e2 = p1 == "B", p2 == "A"
    if e1 and e2:
        winner = "expert"
    elif not e1 and p1 != "TIE" and not e2 and p2 != "TIE":
        winner = "baseline"
    else:
        winner = "tie"
    return {"pass1_raw": p1, "pass2_raw": p2, "expert_wins_pass1": e1,
            "expert_wins_pass2": e2, "winner": winner}


@dataclass
class Split:
    distill: list[dict]
    retain: list[dict]
    stats: dict


def split(records: list[dict], persona_name: str, persona: str) -> Split:
    """Distill / retain sets from judged records {query, baseline, expert, pairwise}, with the
    fields and order of the official `build_training_data` (expert wins → the expert answer and
    the persona as system, gate 1; otherwise the baseline answer, system "", gate 0)."""
    distill, retain = [], []
    stats = {"total_queries": len(records), "context_wins": 0, "base_wins": 0, "ties": 0,
             "mixed": 0}
    for r in records:
        base = {"instruction": r["query"], "persona_source": persona_name,
                "pairwise": r["pairwise"]}
        winner = r["pairwise"]["winner"]
        if winner == "expert":
            stats["context_wins"] += 1
            distill.append({**base, "output": r["expert"], "system": persona,
                            "dataset_type": "distill", "persona": persona_name, "gate_target": 1})
            continue
        # The official record has only "tie" for mixed results, so "mixed" stays 0 there too.
        stats["base_wins" if winner == "baseline" else "ties"] += 1
        retain.append({**base, "output": r["baseline"], "system": "", "dataset_type": "retain",
                       "persona": "baseline", "gate_target": 0})
    return Split(distill, retain, stats)
