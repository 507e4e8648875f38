"""The instance-level method overrides and forward hooks a patched model carries (removed by
unpatch_model): generate() and forward take prism_routes=, PEFT's adapter switches act on the
routing. Each one moves the Routing only through its methods (routing.py)."""

from __future__ import annotations

import functools

import torch

from prism_fast.hf import is_peft_model
from prism_fast.routing import Routing

ROUTES_KWARG = "prism_routes"


class Overrides:
    """Instance attributes and hooks put on the model; `remove` takes every one of them off."""

    def __init__(self):
        self.methods: list[tuple[object, str]] = []
        self.hooks: list = []

    def set(self, obj, name: str, fn) -> None:
        obj.__dict__[name] = fn
        self.methods.append((obj, name))

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for obj, name in self.methods:
            del obj.__dict__[name]


def override_methods(model, root, routing: Routing, swaps: list) -> Overrides:
    """generate()         marks one prefill per call (use_cache=False re-feeds whole sequences),
                       lets routes given per prompt cover beams / return sequences, and takes
                       prism_routes= for this call only;
    forward            takes prism_routes= for this call only (a pre-hook removes it);
    PeftModel extras   disable_adapter() and disable/enable_adapter_layers() switch every row
                       to the base model; save_pretrained() saves PEFT's own modules (swapped
                       back for the call); adapter_names=… is refused: use routes.
    Every override and hook is a partial of a module-level function or a bound method (no
    closure), so copy.deepcopy gives a copy whose overrides act on its own routing and modules,
    and pickle / torch.save can store a patched model."""
    out = Overrides()
    for obj in dict.fromkeys([model, root]):
        out.set(obj, "generate", functools.partial(_generate, routing, obj))
    peft = is_peft_model(model)
    kwarg = _RoutesKwarg(routing, peft)
    out.hooks.append(model.register_forward_pre_hook(kwarg.take, with_kwargs=True))
    out.hooks.append(model.register_forward_hook(kwarg.restore, always_call=True))
    if not peft:
        return out
    out.set(model, "disable_adapter", routing.adapters_disabled)
    out.set(model, "disable_adapter_layers", routing.disable)
    out.set(model, "enable_adapter_layers", routing.enable)
    out.set(model, "save_pretrained", functools.partial(_save_pretrained, model, swaps))
    return out


class _RoutesKwarg:
    """The forward hooks that take prism_routes= for one forward call."""

    def __init__(self, routing: Routing, peft: bool):
        self.routing, self.peft = routing, peft

    def take(self, module, args, kwargs):
        # First: `restore` runs (and pops) even when this hook raises.
        self.routing.push_call(kwargs.pop(ROUTES_KWARG, None))
        if self.peft:
            _refuse_adapter_names(kwargs)
        return args, kwargs

    def restore(self, *_):
        self.routing.pop_call()


def _save_pretrained(model, swaps: list, *args, **kwargs):
    for parent, attr, original, _ in swaps:
        setattr(parent, attr, original)
    try:
        return type(model).save_pretrained(model, *args, **kwargs)
    finally:
        for parent, attr, _, ours in swaps:
            setattr(parent, attr, ours)


def _generate(routing: Routing, obj, *args, **kwargs):
    _refuse_adapter_names(kwargs)
    routes = kwargs.pop(ROUTES_KWARG, None)
    routing.enter_generate(routes, _prompt_count(args, kwargs), kwargs.get("attention_mask"))
    try:
        return type(obj).generate(obj, *args, **kwargs)
    finally:
        routing.leave_generate()


def _prompt_count(args: tuple, kwargs: dict) -> int | None:
    """The batch given to generate() (before beams / return sequences repeat it): the first
    of inputs / input_ids / inputs_embeds / attention_mask given; None if none is a tensor
    (generate then starts one sequence from the BOS token)."""
    given = [args[0] if args else None] + [kwargs.get(k) for k in
                                           ("inputs", "input_ids", "inputs_embeds",
                                            "attention_mask")]
    return next((t.shape[0] for t in given if isinstance(t, torch.Tensor) and t.dim() >= 1),
                None)


def _refuse_adapter_names(kwargs: dict) -> None:
    if kwargs.get("adapter_names") is not None:
        raise ValueError("adapter_names: PEFT's per-row adapter selection is replaced by routes "
                         "on a prism_fast-patched model; use prism_fast.set_routes(model, routes) "
                         "or prism_routes=… per call (-1 = base, i = persona i)")
