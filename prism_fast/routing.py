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

Routing owns every transition of its state: the hooks (routing_hooks.py) call begin / run_gate
/ end; the overrides (overrides.py) enter / leave generate, push / pop a call's routes and
disable the adapters; set_routes fixes or clears routes; batching.py runs flat forwards.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field

import torch

from prism_fast import ops
from prism_fast.ops.gated_lora_torch import tracing
from prism_fast.targets import Given, check_routes


class Phase(enum.Enum):
    NEW = "no prefill yet"
    GATE = "prefill, gate pending after layer 0"
    PREFILL = "prefill, routes decided"
    DECODE = "after a prefill"


@dataclass
class Generation:
    """One patched generate() call; nested calls (generate inside generate) share it."""
    prompts: int | None                  # the batch given to generate(), if known
    mask: torch.Tensor | None            # the 2-D mask given to generate(), if any
    depth: int = 1                       # patched generate() calls open
    decided: bool = False                # its prefill ran (later full forwards are not one)


@dataclass
class Routing:
    """Routes shared by the hooks and every patched projection of one model."""

    n_adapters: int
    triton: bool
    device: torch.device                           # layer 0's: where routes live
    gate: tuple[torch.Tensor, ...] | None          # (w1, b1, w2, b2) in layer 0's dtype/device
    phase: Phase = Phase.NEW
    routes: torch.Tensor | None = None             # [B] int32, updated in place
    # Whether every current route is closed, as the host knows it: True (decode skips LoRA),
    # False, or None (on the device only; a prefill learns it when it ends).
    closed: bool | None = None
    fixed: Given | None = None                     # from set_routes (sticky)
    call: Given | None = None                      # prism_routes= of the current call
    callers: list = field(default_factory=list)    # the enclosing calls' `call`, for pop_call
    generation: Generation | None = None           # the patched generate() running, if any
    attention_mask: torch.Tensor | None = None     # the prefill's 2-D mask, for the gate
    seq_len: int = 1                               # T of the current forward
    token_ids: torch.Tensor | None = None          # routes repeated over T, built on demand
    disabled: bool = False                         # PEFT's disable_adapter(): the base model
    flat: object | None = None                     # continuous batching: this forward's per-token
                                                   # routes (flat_batch.FlatBatch), else None
    merging: object | None = None                  # merge_open: gated_lora_merged.Merging
    merged: int = -1                               # this forward runs on adapter l's merged
                                                   # copies (decided after layer 0), else −1

    # ---- what the patched projections read ---------------------------------------------

    def skip_lora(self) -> bool:
        """No LoRA launch for this forward: adapters disabled, or every route known closed on
        the host. Dynamo guards on `closed`: the all-closed graph holds no LoRA op (its CUDA
        graphs are the base model's), set_routes flips it and the other graph runs. A raw
        CUDA-graph capture cannot be guarded: it keeps its launches (closed tiles exit early),
        so that it stays valid if routes open."""
        return self.disabled or (self.closed is True and not capturing())

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

    # ---- routes a caller gives ---------------------------------------------------------

    def fix_routes(self, routes) -> None:
        """set_routes: the sticky routes, also for the decode steps in flight."""
        given = check_routes(routes, self.n_adapters, self.device)
        if self.fixed is not None and self.fixed.ids.shape == given.ids.shape \
                and writable(self.fixed.ids):
            self.fixed.ids.copy_(given.ids)  # in place: a captured prefill reads the new values
            given = Given(self.fixed.ids, given.closed)
        self.fixed = given
        if self.routes is None:
            return
        # In place where the shape allows (captured decode steps read them); routes of another
        # batch size replace the in-flight ones and their `closed`, which no longer holds.
        self.assign(given.ids)
        self.closed = given.closed

    def clear_routes(self) -> None:
        """set_routes(None): the gate (or adapter 0 without one) decides from the next prefill."""
        self.fixed = None

    def push_call(self, routes=None) -> None:
        """Routes for one call (prism_routes=) over the enclosing ones; None keeps those. The
        enclosing call's are saved before the check, so pop_call balances even if it raises."""
        self.callers.append(self.call)
        if routes is not None:
            self.call = check_routes(routes, self.n_adapters, self.device)

    def pop_call(self) -> None:
        self.call = self.callers.pop()

    def enter_generate(self, routes, prompts: int | None, mask) -> None:
        """A patched generate() starts: its own routes (or None), the batch it was given (its
        prefill is one; later full forwards, use_cache=False, are not) and its 2-D mask."""
        outer = self.generation is None
        if routes is not None:
            routes = check_routes(routes, self.n_adapters, self.device)
        if outer and prompts == 0:
            raise ValueError("input_ids: expected at least one prompt, got a batch of 0 rows")
        self.callers.append(self.call)
        if routes is not None:
            self.call = routes
        if outer:
            self.generation = Generation(prompts, mask if isinstance(mask, torch.Tensor)
                                         and mask.dim() == 2 else None)
        else:
            self.generation.depth += 1

    def leave_generate(self) -> None:
        self.generation.depth -= 1
        if not self.generation.depth:
            self.generation = None
        self.pop_call()

    def disable(self) -> None:       # PEFT's disable_adapter_layers(): the base model
        self.disabled = True

    def enable(self) -> None:        # PEFT's enable_adapter_layers()
        self.disabled = False

    @contextlib.contextmanager
    def adapters_disabled(self):
        """PEFT's `with model.disable_adapter():` every row runs the base model inside."""
        previous, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = previous

    @contextlib.contextmanager
    def flat_forward(self, flat):
        """One forward of the continuous-batching engine: per-token routes from `flat`."""
        saved, self.flat, self.closed = self.closed, flat, flat.all_closed
        try:
            yield
        finally:
            self.flat, self.closed, self.merged = None, saved, -1

    # ---- the three hooks' steps --------------------------------------------------------

    def assign(self, routes: torch.Tensor) -> None:
        """Write routes in place when the batch size allows, so captured graphs see them."""
        self.merged = -1                 # decided again for these routes (decide_merged)
        if self.routes is not None and self.routes.shape == routes.shape \
                and self.routes.device == routes.device and writable(self.routes):
            self.routes.copy_(routes)
        else:
            self.routes = routes.to(torch.int32).clone()

    def begin(self, b: int, t: int, device, prefill: bool, mask: torch.Tensor | None) -> None:
        """Before the decoder: a prefill decides how its routes come (fixed, default or gate)."""
        self.seq_len, self.token_ids = t, None
        generation = self.generation
        if generation is not None and generation.decided:
            return        # generate(use_cache=False) re-feeds the whole sequence: not a prefill
        given = self.call if self.call is not None else self.fixed
        if not prefill:
            if self.call is not None and generation is None:   # model(…, prism_routes=…)
                self._assign_given(given.ids, b, device)
                self._know(given.closed)
            return
        if generation is not None:
            generation.decided = True
        # Whether this prefill's routes are all closed is known on the host (set_routes with
        # CPU ids, or no gate), or learned when it ends; until then it launches (closed tiles
        # exit early).
        self.phase = Phase.PREFILL
        if given is not None:
            self._assign_given(given.ids, b, device)
            self._know(given.closed)
        elif self.gate is None:
            self.assign(torch.full((b,), 0, dtype=torch.int32,    # SPEC: no gate → adapter 0
                                   device=device))
            self._know(False)
        else:
            self.phase = Phase.GATE
            self.closed = None
            self.attention_mask = self._padding_mask(mask, b)

    def _know(self, closed: bool | None) -> None:
        """What the host knows of the routes' closedness; nothing under a raw CUDA-graph
        capture, whose graph is replayed with whatever routes are written in place later."""
        self.closed = None if capturing() else closed

    def _assign_given(self, ids: torch.Tensor, b: int, device) -> None:
        n = ids.shape[0]
        # generate() repeats each prompt for beams / num_return_sequences, contiguously: one
        # route per prompt given to it, repeated for the rows of that prompt.
        generation = self.generation
        prompts = b if generation is None else (generation.prompts or n)
        if n != prompts or b % n:
            source = "set_routes" if self.call is None else "prism_routes"
            given = f"the batch has {b} rows" if generation is None \
                else f"generate() was given {prompts} prompts"
            raise ValueError(f"routes: {source} gave {n} routes but {given} (expected one "
                             f"route per prompt)")
        self.assign(ids.to(device).repeat_interleave(b // n))

    def _padding_mask(self, mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
        """The prefill's 2-D padding mask [B, T]. With a static cache, generate() hands the
        decoder a 4-D mask instead (prepare_inputs_for_generation); then the 2-D one given to
        generate() stands in, repeated for beams / num_return_sequences as generate repeats
        the prompts."""
        given = None if self.generation is None else self.generation.mask
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

    def decide_merged(self, hidden: torch.Tensor) -> None:
        """After layer 0 (and its gate): whether this forward runs on merged copies."""
        self.merged = -1
        if self.merging is None or self.skip_lora() or (self.flat is None and self.routes is None):
            return
        self.merged = self.merging.adapter_for(self.ids_for(hidden), hidden)

    def end(self) -> None:
        """SPEC §3: the one host sync a prefill may make, after all of its LoRA launches (never
        between the gate and them), to learn whether its decode steps can skip LoRA entirely.
        Traced code never syncs: what the host knew already (set_routes with CPU ids) still
        counts (a guard), else it stays unknown and every step launches (closed tiles exit
        early)."""
        self.merged = -1
        if self.phase not in (Phase.GATE, Phase.PREFILL):
            return
        self.phase = Phase.DECODE
        if self.closed is None and not tracing():
            self.closed = not bool((self.routes >= 0).any())


def writable(t: torch.Tensor) -> bool:
    """Whether t may be updated in place here: a tensor made under torch.inference_mode()
    may not be outside it (it is replaced instead, so one inference-mode call never leaves the
    model unusable). Under torch.compile, which cannot trace these checks, in place."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_inference_mode_enabled() or not t.is_inference()


def capturing() -> bool:
    """A raw CUDA-graph capture (torch.cuda.graph), whose graph no guard protects: tracing,
    but not under torch.compile, whose guards re-check host flags."""
    return tracing() and not torch.compiler.is_compiling()


def last_token(mask: torch.Tensor | None, b: int, t: int, device) -> torch.Tensor:
    """Index of each row's last non-pad token (left or right padding) from a 2-D mask."""
    if mask is None or mask.dim() != 2:
        return torch.full((b,), t - 1, dtype=torch.long, device=device)
    m = mask[:, -t:].to(device=device, dtype=torch.int32)
    return t - 1 - m.flip(1).argmax(dim=1)
