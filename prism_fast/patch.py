"""patch_model: single-pass PRISM routing inside a Hugging Face decoder.

Layer 0 carries no LoRA, so its output (the gate input) is the same with the adapter on or
off. A forward hook on layer 0 evaluates the gate on each row's last non-pad prompt token and
writes the routes into a device tensor in place; the patched projections of layers 1…N−1 read
that tensor in the same forward. Decode steps reuse the routes of their prefill.

    routes [B] int32 (device)  ─┐
    layer 0 ─► hook: gate(h[b, last_b]) ─► routes.copy_()  (prefill only)
    layer i ≥ 1: GatedLoraLinear(x [B, T, K]) = F.linear + gated LoRA (one launch per group)

Projections that read the same input (q/k/v, gate/up) form a group: the first one called runs
one multi-slice op for the whole group and hands the others their outputs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from prism_fast import reference
from prism_fast.kernels import gated_lora_linear_triton, prism_gate_triton
from prism_fast.kernels.gated_lora import MAX_RANK
from prism_fast.loading import (
    GATE_KEYS,
    Persona,
    PrismAdapter,
    load_gate,
    load_prism,
    personas_from_peft_model,
)
from prism_fast.ops import use_triton
from prism_fast.torch_path import gated_lora_linear_torch

# ---- the per-architecture table -----------------------------------------------------------
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
_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---- routing state ------------------------------------------------------------------------


@dataclass
class _Routing:
    """Routes shared by the hooks and every patched projection of one model."""

    n_adapters: int
    triton: bool
    device: torch.device                           # layer 0's: where routes live
    gate: tuple[torch.Tensor, ...] | None          # (w1, b1, w2, b2) in layer 0's dtype/device
    routes: torch.Tensor | None = None             # [B] int32, updated in place
    fixed: torch.Tensor | None = None              # [B] from set_routes
    fixed_all_closed: bool | None = None           # known on the host when set_routes had CPU ids
    all_closed: bool = False                       # every route closed: decode skips LoRA
    in_prefill: bool = False
    known_closed: bool | None = None               # this prefill's all_closed, if host-known
    gate_pending: bool = False
    attention_mask: torch.Tensor | None = None
    generate_mask: torch.Tensor | None = None      # the 2-D mask given to generate(), if any
    seq_len: int = 1                               # T of the current forward
    token_ids: torch.Tensor | None = None          # routes repeated over T, built on demand
    in_generate: int = 0                           # depth of patched generate() calls
    decided_in_generate: bool = False              # this generate() already had its prefill
    disabled: bool = False                         # PEFT's disable_adapter(): the base model

    def assign(self, routes: torch.Tensor) -> None:
        """Write routes in place when the batch size allows, so captured graphs see them."""
        if self.routes is not None and self.routes.shape == routes.shape \
                and self.routes.device == routes.device:
            self.routes.copy_(routes)
        else:
            self.routes = routes.to(torch.int32).clone()

    def skip_lora(self) -> bool:
        return self.disabled or (self.all_closed and not _tracing())

    def ids_for(self, x: torch.Tensor) -> torch.Tensor:
        """Routes [B] for x [B, T, K]; per-token ids [B·T] for x [B·T, K] (MoE blocks flatten)."""
        routes = self.routes
        if routes is None:
            raise ValueError("routes: no routes yet; run a prefill forward or call set_routes")
        b = routes.shape[0]
        if x.dim() == 3 and x.shape[0] == b:
            ids = routes
        elif x.dim() == 2 and x.shape[0] == b * self.seq_len:
            if self.token_ids is None or self.token_ids.shape[0] != x.shape[0]:
                self.token_ids = routes.repeat_interleave(self.seq_len)
            ids = self.token_ids
        else:
            raise ValueError(f"x: expected (B={b}, T, K) or (B·T, K) to match the routes of the "
                             f"last prefill, got {tuple(x.shape)}; a new batch needs a new prefill")
        return ids if ids.device == x.device else ids.to(x.device, non_blocking=True)


def _tracing() -> bool:
    """True under torch.compile or CUDA-graph capture: no syncs and no route-dependent branches."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# ---- patched projections ------------------------------------------------------------------


class _Group:
    """Projections reading the same input; adapters stacked once: A [L, S·R, K], B [L, ΣN, R]."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                 rank: int, offsets: list[int]):
        self.members: list[GatedLoraLinear] = []   # filled in slot order by patch_model
        self.lora_a, self.lora_b, self.scaling, self.rank = lora_a, lora_b, scaling, rank
        self.offsets = offsets                      # row offsets of each slice in lora_b
        self.pending_x: torch.Tensor | None = None
        self.pending: list[torch.Tensor | None] = []

    def slice_args(self, s: int):
        r, lo, hi = self.rank, self.offsets[s], self.offsets[s + 1]
        return self.lora_a[:, s * r:(s + 1) * r], self.lora_b[:, lo:hi], self.scaling[s]

    def run(self, slot: int, x: torch.Tensor, ids: torch.Tensor, triton: bool) -> torch.Tensor:
        if not triton:
            op = gated_lora_linear_torch
        elif torch.compiler.is_compiling():
            op = torch.ops.prism_fast.gated_lora
        else:
            op = gated_lora_linear_triton
        if len(self.members) == 1:   # the stacked tensors are this projection's own
            member = self.members[0]
            return op(x, [member.weight], [member.bias], self.lora_a, self.lora_b, self.scaling,
                      ids)[0]
        if slot != 0:
            if self.pending_x is x and self.pending[slot] is not None:
                y, self.pending[slot] = self.pending[slot], None
                if all(p is None for p in self.pending[1:]):
                    self.pending_x, self.pending = None, []
                return y
            member = self.members[slot]
            a, b, s = self.slice_args(slot)
            return op(x, [member.weight], [member.bias], a, b, s.reshape(1, -1), ids)[0]
        ys = op(x, [m.weight for m in self.members], [m.bias for m in self.members],
                self.lora_a, self.lora_b, self.scaling, ids)
        self.pending_x, self.pending = x, [None, *ys[1:]]
        return ys[0]


class GatedLoraLinear(nn.Module):
    """Drop-in for one nn.Linear: the same `weight` / `bias` parameters, plus gated personas."""

    def __init__(self, base: nn.Linear, group: _Group, slot: int, routing: _Routing):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.slot = slot
        # Plain attributes (not submodules / buffers): the state dict stays the model's own.
        self.__dict__["group"] = group
        self.__dict__["routing"] = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, K] → [B, T, N]
        routing = self.routing
        if routing.skip_lora():
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x: expected dtype {self.weight.dtype} (the layer's), got {x.dtype}")
        return self.group.run(self.slot, x, routing.ids_for(x), routing.triton)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"slot={self.slot} of {len(self.group.members)}"


# ---- patch / unpatch ----------------------------------------------------------------------


@dataclass
class _Patch:
    routing: _Routing
    swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]]   # parent, attr, original, ours
    hooks: list = field(default_factory=list)
    methods: list[tuple[object, str]] = field(default_factory=list)  # instance overrides


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _is_prefill(cache, t: int) -> bool:
    """A forward with no cache or an empty one. Dynamic caches report their length as an int;
    static ones as a device tensor, which is read (one sync) only for multi-token inputs in
    eager mode, so a decode step never syncs. Under torch.compile / graph capture, where that
    read would break the graph, a multi-token input into a static cache counts as a prefill.
    (A one-token prompt into a reused static cache is taken for a decode step: give it a fresh
    cache or call set_routes.)"""
    if cache is None:
        return True
    n = cache.get_seq_length()
    if isinstance(n, int):
        return n == 0
    if t == 1:
        return False
    return True if _tracing() else int(n) == 0


def _last_token(mask: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    """Index of each row's last non-pad token (left or right padding) from a 2-D mask."""
    if mask is None or mask.dim() != 2:
        return torch.full((b,), t - 1, dtype=torch.long, device=device)
    m = mask[:, -t:].to(device=device, dtype=torch.int32)
    return t - 1 - m.flip(1).argmax(dim=1)


def _decoder_and_root(model):
    root = model.base_model.model if _is_peft_model(model) else model
    decoder = getattr(root, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"model: expected a decoder with model.model.layers (Llama, Mistral, "
                         f"Qwen2, Qwen2-MoE, Gemma, Phi-3, …), got {type(root).__name__}")
    return root, decoder, layers


def patch_model(model, adapter=None, *, gate=None, backend: str = "auto"):
    """Swap the persona-targeted nn.Linear modules of `model` for gated LoRA ones, in place.

    adapter: a PRISM output dir, a PEFT adapter dir, a list of them, a `load_prism` result, or
    None when `model` is a PeftModel (its loaded LoRA adapters become personas 0…L−1).
    gate: a gate.pt path or state dict with L + 1 classes; default: the PRISM dir's gate.pt.
    With no gate and no set_routes, every sequence uses adapter 0.
    """
    if getattr(model, "_prism_patch", None) is not None:
        raise ValueError("model: already patched by prism_fast; call unpatch_model(model) first")
    root, decoder, layers = _decoder_and_root(model)
    wrapped: dict[str, nn.Module] = {}
    if _is_peft_model(model):
        if adapter is not None:
            raise ValueError("adapter: expected None for a PeftModel (its loaded adapters are the "
                             "personas); to load other adapters, patch the base model")
        personas, wrapped = personas_from_peft_model(model)
        gate_state = None
    else:
        if adapter is None:
            raise ValueError("adapter: expected a PRISM/PEFT adapter directory, a list of them or "
                             "a load_prism() result (or pass a PeftModel), got None")
        loaded = adapter if isinstance(adapter, PrismAdapter) else load_prism(adapter)
        personas, gate_state = loaded.personas, loaded.gate
        if loaded.gated_sources and gate is None:
            raise ValueError(f"gate: {len(loaded.gated_sources)} PRISM directories each bring a "
                             f"binary gate, which cannot route between {len(personas)} personas; "
                             f"pass gate= with {len(personas) + 1} classes, or pass their "
                             f"persona_expert/ subdirectories and use set_routes")
    if gate is not None:
        gate_state = load_gate(gate)
    n_layers = len(layers)
    model_type = getattr(getattr(root, "config", None), "model_type", "default")
    targets = _check_targets(root, personas, wrapped, n_layers, model_type)
    first = next(iter(targets.values()))
    layer0_device = next(layers[0].parameters()).device
    routing = _Routing(n_adapters=len(personas), triton=use_triton(backend, first.weight.device),
                       device=layer0_device, gate=None)
    if gate_state is not None:
        routing.gate = _check_gate(gate_state, root, len(personas), targets, layer0_device,
                                   first.weight.dtype)
    # Everything is checked: from here on, nothing can fail half-way.
    swaps = []
    shared = SHARED_INPUT.get(model_type, SHARED_INPUT["default"])
    by_layer: dict[int, list[str]] = {}
    for path in targets:
        by_layer.setdefault(int(_LAYER_PATH.match(path).group(1)), []).append(path)
    for idx, paths in sorted(by_layer.items()):
        rels = [_LAYER_PATH.match(p).group(2) for p in paths]
        groups = [[r for r in names if r in rels] for names in shared]
        grouped = {r for g in groups for r in g}
        groups = [g for g in groups if g] + [[r] for r in rels if r not in grouped]
        for rel_names in groups:
            full = [f"model.layers.{idx}.{r}" for r in rel_names]
            bases = [targets[p] for p in full]
            group = _stack(full, bases, personas)
            for slot, (path, base) in enumerate(zip(full, bases)):
                module = GatedLoraLinear(base, group, slot, routing)
                group.members.append(module)
                parent_path, _, attr = path.rpartition(".")
                parent = root.get_submodule(parent_path)
                swaps.append((parent, attr, getattr(parent, attr), module))
                setattr(parent, attr, module)
    patch = _Patch(routing=routing, swaps=swaps)
    patch.hooks.append(decoder.register_forward_pre_hook(_before_decoder(routing),
                                                         with_kwargs=True))
    patch.hooks.append(layers[0].register_forward_hook(_after_layer0(routing)))
    patch.hooks.append(decoder.register_forward_hook(_after_decoder(routing), with_kwargs=True))
    _override_methods(model, root, patch)
    model.__dict__["_prism_patch"] = patch
    return model


def _check_targets(root, personas: list[Persona], wrapped: dict, n_layers: int,
                   model_type: str) -> dict[str, nn.Linear]:
    """Every persona module exists in this model, is an nn.Linear and has matching shapes."""
    targets: dict[str, nn.Linear] = {}
    for persona in personas:
        for path, lw in persona.modules.items():
            m = _LAYER_PATH.match(path)
            if m is None:
                raise ValueError(f"adapter: persona {persona.name!r} targets {path}, expected "
                                 f"modules under model.layers.<i>")
            if int(m.group(1)) >= n_layers:
                raise ValueError(f"adapter: persona {persona.name!r} targets layer {m.group(1)} but "
                                 f"the model has {n_layers} layers (an adapter made for another "
                                 f"model?)")
            if path in wrapped:
                base = wrapped[path].get_base_layer()
            else:
                try:
                    base = root.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"adapter: persona {persona.name!r} targets {path}, which "
                                     f"this {model_type} model does not have") from None
            if not isinstance(base, nn.Linear):
                raise ValueError(f"adapter: persona {persona.name!r} targets {path}, a "
                                 f"{type(base).__name__}; only nn.Linear targets are supported "
                                 f"(e.g. attention and shared-expert projections of MoE models, "
                                 f"not their fused routed experts)")
            k, n = base.in_features, base.out_features
            if lw.a.shape[1] != k or lw.b.shape[0] != n:
                raise ValueError(f"adapter: persona {persona.name!r} on {path}: expected lora_A "
                                 f"(r, {k}) and lora_B ({n}, r), got {tuple(lw.a.shape)} and "
                                 f"{tuple(lw.b.shape)} (an adapter made for another model?)")
            if lw.a.shape[0] > MAX_RANK:
                raise ValueError(f"adapter: persona {persona.name!r} on {path}: expected rank "
                                 f"≤ {MAX_RANK}, got {lw.a.shape[0]}")
            targets[path] = base
    if not targets:
        raise ValueError("adapter: the personas target no module of this model")
    return targets


def _check_gate(state: dict, root, n_adapters: int, targets: dict, device, dtype):
    w1, b1, w2, b2 = (state[k] for k in GATE_KEYS)
    hidden = getattr(root.config, "hidden_size", None)
    if hidden is not None and w1.shape[1] != hidden:
        raise ValueError(f"gate: expected gate.0.weight (D, {hidden}) for this model's hidden "
                         f"size, got {tuple(w1.shape)} (a gate made for another model?)")
    if w2.shape[0] != n_adapters + 1:
        raise ValueError(f"gate: expected {n_adapters + 1} classes (base + {n_adapters} "
                         f"personas) in gate.3.weight, got {w2.shape[0]}")
    on_layer0 = [p for p in targets if p.startswith("model.layers.0.")]
    if on_layer0:
        raise ValueError(f"adapter: LoRA on layer 0 ({', '.join(on_layer0)}) changes the gate "
                         f"input, so single-pass routing would be wrong; drop the gate and fix "
                         f"routes with prism_fast.set_routes(model, routes) instead")
    # The official gate runs in the model's dtype on the model's device.
    return tuple(t.detach().to(device=device, dtype=dtype) for t in (w1, b1, w2, b2))


def _stack(paths: list[str], bases: list[nn.Linear], personas: list[Persona]) -> _Group:
    """Stack every persona's LoRA of one group once: zero-padded to the group's largest rank."""
    ref = bases[0].weight
    n_adapters, n_slices = len(personas), len(bases)
    rank = max([1] + [p.modules[path].a.shape[0] for p in personas for path in paths
                      if path in p.modules])
    k = bases[0].in_features
    n_total = sum(b.out_features for b in bases)
    lora_a = torch.zeros(n_adapters, n_slices * rank, k, dtype=ref.dtype, device=ref.device)
    lora_b = torch.zeros(n_adapters, n_total, rank, dtype=ref.dtype, device=ref.device)
    scaling = torch.zeros(n_slices, n_adapters, dtype=torch.float32, device=ref.device)
    offsets = [0]
    for s, (path, base) in enumerate(zip(paths, bases)):
        off = offsets[-1]
        for i, persona in enumerate(personas):
            lw = persona.modules.get(path)
            if lw is None:          # persona does not touch this module: a zero term
                continue
            r = lw.a.shape[0]
            lora_a[i, s * rank:s * rank + r] = lw.a.to(ref.dtype)
            lora_b[i, off:off + base.out_features, :r] = lw.b.to(ref.dtype)
            scaling[s, i] = lw.scaling
        offsets.append(off + base.out_features)
    return _Group(lora_a, lora_b, scaling, rank, offsets)


def _before_decoder(routing: _Routing):
    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        b, t = x.shape[0], x.shape[1]
        routing.seq_len, routing.token_ids = t, None
        if routing.in_generate and routing.decided_in_generate:
            return None        # generate(use_cache=False) re-feeds the whole sequence: not a prefill
        if not _is_prefill(_cache_of(kwargs), t):
            return None
        routing.decided_in_generate = bool(routing.in_generate)
        routing.gate_pending = False
        # Whether this prefill's routes are all closed is known on the host (set_routes with
        # CPU ids, or no gate), or learned when it ends; until then it launches (closed tiles
        # exit early).
        routing.all_closed, routing.in_prefill, routing.known_closed = False, True, None
        if routing.fixed is not None:
            n = routing.fixed.shape[0]
            # generate() repeats each prompt for beams / num_return_sequences, contiguously.
            if b != n and not (routing.in_generate and b % n == 0):
                raise ValueError(f"routes: set_routes gave {n} routes but the batch has {b} rows "
                                 f"(expected {b}, or one per prompt inside generate)")
            routing.assign(routing.fixed.to(x.device).repeat_interleave(b // n))
            routing.known_closed = routing.fixed_all_closed
            routing.all_closed = bool(routing.known_closed) and not _tracing()
        elif routing.gate is None:
            routing.assign(torch.full((b,), 0, dtype=torch.int32,   # SPEC: no gate → adapter 0
                                      device=x.device))
            routing.known_closed = False
        else:
            routing.gate_pending = True
            routing.attention_mask = _padding_mask(kwargs.get("attention_mask"), routing, b)
        return None

    return hook


def _padding_mask(mask: torch.Tensor | None, routing: _Routing, b: int) -> torch.Tensor | None:
    """The prefill's 2-D padding mask [B, T]. With a static cache, generate() hands the decoder
    a 4-D mask instead (prepare_inputs_for_generation); then the 2-D one given to generate()
    stands in, repeated for beams / num_return_sequences as generate repeats the prompts."""
    given = routing.generate_mask
    if (mask is None or mask.dim() != 2) and given is not None and b % given.shape[0] == 0:
        return given.repeat_interleave(b // given.shape[0], dim=0)
    return mask


def _after_decoder(routing: _Routing):
    """SPEC §3: the one host sync a prefill may make, after all of its LoRA launches (never
    between the gate and them), to learn whether its decode steps can skip LoRA entirely.
    Traced code never syncs: the flag stays off and every step launches."""

    def hook(module, args, kwargs, output):
        if not routing.in_prefill:
            return None
        routing.in_prefill = False
        if _tracing():
            routing.all_closed = False
        elif routing.known_closed is not None:
            routing.all_closed = routing.known_closed
        else:
            routing.all_closed = not bool((routing.routes >= 0).any())
        return None

    return hook


def _after_layer0(routing: _Routing):
    def hook(module, args, output):
        if not routing.gate_pending:
            return None
        routing.gate_pending = False
        hidden = output if isinstance(output, torch.Tensor) else output[0]   # [B, T, H]
        b, t = hidden.shape[0], hidden.shape[1]
        last = _last_token(routing.attention_mask, b, t, hidden.device)
        routing.attention_mask = None
        h = hidden[torch.arange(b, device=hidden.device), last]              # [B, H]
        w1, b1, w2, b2 = routing.gate
        if routing.triton:
            gate_fn = torch.ops.prism_fast.prism_gate if torch.compiler.is_compiling() \
                else prism_gate_triton
            routes = gate_fn(h.contiguous(), w1, b1, w2, b2)
        else:
            routes = reference.prism_gate(h, w1, b1, w2, b2)
        routing.assign(routes)
        return None

    return hook


def _override_methods(model, root, patch: _Patch) -> None:
    """Instance-level overrides, removed by unpatch_model:
    generate()         marks one prefill per call (use_cache=False re-feeds whole sequences)
                       and lets routes given per prompt cover beams / return sequences;
    PeftModel extras   disable_adapter() and disable/enable_adapter_layers() switch every row
                       to the base model; save_pretrained() saves PEFT's own modules (swapped
                       back for the call); adapter_names=… is refused: use set_routes."""
    routing = patch.routing

    def override(obj, name, fn):
        obj.__dict__[name] = fn
        patch.methods.append((obj, name))

    for obj in dict.fromkeys([model, root]):
        original = obj.generate

        def generate(*args, _original=original, **kwargs):
            _refuse_adapter_names(kwargs)
            routing.in_generate += 1
            if routing.in_generate == 1:
                routing.decided_in_generate = False
                mask = kwargs.get("attention_mask")
                routing.generate_mask = mask if isinstance(mask, torch.Tensor) \
                    and mask.dim() == 2 else None
            try:
                return _original(*args, **kwargs)
            finally:
                routing.in_generate -= 1
                if not routing.in_generate:
                    routing.generate_mask = None

        override(obj, "generate", generate)
    if not _is_peft_model(model):
        return
    patch.hooks.append(model.register_forward_pre_hook(
        lambda module, args, kwargs: _refuse_adapter_names(kwargs), with_kwargs=True))

    @contextlib.contextmanager
    def disable_adapter():
        previous, routing.disabled = routing.disabled, True
        try:
            yield
        finally:
            routing.disabled = previous

    save = model.save_pretrained

    def save_pretrained(*args, **kwargs):
        for parent, attr, original, _ in patch.swaps:
            setattr(parent, attr, original)
        try:
            return save(*args, **kwargs)
        finally:
            for parent, attr, _, ours in patch.swaps:
                setattr(parent, attr, ours)

    override(model, "disable_adapter", disable_adapter)
    override(model, "disable_adapter_layers", lambda: setattr(routing, "disabled", True))
    override(model, "enable_adapter_layers", lambda: setattr(routing, "disabled", False))
    override(model, "save_pretrained", save_pretrained)


def _refuse_adapter_names(kwargs: dict) -> None:
    if kwargs.get("adapter_names") is not None:
        raise ValueError("adapter_names: PEFT's per-row adapter selection is replaced by routes "
                         "on a prism_fast-patched model; use prism_fast.set_routes(model, routes) "
                         "(-1 = base, i = persona i)")


def _patch_of(model) -> _Patch:
    patch = getattr(model, "_prism_patch", None)
    if patch is None:
        raise ValueError("model: expected a model patched by prism_fast.patch_model, got an "
                         "unpatched one")
    return patch


def unpatch_model(model):
    """Restore the original modules (the same objects) and remove the hooks."""
    patch = _patch_of(model)
    for parent, attr, original, _ in reversed(patch.swaps):
        setattr(parent, attr, original)
    for handle in patch.hooks:
        handle.remove()
    for obj, name in patch.methods:
        del obj.__dict__[name]
    del model.__dict__["_prism_patch"]
    return model


def set_routes(model, routes: torch.Tensor | list[int] | None) -> None:
    """Fix routes [B] (−1 = base, 0…L−1 = persona) for the following forwards, also the decode
    steps in flight; None = the gate (or adapter 0 without one) decides again from the next
    prefill. Routes for B prompts also serve B·k rows (generate's beams / return sequences).

    Ids given on the CPU are range-checked here; ids already on the GPU are not (that would
    need a device sync): the kernels treat an id outside −1…L−1 as a closed gate.
    """
    routing = _patch_of(model).routing
    if routes is None:
        routing.fixed, routing.fixed_all_closed = None, None
        return
    if isinstance(routes, (list, tuple)):
        routes = torch.tensor(routes)
    if not isinstance(routes, torch.Tensor):
        raise TypeError(f"routes: expected an integer tensor of shape (B,), got "
                        f"{type(routes).__name__}")
    if routes.dtype.is_floating_point or routes.dtype.is_complex or routes.dtype == torch.bool \
            or routes.dim() != 1 or routes.numel() == 0:
        raise ValueError(f"routes: expected an integer tensor of shape (B,) with B ≥ 1, got "
                         f"{routes.dtype} of shape {tuple(routes.shape)}")
    known_closed = None
    if routes.device.type == "cpu":
        lo, hi = int(routes.min()), int(routes.max())
        if lo < -1 or hi >= routing.n_adapters:
            raise ValueError(f"routes: expected values in -1…{routing.n_adapters - 1}, got values "
                             f"in {lo}…{hi}")
        known_closed = hi < 0
    routes = routes.to(device=routing.device, dtype=torch.int32, copy=True)  # never the caller's
    if routing.fixed is not None and routing.fixed.shape == routes.shape:
        routing.fixed.copy_(routes)      # in place: a captured prefill reads the new values
    else:
        routing.fixed = routes
    routing.fixed_all_closed = known_closed
    if routing.routes is not None and routing.routes.shape == routes.shape:
        routing.assign(routes)           # in place: captured decode steps read the new values
        routing.all_closed = bool(known_closed)


def get_routes(model) -> torch.Tensor | None:
    """Routes (B,) int32 decided at the last prefill (or fixed by set_routes): a copy, on the
    model's device; None before the first prefill."""
    routes = _patch_of(model).routing.routes
    return None if routes is None else routes.clone()
