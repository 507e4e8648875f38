"""What prism_fast knows of Hugging Face and PEFT: the architecture table, where the decoder
layers live, and the instance-level method overrides of a patched model (removed by
unpatch_model)."""

from __future__ import annotations

import contextlib
import functools
import re

import torch
import torch.nn as nn

from prism_fast.loading import LoraWeights, Persona
from prism_fast.routing import Routing

# model_type → projections of one decoder layer that read the same input, in call order (the
# first of a group runs the group's shared shrink). Types not listed use "default"; a targeted
# nn.Linear outside every group is patched on its own. Anything that is not an nn.Linear
# (Qwen2-MoE's routed experts are fused 3-D parameters in transformers 5, its router a
# TopKRouter) is refused by the checks, never patched half-way.
_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
SHARED_INPUT: dict[str, tuple[tuple[str, ...], ...]] = {
    "default": (_ATTN, ("mlp.gate_proj", "mlp.up_proj")),
    "phi3": (),  # qkv_proj and gate_up_proj are fused nn.Linear already: one slice each
    "qwen2_moe": (_ATTN, ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
}
# The seven projections of a Llama-style decoder layer that PRISM's LoRA adapts (paths end in
# these names): one list for the trainer, the benchmarks and the tests.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
ROUTES_KWARG = "prism_routes"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def decoder_and_root(model):
    """(the transformers model, its decoder, the decoder's layers)."""
    root = model.base_model.model if is_peft_model(model) else model
    decoder = getattr(root, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"model: expected a decoder with model.model.layers (Llama, Mistral, "
                         f"Qwen2, Qwen2-MoE, Gemma, Phi-3, …), got {type(root).__name__}")
    return root, decoder, layers


def groups_of(model_type: str, rels: list[str]) -> list[list[str]]:
    """One layer's targeted projections (paths relative to the layer) in shared-input groups."""
    shared = SHARED_INPUT.get(model_type, SHARED_INPUT["default"])
    groups = [[r for r in names if r in rels] for names in shared]
    grouped = {r for g in groups for r in g}
    return [g for g in groups if g] + [[r] for r in rels if r not in grouped]


def personas_from_peft_model(peft_model) -> tuple[list[Persona], dict[str, torch.nn.Module]]:
    """A PeftModel's loaded LoRA adapters → personas (in load order), plus the LoRA-wrapped
    modules by path (relative to the causal-LM root) so that patch_model can swap them."""
    from peft.tuners.lora import LoraLayer

    root = peft_model.base_model.model
    names = list(peft_model.peft_config)
    for n in names:
        cfg = peft_model.peft_config[n]
        if getattr(cfg, "peft_type", None) is None or cfg.peft_type.value != "LORA":
            raise ValueError(f"model: adapter {n!r} is {cfg.peft_type}, expected LoRA")
        if getattr(cfg, "modules_to_save", None):
            raise ValueError(f"model: adapter {n!r} has modules_to_save, which a per-row gate "
                             f"cannot route; not supported")
    personas = [Persona(name=n, modules={}, source="PeftModel") for n in names]
    wrapped: dict[str, torch.nn.Module] = {}
    for path, module in root.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module.get_base_layer(), torch.nn.Linear):
            raise ValueError(f"model: LoRA on {path} wraps {type(module.get_base_layer()).__name__}"
                             f", expected nn.Linear")
        wrapped[path] = module
        for persona in personas:
            if persona.name not in module.lora_A:
                continue
            if module.use_dora.get(persona.name):
                raise ValueError(f"model: adapter {persona.name!r} uses DoRA on {path}; not "
                                 f"supported")
            persona.modules[path] = LoraWeights(
                a=module.lora_A[persona.name].weight.detach(),
                b=module.lora_B[persona.name].weight.detach(),
                scaling=float(module.scaling[persona.name]))
    if not wrapped:
        raise ValueError("model: expected a PeftModel with LoRA adapters, found no LoRA layers")
    return personas, wrapped


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
    out.set(model, "disable_adapter", functools.partial(_disable_adapter, routing))
    out.set(model, "disable_adapter_layers", functools.partial(setattr, routing, "disabled", True))
    out.set(model, "enable_adapter_layers", functools.partial(setattr, routing, "disabled", False))
    out.set(model, "save_pretrained", functools.partial(_save_pretrained, model, swaps))
    return out


class _RoutesKwarg:
    """The forward hooks that take prism_routes= for one forward call."""

    def __init__(self, routing: Routing, peft: bool):
        self.routing, self.peft, self.saved = routing, peft, []

    def take(self, module, args, kwargs):
        self.saved.append(self.routing.call)   # first: `restore` runs even when this hook raises
        if self.peft:
            _refuse_adapter_names(kwargs)
        routes = kwargs.pop(ROUTES_KWARG, None)
        if routes is not None:
            self.routing.call = self.routing.check_routes(routes)
        return args, kwargs

    def restore(self, *_):
        self.routing.call = self.saved.pop()


@contextlib.contextmanager
def _disable_adapter(routing: Routing):
    previous, routing.disabled = routing.disabled, True
    try:
        yield
    finally:
        routing.disabled = previous


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
    call = routing.call
    if kwargs.get(ROUTES_KWARG) is not None:
        routing.call = routing.check_routes(kwargs[ROUTES_KWARG])
    kwargs.pop(ROUTES_KWARG, None)
    prompts = None if routing.in_generate else _prompt_count(args, kwargs)
    if prompts == 0:
        routing.call = call
        raise ValueError("input_ids: expected at least one prompt, got a batch of 0 rows")
    routing.in_generate += 1
    if routing.in_generate == 1:
        routing.decided_in_generate = False
        routing.prompts = prompts
        mask = kwargs.get("attention_mask")
        routing.generate_mask = mask if isinstance(mask, torch.Tensor) \
            and mask.dim() == 2 else None
    try:
        return type(obj).generate(obj, *args, **kwargs)
    finally:
        routing.in_generate -= 1
        routing.call = call
        if not routing.in_generate:
            routing.generate_mask, routing.prompts = None, None


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
