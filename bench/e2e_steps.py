"""How the end-to-end benchmark (bench/bench_e2e.py) calls a model: forward keyword names, a
prefill or a decode step rewound after it, a decode step captured as a CUDA graph, the routes a
PRISM provider sets, and PRISM's official two-pass routing."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.models import ADAPTER

GATE = "gate"          # the route of prism_gate: set_routes(None), the gate decides


@dataclass(frozen=True)
class E2ECase:
    kind: str     # "prefill" or "decode"
    batch: int
    tokens: int   # prompt length (prefill) or context length (decode)


class Forward:
    """Version-proof keyword names for the forward (transformers 5 renamed the cache argument)."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.keep1 = {keep: 1} if keep else {}

    def cache_of(self, out):
        return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


def rewind(cache, length: int) -> None:
    """Drop the tokens a decode step appended. A negative argument means "remove that many" both
    in transformers 4 (crop(max_length)) and 5 (crop(tokens_to_remove), which refuses > 0)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def case_fn(call: Callable, fwd: Forward, case: E2ECase, ids: torch.Tensor,
            extra: dict) -> Callable[[], object]:
    """The timed callable: one prefill, or one decode step after an untimed prefill."""
    if case.kind == "prefill":
        return lambda: call(input_ids=ids, use_cache=True, **fwd.keep1, **extra)
    out = call(input_ids=ids, use_cache=True, **fwd.keep1, **extra)
    cache = fwd.cache_of(out)
    context = cache.get_seq_length()
    tok = ids[:, -1:]                                                     # [B, 1]

    def step() -> None:
        call(input_ids=tok, use_cache=True, **{fwd.cache_kw: cache}, **extra)
        rewind(cache, context)

    return step


class GraphedStep:
    """One decode step captured as a CUDA graph against a StaticCache (by hand: torch.compile's
    backends copy every weight per replay or compile too long); a replay appends one token at
    the static `pos`, so the cache has room for `capacity` replays and its attention spans
    T + `capacity` + 10 positions, not T. A prism provider's graph reads the routes tensor live
    at its capture: `prepare()` refills it before each round, since another batch size's
    set_routes replaces (and frees) the routing's tensor instead of writing into it."""

    def __init__(self, model, fwd: Forward, ids: torch.Tensor, capacity: int,
                 routes: list[int] | None):
        from transformers import StaticCache

        import prism_fast

        b, t = ids.shape
        warm = 2                                 # eager steps before the capture (side stream)
        cache = StaticCache(config=model.config, max_cache_len=t + warm + capacity + 8)
        positions = torch.arange(t, device=ids.device)[None].expand(b, t)
        out = model(input_ids=ids, position_ids=positions, use_cache=True,
                    **{fwd.cache_kw: cache}, **fwd.keep1)                  # eager prefill
        tok = out.logits[:, -1:].argmax(-1)                                # [B, 1], static
        self.pos = torch.full((b, 1), t, device=ids.device)                # [B, 1], static

        def step():
            return model(input_ids=tok, position_ids=self.pos, use_cache=True,
                         **{fwd.cache_kw: cache}, **fwd.keep1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(warm):   # all open first: the LoRA kernels load outside the capture
                if routes is not None:
                    prism_fast.set_routes(model, [0] * b if i == 0 else routes)
                step()
                self.pos.add_(1)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        self.routes = self.want = None
        if routes is not None:   # kept alive here: the graph holds no reference to it
            from prism_fast.patch import _patch_of

            self.routes = _patch_of(model).routing.routes
            self.want = torch.tensor(routes, dtype=torch.int32, device=ids.device)

    def prepare(self) -> None:
        """Before a round: the routes this graph was captured for, in the tensor it reads."""
        if self.routes is not None:
            self.routes.copy_(self.want)

    def __call__(self) -> None:
        self.graph.replay()
        self.pos.add_(1)


def half(b: int) -> list[int]:
    return [0 if i % 2 == 0 else -1 for i in range(b)]                  # open, closed, …


def route_of(provider: str, b: int) -> list[int] | str | None:
    """The routes a prism provider sets before each round (None: not a patched model)."""
    return {"prism_open": [0] * b, "prism_merged": [0] * b, "prism_closed": [-1] * b,
            "prism_half": half(b), "prism_gate": GATE}.get(provider)


def two_pass(peft_model, gate: torch.nn.Module, fwd: Forward) -> Callable:
    """PRISM's reference routing (prism/run_gated_lora.py): a base forward for the gate, the
    decision on the host, then the generation forward with the adapter on or off per row."""

    def call(input_ids: torch.Tensor, **kwargs):
        with peft_model.disable_adapter():
            out = peft_model(input_ids=input_ids, output_hidden_states=True, use_cache=False,
                             **fwd.keep1)
        decision = gate(out.hidden_states[1][:, -1]).argmax(dim=-1).tolist()   # host sync
        if all(decision):
            return peft_model(input_ids=input_ids, **kwargs)
        if not any(decision):
            with peft_model.disable_adapter():
                return peft_model(input_ids=input_ids, **kwargs)
        names = [ADAPTER if d else "__base__" for d in decision]
        return peft_model(input_ids=input_ids, adapter_names=names, **kwargs)

    return call


def routed(model, route, fn: Callable):
    """`fn()` after setting a prism provider's routes (one patched model serves several)."""
    import prism_fast

    with torch.no_grad():
        if route is not None:
            prism_fast.set_routes(model, None if route == GATE else route)
        return fn()
