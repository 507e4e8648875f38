"""The three hooks that drive a model's Routing (routing.py) through each forward: before the
decoder (a prefill decides how its routes come), after layer 0 (the gate), after the decoder
(the prefill's one host sync; a backward refused)."""

from __future__ import annotations

import functools

import torch

from prism_fast.ops.gated_lora_torch import tracing
from prism_fast.routing import Routing


def is_prefill(cache, t: int) -> bool:
    """A forward with no cache or an empty one. Dynamic caches report their length as an int;
    static ones as a device tensor, which is read (one sync) only for multi-token inputs in
    eager mode, so a decode step never syncs. Under torch.compile / graph capture, where that
    read would break the graph, a multi-token input into a static cache counts as a prefill.
    (A one-token prompt into a reused static cache is taken for a decode step: give it a fresh
    cache or call set_routes.)"""
    if cache is None:
        return True
    if not hasattr(cache, "get_seq_length"):
        raise ValueError(f"cache: a {type(cache).__name__} (continuous batching) reached a patched "
                         f"model outside the engine prism_fast hooks; create the manager with "
                         f"model.init_continuous_batching() or use model.generate_batch()")
    n = cache.get_seq_length()
    if isinstance(n, int):
        return n == 0
    if t == 1:
        return False
    return True if tracing() else int(n) == 0


def install_hooks(routing: Routing, decoder, layer0) -> list:
    """The three hooks; their handles, for unpatch_model. Partials of module-level functions
    (no closures): a deep copy or a pickle of the model carries hooks bound to its own routing."""
    return [decoder.register_forward_pre_hook(functools.partial(_before_decoder, routing),
                                              with_kwargs=True),
            layer0.register_forward_hook(functools.partial(_after_layer0, routing)),
            decoder.register_forward_hook(functools.partial(_after_decoder, routing),
                                          with_kwargs=True)]


def _before_decoder(routing: Routing, module, args, kwargs) -> None:
    routing.merged = -1
    if routing.flat is not None:     # continuous batching: batching.py set this forward up
        return
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    if x.shape[0] == 0:   # transformers' attention fails on it with an unrelated reshape error
        raise ValueError("input_ids: expected at least one row, got a batch of 0 rows")
    t = x.shape[1]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    routing.begin(x.shape[0], t, x.device, is_prefill(cache, t), kwargs.get("attention_mask"))


def _after_layer0(routing: Routing, module, args, output) -> None:
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    (routing if routing.flat is None else routing.flat).run_gate(hidden)
    if routing.merging is not None:
        routing.decide_merged(hidden)


def _after_decoder(routing: Routing, module, args, kwargs, output):
    routing.end()
    if not (module.training and torch.is_grad_enabled()):
        return None
    # Training mode with grad on: a backward through this output is refused with the reason
    # (else autograd's "element 0 … does not require grad", or base-only gradients).
    h = output[0]
    h = _ServesOnly.apply(h, torch.ones((), device=h.device, requires_grad=True))
    if isinstance(output, tuple):
        return (h, *output[1:])
    output.last_hidden_state = h
    return output


class _ServesOnly(torch.autograd.Function):
    """Identity forward; a backward raises: a patched model serves, it does not train."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "model: a prism_fast-patched model serves; it cannot train (its LoRA weights are "
            "stacked copies that take no gradient). To train the LoRA, train the PeftModel "
            "unpatched (prism_fast.unpatch_model) or use python -m prism_fast.train, then "
            "patch again; to serve, call model.eval() or run under torch.no_grad()")
