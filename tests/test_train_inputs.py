"""prism_fast.train on bad input and at its edges (tiny models, a character-level tokenizer):
checks before any work, an atomic output kept unless overwritten, samples skipped with a count,
personas folded for templates without a system role, the model's own logits for every
architecture (Gemma-2's soft cap included)."""

from __future__ import annotations

import json

import pytest
import torch

from prism_fast import load_prism
from prism_fast import training as T
from prism_fast.reference import official_stage_b_loss
from prism_fast.training import pipeline
from tests.models import ARCHS, VOCAB, base_model

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'<>|:\n"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
# Gemma's template refuses a system turn.
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}" + TEMPLATE)
PERSONA = "You are a pirate."
DISTILL = [{"system": PERSONA, "instruction": "Why is the sea blue?", "output": "Arr, the sky."},
           {"system": PERSONA, "instruction": "Hello?", "output": "Ahoy there, matey."}]
RETAIN = [{"system": "", "instruction": "What is 2 + 2?", "output": "4."}]
TINY = dict(epochs=1, gate_epochs=2, micro_batch=2, lora_r=2, lora_alpha=4, max_len=96)


def tokenizer(template: str = TEMPLATE):
    """Characters as tokens (ids 4…76, under the tiny models' 97), with a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                  bos_token="<s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def stage2(path, distill=DISTILL, retain=RETAIN):
    path.mkdir(parents=True, exist_ok=True)
    (path / "distill_set.json").write_text(json.dumps(distill))
    if retain is not None:
        (path / "retain_set.json").write_text(json.dumps(retain))
    return path


def run(tmp_path, distill=DISTILL, retain=RETAIN, out="out", tok=None, **kw):
    cfg = T.TrainConfig(**{**TINY, **kw.pop("cfg", {})})
    return T.train(base_model("llama"), tok or tokenizer(), stage2(tmp_path / "data", distill,
                   retain), tmp_path / out, cfg, progress=False, **kw)


# ----------------------------------------------------------------------------- refused early

@pytest.mark.parametrize("distill,retain", [([], RETAIN), ([], [])])
def test_empty_distill_set_is_refused(tmp_path, distill, retain):
    with pytest.raises(ValueError, match="distill_set.json: no distill data"):
        run(tmp_path, distill, retain)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value,words", [
    ("micro_batch", 0, "micro_batch: expected a positive integer, got 0"),
    ("temperature", -1.0, "temperature: expected a positive finite number, got -1.0"),
    ("temperature", float("inf"), "temperature: expected a positive finite number, got inf"),
    ("epochs", 0, "epochs: expected a positive integer"),
    ("max_len", 0, "max_len: expected a positive integer"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, monkeypatch, field, value, words):
    monkeypatch.setattr(pipeline, "build_samples", lambda *a: pytest.fail("work started"))
    with pytest.raises(ValueError, match=words):
        run(tmp_path, cfg={field: value})
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_arguments_before_loading_the_model(tmp_path, capsys):
    data = stage2(tmp_path / "data")
    with pytest.raises(SystemExit):          # no model "nowhere/model" exists: never loaded
        T.main(["--model", "nowhere/model", "--data", str(data), "--out", str(tmp_path / "o"),
                "--temperature", "-1"])
    assert "temperature: expected a positive finite number, got -1.0" in capsys.readouterr().err


@pytest.mark.parametrize("content,words", [
    ([{"instruction": "a"}], r"sample 0: expected 'output' as a string, got no such key"),
    ([DISTILL[0], {"instruction": 3, "output": "b"}], "sample 1: expected 'instruction' as a"),
    ({"instruction": "a", "output": "b"}, "expected a JSON list of samples, got dict"),
])
def test_malformed_samples_name_file_and_index(tmp_path, content, words):
    with pytest.raises(ValueError, match=words) as e:
        run(tmp_path, content)
    assert "distill_set.json" in str(e.value)


def test_unwritable_output_folder_is_found_first(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(pipeline, "build_samples", lambda *a: pytest.fail("work started"))
    with pytest.raises(OSError, match="output_dir: cannot create the folder .*a_file"):
        run(tmp_path, out="a_file/sub/out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a training output"):
        run(tmp_path, out="other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- the output

def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = run(tmp_path)
    gate = (out / "gate.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a training output .*overwrite=True"):
        run(tmp_path)
    assert (out / "gate.pt").read_bytes() == gate
    run(tmp_path, overwrite=True, cfg={"seed": 1})
    assert (out / "gate.pt").read_bytes() != gate
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]   # no temporary left
    assert load_prism(out) is not None


def test_interrupted_run_leaves_the_previous_output_whole(tmp_path, monkeypatch):
    out = run(tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_lora", interrupted)          # Stage B, after gate.pt
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, overwrite=True, cfg={"seed": 1})
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]
    assert load_prism(out) is not None


# ----------------------------------------------------------------------------- samples

def test_samples_that_cannot_train_are_skipped_and_counted(tmp_path):
    long_prompt = {"system": PERSONA, "instruction": "Tell me " * 12, "output": "No."}
    too_long = {"system": PERSONA, "instruction": "Sing.", "output": "la " * 100}   # > 256
    with pytest.warns(UserWarning) as record:
        out = run(tmp_path, DISTILL + [long_prompt, too_long], cfg={"max_len": 320})
    text = " ".join(str(w.message) for w in record)
    assert "1 distill sample(s) skipped: longer than the model's 256 positions" in text
    cfg = json.loads((out / "gated_lora_config.json").read_text())
    assert cfg["n_distill"] == 3 and cfg["n_skipped"] == {"distill": 1, "retain": 0}
    with pytest.warns(UserWarning, match="1 distill sample.* skipped: the prompt fills max_len "
                                         "= 60 tokens"):
        run(tmp_path, DISTILL + [long_prompt], out="out2", cfg={"max_len": 60})


def test_all_samples_skipped_is_an_error(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no distill sample left"):
        run(tmp_path, cfg={"max_len": 5})
    assert not (tmp_path / "out").exists()


def test_sample_without_persona_warns(tmp_path):
    bare = [{"instruction": "Hello?", "output": "Hi."}, DISTILL[0]]
    with pytest.warns(UserWarning, match="1 distill sample.* no 'system' persona: their context "
                                         "teacher is the student"):
        run(tmp_path, bare)


def test_template_without_system_role_folds_the_persona(tmp_path):
    tok = tokenizer(NO_SYSTEM)
    ids, pl = T.encode(tok, PERSONA, "Hello?", "Ahoy.", None)
    assert tok.decode(ids).replace(" ", "").startswith(
        "<user>" + f"{PERSONA}\n\nHello?".replace(" ", ""))
    ids, _ = T.encode(tok, "", "Hello?", "Ahoy.", None)       # the student: no persona at all
    assert tok.decode(ids).replace(" ", "").startswith("<user>Hello?")
    assert (run(tmp_path, tok=tok) / "gate.pt").is_file()


# ----------------------------------------------------------------------------- logits

@pytest.mark.parametrize("arch", ARCHS + ["gemma2"])
def test_student_and_teacher_logits_are_the_models_own(arch):
    model = base_model(arch)
    T.check_model(model)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (12,), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]                            # [12, V]
        teacher = T.context_teacher(model, ids, 5)
        vals, idx = logits[4:-1].float().topk(T.TEACHER_TOPK, dim=-1)
        assert torch.equal(teacher["topk_indices"].long(), idx)
        assert torch.allclose(teacher["topk_values"].float(), vals.half().float())
        sample = {"input_ids": ids, "prompt_len": 5,
                  "topk_values": torch.randn(7, 8, generator=g) * 3,
                  "topk_indices": torch.randint(0, VOCAB, (7, 8), generator=g)}
        ours = T.distill_loss(model, T.collate([sample], 0), 2.0)
        official = official_stage_b_loss(logits[4:-1], sample["topk_values"],
                                          sample["topk_indices"], 2.0)
    assert torch.allclose(ours, official, rtol=1e-4, atol=1e-6), (float(ours), float(official))


def test_teacher_k_is_at_most_the_vocabulary():
    model = base_model("llama")
    teacher = T.context_teacher(model, torch.randint(3, VOCAB, (9,)), 4, k=VOCAB + 50)
    assert teacher["topk_indices"].shape == (5, VOCAB)


def test_model_whose_logits_are_not_its_head_is_refused():
    model = base_model("llama")
    model.config.final_logit_softcapping = 0.5      # claimed, never applied by Llama
    with pytest.raises(ValueError, match="model: LlamaForCausalLM's logits are not lm_head"):
        T.check_model(model)


def test_teacher_files_are_read_and_their_ids_checked(tmp_path):
    data = stage2(tmp_path / "data")
    (data / "teacher_logits_topk").mkdir()
    for i in range(len(DISTILL)):
        torch.save({"topk_values": torch.randn(30, 8).half(),
                    "topk_indices": torch.randint(0, VOCAB, (30, 8)).int(), "prompt_len": 5},
                   data / "teacher_logits_topk" / f"sample_{i}.pt")
    cfg = T.TrainConfig(**TINY)
    out = T.train(base_model("llama"), tokenizer(), data, tmp_path / "out", cfg, teacher="files",
                  progress=False)
    assert json.loads((out / "gated_lora_config.json").read_text())["teacher"] == "files"
    bad = data / "teacher_logits_topk" / "sample_1.pt"
    torch.save({"topk_values": torch.randn(3, 8).half(),
                "topk_indices": torch.full((3, 8), -1, dtype=torch.int32), "prompt_len": 5}, bad)
    with pytest.raises(ValueError, match=r"teacher file .*sample_1.pt: expected topk_indices in "
                                         r"0…96 \(the model's vocabulary\), got -1…-1"):
        T.train(base_model("llama"), tokenizer(), data, tmp_path / "out2", cfg, teacher="files",
                progress=False)
    assert not (tmp_path / "out2").exists()
