"""Routing state of one patched model: routes decided once per prefill, read by every layer.

Layer 0 carries no LoRA, so its output (the gate input) is the same with the adapter on or
off. A forward hook on layer 0 evaluates the gate on each row's last non-pad prompt token and
writes the routes into a device tensor in place; the patched projections of layers 1…N−1 read
that tensor in the same forward. Decode steps reuse the routes of their prefill.

    routes [B] int32 (device)  ─┐
    layer 0 ─► hook: gate(h[b, last_b]) ─► routes.copy_()  (prefill only)
    layer i ≥ 1: GatedLoraLinear(x [B, T, K]) = F.linear + gated LoRA (one launch per group)

A forward moves the phase NEW/DECODE ─(decoder pre-hook, prefill)─► GATE (a gate will run
after layer 0) or PREFILL (routes fixed or default) ─(layer-0 hook)─► PREFILL ─(decoder
hook)─► DECODE; decode forwards leave it at DECODE.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch

from prism_fast import ops
from prism_fast.torch_path import tracing


class Phase(enum.Enum):
    NEW = "no prefill yet"
    GATE = "prefill, gate pending after layer 0"
    PREFILL = "prefill, routes decided"
    DECODE = "after a prefill"


@dataclass
class Routing:
    """Routes shared by the hooks and every patched projection of one model."""

    n_adapters: int
    triton: bool
    device: torch.device                           # layer 0's: where routes live
    gate: tuple[torch.Tensor, ...] | None          # (w1, b1, w2, b2) in layer 0's dtype/device
    phase: Phase = Phase.NEW
    routes: torch.Tensor | None = None             # [B] int32, updated in place
    fixed: torch.Tensor | None = None              # [B] from set_routes (sticky)
    fixed_all_closed: bool | None = None           # known on the host when set_routes had CPU ids
    call: tuple[torch.Tensor, bool | None] | None = None   # prism_routes= of the current call
    all_closed: bool = False                       # every route closed: decode skips LoRA
    known_closed: bool | None = None               # this prefill's all_closed, if host-known
    attention_mask: torch.Tensor | None = None     # the prefill's 2-D mask, for the gate
    generate_mask: torch.Tensor | None = None      # the 2-D mask given to generate(), if any
    seq_len: int = 1                               # T of the current forward
    token_ids: torch.Tensor | None = None          # routes repeated over T, built on demand
    in_generate: int = 0                           # depth of patched generate() calls
    prompts: int | None = None                     # the batch given to generate(), if known
    decided_in_generate: bool = False              # this generate() already had its prefill
    disabled: bool = False                         # PEFT's disable_adapter(): the base model
    flat: object | None = None                     # continuous batching: this forward's per-token
                                                   # routes (flat_batch.FlatBatch), else None

    def assign(self, routes: torch.Tensor) -> None:
        """Write routes in place when the batch size allows, so captured graphs see them."""
        if self.routes is not None and self.routes.shape == routes.shape \
                and self.routes.device == routes.device and writable(self.routes):
            self.routes.copy_(routes)
        else:
            self.routes = routes.to(torch.int32).clone()

    def skip_lora(self) -> bool:
        """No LoRA launch for this forward: adapters disabled, or every route known closed on
        the host. Under torch.compile the flag is read while tracing, so Dynamo guards on it:
        one graph per value, the all-closed one (a decode step after an all-closed prefill, or
        after set_routes with closed CPU ids) without any LoRA op, so that CUDA graphs of it
        (mode="reduce-overhead") are the base model's; set_routes flips the flag and the other
        graph runs (compiled once per value). A raw CUDA-graph capture cannot be guarded: it
        keeps its launches (closed tiles exit early), so that it stays valid if routes open."""
        return self.disabled or (self.all_closed and not capturing())

    def ids_for(self, x: torch.Tensor) -> torch.Tensor:
        """Routes [B] for x [B, T, K]; per-token ids [B·T] for x [B·T, K] (MoE blocks flatten)."""
        if self.flat is not None:
            return self.flat.ids(x)
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

    def check_routes(self, routes) -> tuple[torch.Tensor, bool | None]:
        """routes (tensor or list) → ([B] int32 copy on the routes' device, all closed if known).

        Ids given on the CPU are range-checked here; ids already on the GPU are not (that would
        need a device sync): the kernels treat an id outside −1…L−1 as a closed gate.
        """
        if isinstance(routes, (list, tuple)):
            routes = torch.tensor(routes)
        if not isinstance(routes, torch.Tensor):
            raise TypeError(f"routes: expected an integer tensor of shape (B,), got "
                            f"{type(routes).__name__}")
        if routes.dtype.is_floating_point or routes.dtype.is_complex \
                or routes.dtype == torch.bool or routes.dim() != 1 or routes.numel() == 0:
            raise ValueError(f"routes: expected an integer tensor of shape (B,) with B ≥ 1, got "
                             f"{routes.dtype} of shape {tuple(routes.shape)}")
        if routes.device.type == "meta":
            raise ValueError("routes: expected ids with values (on the CPU or the model's "
                             "device), got a tensor on the meta device, which holds none")
        known_closed = None
        if routes.device.type == "cpu":
            lo, hi = int(routes.min()), int(routes.max())
            if lo < -1 or hi >= self.n_adapters:
                raise ValueError(f"routes: expected values in -1…{self.n_adapters - 1}, got "
                                 f"values in {lo}…{hi}")
            known_closed = hi < 0
        # Never the caller's tensor.
        return routes.to(device=self.device, dtype=torch.int32, copy=True), known_closed

    def fix(self, routes, known_closed: bool | None) -> None:
        """set_routes: the sticky routes, also for the decode steps in flight."""
        if self.fixed is not None and self.fixed.shape == routes.shape and writable(self.fixed):
            self.fixed.copy_(routes)     # in place: a captured prefill reads the new values
        else:
            self.fixed = routes
        self.fixed_all_closed = known_closed
        if self.routes is not None and self.routes.shape == routes.shape:
            self.assign(routes)          # in place: captured decode steps read the new values
            self.all_closed = bool(known_closed)

    # ---- the three hooks' steps ----------------------------------------------------------

    def begin(self, b: int, t: int, device, prefill: bool, mask: torch.Tensor | None) -> None:
        """Before the decoder: a prefill decides how its routes come (fixed, default or gate)."""
        self.seq_len, self.token_ids = t, None
        if self.in_generate and self.decided_in_generate:
            return        # generate(use_cache=False) re-feeds the whole sequence: not a prefill
        fixed, fixed_closed = self.call if self.call is not None \
            else (self.fixed, self.fixed_all_closed)
        if not prefill:
            if self.call is not None and not self.in_generate:   # model(…, prism_routes=…)
                self._assign_fixed(fixed, b, device)
                self.all_closed = bool(fixed_closed) and not capturing()
            return
        self.decided_in_generate = bool(self.in_generate)
        # Whether this prefill's routes are all closed is known on the host (set_routes with
        # CPU ids, or no gate), or learned when it ends; until then it launches (closed tiles
        # exit early).
        self.all_closed, self.known_closed = False, None
        self.phase = Phase.PREFILL
        if fixed is not None:
            self._assign_fixed(fixed, b, device)
            self.known_closed = fixed_closed
            self.all_closed = bool(self.known_closed) and not capturing()
        elif self.gate is None:
            self.assign(torch.full((b,), 0, dtype=torch.int32,    # SPEC: no gate → adapter 0
                                   device=device))
            self.known_closed = False
        else:
            self.phase = Phase.GATE
            self.attention_mask = self._padding_mask(mask, b)

    def _assign_fixed(self, fixed: torch.Tensor, b: int, device) -> None:
        n = fixed.shape[0]
        # generate() repeats each prompt for beams / num_return_sequences, contiguously: one
        # route per prompt given to it, repeated for the rows of that prompt.
        prompts = (self.prompts or n) if self.in_generate else b
        if n != prompts or b % n:
            source = "set_routes" if self.call is None else "prism_routes"
            given = f"generate() was given {prompts} prompts" if self.in_generate \
                else f"the batch has {b} rows"
            raise ValueError(f"routes: {source} gave {n} routes but {given} (expected one "
                             f"route per prompt)")
        self.assign(fixed.to(device).repeat_interleave(b // n))

    def _padding_mask(self, mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
        """The prefill's 2-D padding mask [B, T]. With a static cache, generate() hands the
        decoder a 4-D mask instead (prepare_inputs_for_generation); then the 2-D one given to
        generate() stands in, repeated for beams / num_return_sequences as generate repeats
        the prompts."""
        given = self.generate_mask
        if (mask is None or mask.dim() != 2) and given is not None and b % given.shape[0] == 0:
            return given.repeat_interleave(b // given.shape[0], dim=0)
        return mask

    def run_gate(self, hidden: torch.Tensor) -> None:
        """After layer 0 of a prefill with a gate: routes from each row's last prompt token."""
        if self.phase is not Phase.GATE:
            return
        self.phase = Phase.PREFILL
        b, t = hidden.shape[0], hidden.shape[1]                              # [B, T, H]
        last = last_token(self.attention_mask, b, t, hidden.device)
        self.attention_mask = None
        h = hidden[torch.arange(b, device=hidden.device), last]              # [B, H]
        self.assign(ops.gate_routes(h, *self.gate, triton=self.triton))

    def end(self) -> None:
        """SPEC §3: the one host sync a prefill may make, after all of its LoRA launches (never
        between the gate and them), to learn whether its decode steps can skip LoRA entirely.
        Traced code never syncs: the flag is set only where the host knew it already (set_routes
        with CPU ids), else it stays off and every step launches (closed tiles exit early)."""
        if self.phase not in (Phase.GATE, Phase.PREFILL):
            return
        self.phase = Phase.DECODE
        if tracing():   # no sync; what the host knows already still counts (a guard)
            self.all_closed = bool(self.known_closed) and not capturing()
        elif self.known_closed is not None:
            self.all_closed = self.known_closed
        else:
            self.all_closed = not bool((self.routes >= 0).any())


def writable(t: torch.Tensor) -> bool:
    """Whether t may be updated in place here: a tensor made under torch.inference_mode()
    may not be outside it (it is replaced instead, so one inference-mode call never leaves the
    model unusable). Under torch.compile, which cannot trace these checks, in place."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_inference_mode_enabled() or not t.is_inference()


def capturing() -> bool:
    """A raw CUDA-graph capture (torch.cuda.graph), whose graph no guard protects; under
    torch.compile, whose guards re-check host flags, False."""
    if torch.compiler.is_compiling():
        return False
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def last_token(mask: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    """Index of each row's last non-pad token (left or right padding) from a 2-D mask."""
    if mask is None or mask.dim() != 2:
        return torch.full((b,), t - 1, dtype=torch.long, device=device)
    m = mask[:, -t:].to(device=device, dtype=torch.int32)
    return t - 1 - m.flip(1).argmax(dim=1)


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
