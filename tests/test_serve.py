"""The PRISM server (`python -m prism_fast.serve`) on 127.0.0.1 with the official openai client:
concurrent requests with mixed routes (forced and gated, streaming and not), each equal to the
offline result for its route, none lost; clear 400s; a clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import string
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import prism_fast
from tests import models as M

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
if not __import__("prism_fast.batching").batching.engine_supported():
    pytest.skip("the server runs transformers' continuous batching, which prism_fast hooks from "
                "transformers 5.25 on", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[1]
CHARS = string.ascii_letters + string.digits + " .,?!:'\n<|>/-"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUESTIONS = ["Hi!", "What is 2 + 2?", "Name a colour.", "Who wrote Hamlet?", "Why is the sky blue?",
             "A cat name?", "What does a compiler do?", "Three red fruits?", "Tip for sleep?",
             "Spell dog.", "Count to five.", "Say yes or no.", "Is it raining?", "Best tea?",
             "Capital of France?", "Write one word."]
NEW = 10


def char_tokenizer():
    """A character-level fast tokenizer with a chat template (ids < the tiny models' vocab)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({c: 4 + i for i, c in enumerate(CHARS)})
    assert len(vocab) <= M.VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>", chat_template=TEMPLATE)


def encode(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny Llama with the char tokenizer, and a PRISM dir whose gate opens about half."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer, base = char_tokenizer(), M.base_model()
    prompts = [encode(tokenizer, q) for q in QUESTIONS]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    gate = M.balance_gate(base, M.random_gate(64), ids, (ids != 0).long())
    M.save_prism_dir(M.peft_model(M.clone(base)), gate, root / "prism")
    base.generation_config.eos_token_id = 1
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model", root / "prism"


def offline(dirs, question: str, route: int | None) -> tuple[str, int]:
    """(text, route) of the question alone through patched generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, prism_dir = dirs
    key = (str(model_dir), question, route)
    if key not in _OFFLINE:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if "model" not in _OFFLINE:
            _OFFLINE["model"] = prism_fast.patch_model(
                AutoModelForCausalLM.from_pretrained(model_dir).eval(), str(prism_dir),
                backend="torch")
        model, prompt = _OFFLINE["model"], encode(tokenizer, question)
        kw = {} if route is None else {"prism_routes": [route]}
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=1, pad_token_id=0, **kw)[0, len(prompt):]
        _OFFLINE[key] = (tokenizer.decode(out.tolist(), skip_special_tokens=True),
                         int(prism_fast.get_routes(model)[0]))
    return _OFFLINE[key]


_OFFLINE: dict = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(dirs):
    yield from _serve(dirs)


def _serve(dirs, *options: str):
    """Start `python -m prism_fast.serve` on 127.0.0.1; yield (url, process); stop it."""
    model_dir, prism_dir = dirs
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism_fast.serve", str(model_dir), str(prism_dir), "--port",
         str(port), "--backend", "torch", "--max-new-tokens", str(NEW), "--page-size", "4",
         "--num-blocks", "512", "--max-batch-tokens", "64", *options],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 180
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "server did not start"
        time.sleep(0.5)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def ask(url, question: str, route: int | None, stream: bool) -> tuple[str, int, str]:
    """(text, route, finish reason) of one chat completion."""
    extra = {} if route is None else {"prism_route": route}
    messages = [{"role": "user", "content": question}]
    c = client(url)
    if not stream:
        r = c.chat.completions.create(model="m", messages=messages, extra_body=extra)
        return r.choices[0].message.content, r.prism_route, r.choices[0].finish_reason
    text, taken, finish = "", None, None
    for chunk in c.chat.completions.create(model="m", messages=messages, extra_body=extra,
                                           stream=True):
        text += chunk.choices[0].delta.content or ""
        taken = chunk.prism_route if chunk.prism_route is not None else taken
        finish = chunk.choices[0].finish_reason or finish
    return text, taken, finish


def test_concurrent_mixed_routes_equal_offline(server, dirs):
    url, _ = server
    jobs = [(q, [None, 0, -1][i % 3], i % 4 == 0) for i, q in enumerate(QUESTIONS * 2)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda job: ask(url, *job), jobs))
    assert len(answers) == len(jobs) == 32
    routes = set()
    for (question, route, stream), (text, taken, finish) in zip(jobs, answers):
        want_text, want_route = offline(dirs, question, route)
        assert (taken, text) == (want_route, want_text), (question, route, stream)
        assert finish in ("stop", "length")
        routes.add(taken)
    assert routes == {-1, 0}


def test_merge_open_server_answers_like_offline(dirs):
    """--merge-open: all-open forwards run on merged copies; greedy answers as offline."""
    serving = _serve(dirs, "--merge-open")
    url, _ = next(serving)
    try:
        jobs = [(q, [0, None, -1][i % 3], i % 2 == 0) for i, q in enumerate(QUESTIONS[:6])]
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            answers = list(pool.map(lambda job: ask(url, *job), jobs))
        for (question, route, stream), (text, taken, _) in zip(jobs, answers):
            assert (text, taken) == offline(dirs, question, route), (question, route, stream)
    finally:
        next(serving, None)


def test_bad_requests_get_clear_400s(server):
    import httpx

    url, _ = server
    c = client(url)
    with pytest.raises(openai.BadRequestError, match="prism_route: expected an int in -1…0"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                  extra_body={"prism_route": 3})
    with pytest.raises(openai.BadRequestError, match="messages: expected a non-empty list"):
        c.chat.completions.create(model="m", messages=[])
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "body: expected JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user",
                   "content": "Hi"}], "temperature": 0.7})
    assert r.status_code == 400 and "greedily" in r.json()["error"]["message"]


def test_clean_shutdown(server):
    """Last in this module: SIGINT stops uvicorn and the generation loop; exit status 0."""
    _, proc = server
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
