"""An OpenAI-compatible PRISM server: `/v1/chat/completions` (streaming and not) over a patched
model under transformers' continuous batching. Each request is routed by the gate at the end of
its prompt, or forced with the extra body field `prism_route` (-1 = base, i = persona i); each
response carries the route its request took in `prism_route`. Greedy decoding.

    python -m prism_fast.serve MODEL PRISM_DIR [--host 127.0.0.1] [--port 8000]

Needs fastapi and uvicorn (the `serve` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import torch

import prism_fast

try:    # FastAPI resolves the endpoint's annotations in this module's globals
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as e:  # pragma: no cover
    raise ImportError("prism_fast.serve needs fastapi and uvicorn: pip install "
                      "'prism_fast[serve]'") from e


@dataclass
class Served:
    """What the app serves: the patched model's running manager, its tokenizer, its name."""

    manager: object
    tokenizer: object
    name: str
    n_adapters: int
    max_new_tokens: int
    eos: set[int]


class BadRequest(ValueError):
    """A request the server refuses (400), with the body field it is about."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse(body, served: Served) -> tuple[list[int], int, int | None, bool]:
    """A chat completion request → (prompt ids, max new tokens, forced route or None, stream)."""
    if not isinstance(body, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise BadRequest("messages: expected a non-empty list of {role: str, content: str}",
                         "messages")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = served.max_new_tokens if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadRequest(f"max_tokens: expected an int ≥ 1, got {limit!r}", "max_tokens")
    route = body.get("prism_route")
    if route is not None and (isinstance(route, bool) or not isinstance(route, int)
                              or not -1 <= route < served.n_adapters):
        raise BadRequest(f"prism_route: expected an int in -1…{served.n_adapters - 1} (-1 = base, "
                         f"i = persona i) or null (the gate decides), got {route!r}", "prism_route")
    if body.get("n", 1) != 1:
        raise BadRequest(f"n: expected 1, got {body.get('n')!r}", "n")
    temperature = body.get("temperature")
    if temperature not in (None, 0, 0.0):
        raise BadRequest(f"temperature: this server decodes greedily; expected 0 or null, got "
                         f"{temperature!r}", "temperature")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream: expected a bool, got {stream!r}", "stream")
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = served.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                               tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids), limit, route, stream


def _finish_reason(output, served: Served) -> str:
    tokens = output.generated_tokens
    return "stop" if tokens and tokens[-1] in served.eos else "length"


def _text(served: Served, tokens: list[int]) -> str:
    return served.tokenizer.decode(tokens, skip_special_tokens=True)


def create_app(served: Served):
    """The FastAPI app; the caller owns the manager (started before, stopped after serving)."""
    app = FastAPI(title="prism_fast")

    def error(status: int, message: str, param: str | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(status_code=status, content={"error": {
            "message": message, "type": kind, "param": param, "code": None}})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model",
                                            "owned_by": "prism_fast"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"body: expected JSON, could not parse it ({e})")
        try:
            ids, limit, route, stream = parse(body, served)
        except BadRequest as e:
            return error(400, str(e), e.param)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        served.manager.register_result_handler(rid, queue.put_nowait)
        added = served.manager.add_request(ids, request_id=rid, max_new_tokens=limit,
                                           streaming=stream, prism_route=route)
        if added is None:
            served.manager.output_router.result_handlers.pop(rid, None)
            return error(503, "server: the generation loop is not accepting requests")
        if stream:
            return StreamingResponse(_stream(served, rid, queue),
                                     media_type="text/event-stream")
        output = await queue.get()
        while not output.is_finished():
            output = await queue.get()
        if output.error is not None:
            return error(500, f"generation failed: {output.error}")
        return _completion(served, rid, output, len(ids))

    return app


def _completion(served: Served, rid: str, output, n_prompt: int) -> dict:
    n = len(output.generated_tokens)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": served.name, "prism_route": output.prism_route,
            "choices": [{"index": 0, "finish_reason": _finish_reason(output, served),
                         "message": {"role": "assistant",
                                     "content": _text(served, output.generated_tokens)}}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n,
                      "total_tokens": n_prompt + n}}


async def _stream(served: Served, rid: str, queue: asyncio.Queue):
    """Server-sent events: text deltas (whole characters only), then the finish reason and the
    route, then [DONE]. A client that goes away cancels its request."""
    def chunk(delta: dict, finish: str | None = None, route=None) -> str:
        return "data: " + json.dumps({
            "id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": served.name, "prism_route": route,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

    sent, done = "", False
    yield chunk({"role": "assistant", "content": ""})
    try:
        while True:
            output = await queue.get()
            if output.error is not None:
                done = True
                yield "data: " + json.dumps({"error": {"message": output.error,
                                                       "type": "server_error"}}) + "\n\n"
                return
            text = _text(served, output.generated_tokens)
            if not text.endswith("\ufffd") and text.startswith(sent) and len(text) > len(sent):
                yield chunk({"content": text[len(sent):]}, route=output.prism_route)
                sent = text
            if output.is_finished():
                if text != sent:       # a tail that decoded differently as a whole
                    yield chunk({"content": text[len(sent):]}, route=output.prism_route)
                done = True
                yield chunk({}, _finish_reason(output, served), output.prism_route)
                yield "data: [DONE]\n\n"
                return
    finally:                       # the client went away (or the server stops): free its blocks
        if not done:
            served.manager.cancel_request(rid)


def load(model_path: str, prism_dir: str, *, dtype: torch.dtype, backend: str,
         max_new_tokens: int, cb_config=None, name: str | None = None,
         merge_open: bool = False) -> Served:
    """Load, patch and start: the Served bundle of a model directory and a PRISM directory
    (merge_open: patch_model's opt-in, merged copies for forwards whose tokens are all open)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    prism_fast.patch_model(model, prism_dir, backend=backend, merge_open=merge_open)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=eos or -1, pad_token_id=tokenizer.pad_token_id)
    manager = model.init_continuous_batching(generation_config=config,
                                             continuous_batching_config=cb_config)
    manager.start()
    return Served(manager, tokenizer, name or model_path,
                  model._prism_patch.routing.n_adapters, max_new_tokens, set(eos))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prism_fast.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Hugging Face model directory (with its tokenizer)")
    parser.add_argument("prism_dir", help="a PRISM output directory (persona_expert/, gate.pt)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--page-size", type=int, default=None)
    parser.add_argument("--merge-open", action="store_true",
                        help="patch_model(merge_open=True): fp32 CPU, one weight copy more")
    args = parser.parse_args(argv)
    import uvicorn
    from transformers import ContinuousBatchingConfig

    from prism_fast.batching import check_engine

    check_engine()

    sizes = {k: v for k, v in (("max_batch_tokens", args.max_batch_tokens),
                               ("num_blocks", args.num_blocks),
                               ("page_size", args.page_size)) if v is not None}
    served = load(args.model, args.prism_dir, dtype=getattr(torch, args.dtype),
                  backend=args.backend, max_new_tokens=args.max_new_tokens,
                  cb_config=ContinuousBatchingConfig(**sizes), merge_open=args.merge_open)
    try:
        uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="warning")
    finally:
        served.manager.stop(block=True, timeout=30)


if __name__ == "__main__":
    main()
