"""Gated multi-LoRA, launch: one launcher, one plan cache.

`GatedLoraLauncher(lora_a, lora_b, scaling)` launches the LoRA term of one projection group
whose adapters are fixed (a patched layer's); `add_gated_lora_` makes one for a single call.
Every launch goes through `GatedLoraLauncher.__call__`: the call's layout is looked up in the
one plan cache (`_PLANS`), whose plans hold what shapes, strides and dtypes decide (config,
grids, integer arguments, the buffers' shapes and, on a GPU, the compiled kernels bound for a
direct launch); then the fp32 buffer u and the launches (`_launch`, the one launch path).
"""

from __future__ import annotations

import os

import torch

from ._checks import expect
from .gated_lora_config import FUSED_MAX_ROWS, on_change, pick_config
from .gated_lora_device import (
    ARG_NAMES,
    MAX_SLICES,
    POINTERS,
    STAGE_COOP,
    STAGE_FUSED,
    STAGE_SHRINK,
    _gated_lora_kernel,
    interpreted,
)

MAX_PLANS = 4096   # distinct layouts kept (prefill lengths vary without bound); then afresh
# PRISM_FAST_DIRECT_LAUNCH=0 keeps every launch on Triton's own `kernel[grid]` path: the direct
# launch mirrors Triton 3.6 / 3.9 internals, so a Triton that changes them can be run (slower
# on the host) without waiting for a fix. bench/bench_host.py switches it off to compare.
DIRECT_LAUNCH = os.environ.get("PRISM_FAST_DIRECT_LAUNCH", "1") != "0"


class _StagePlan:
    """One launch of a plan: its grid and every non-pointer argument, fixed by the plan's key."""

    __slots__ = ("grid", "kwargs", "tail")

    def __init__(self, grid: tuple[int, int], kwargs: dict):
        self.grid, self.kwargs = grid, kwargs
        self.tail = tuple(kwargs[n] for n in ARG_NAMES[len(POINTERS):])   # kernel's order


class _Plan:
    """Everything a call's layout decides, resolved once: its stages, the shape of u, COOP's
    counters, whether x or the ids need a copy to be read densely, and every stage's compiled
    kernel by (current device, pointer alignment), bound for a direct launch."""

    __slots__ = ("stages", "u_shape", "ctr", "decode", "copy_x", "copy_ids", "aligned", "direct")

    def __init__(self, stages: list[_StagePlan], u_shape: tuple | None,
                 ctr: torch.Tensor | None):
        self.stages, self.u_shape, self.ctr = stages, u_shape, ctr
        self.decode = False
        self.copy_x = self.copy_ids = False
        self.aligned = 0   # the alignment bit of COOP's counters (_aligned)
        self.direct: dict = {}


_PLANS: dict[tuple, _Plan] = {}
on_change(_PLANS.clear)   # a tuned table changed: plans hold the configs it decided
_COUNTERS: dict[tuple, torch.Tensor] = {}   # COOP's barrier counters, zero between launches
_direct: list = []   # [get_current_device, get_current_stream, knobs.runtime] once resolved


def _make_plan(m: int, t: int, seq_ids: bool, x2: torch.Tensor, lora_a: torch.Tensor,
               lora_b: torch.Tensor, y2: list[torch.Tensor], config: dict | None) -> _Plan:
    """The stages of one call: x2 [M, K] as the kernel reads it, y2 S × [M, N_s]."""
    k = x2.shape[1]
    ns = [y.shape[1] for y in y2]
    n_adapters, sr, _ = lora_a.shape
    r = sr // len(ns)
    cfg = config or pick_config(m, k, tuple(ns), r, x2.device)
    if config is not None and STAGE_FUSED in config["stages"]:
        expect(config[STAGE_FUSED]["BLOCK_R"] >= r, ValueError,
               lambda: f"config: the fused stage needs BLOCK_R ≥ rank {r}, got "
               f"{config[STAGE_FUSED]['BLOCK_R']}")
    strides_y = [y.stride(0) for y in y2]
    while len(ns) < MAX_SLICES:
        ns.append(0)
        strides_y.append(strides_y[0])
    split_k = cfg["SPLIT_K"]
    n_rows = m // t if seq_ids else m
    stages = []
    for stage in cfg["stages"]:
        blocks = cfg[stage]
        bm = blocks["BLOCK_M"]
        grid_m = n_rows * -(-t // bm) if seq_ids else -(-m // bm)
        if stage == STAGE_SHRINK:
            grid_n = -(-sr // blocks["BLOCK_R"]) * split_k
        else:   # one program per (slice, N tile)
            bn = blocks["BLOCK_N"]
            grid_n = -(-ns[0] // bn) - (-ns[1] // bn) - (-ns[2] // bn)
            if stage == STAGE_COOP:   # and at least one per shrink unit
                grid_n = max(grid_n, -(-sr // blocks["BLOCK_R"]) * split_k)
        kwargs = dict(
            M=m, K=k, T=t, L=n_adapters, R=r, N0=ns[0], N1=ns[1], N2=ns[2],
            stride_xm=x2.stride(0), stride_xk=x2.stride(1),
            stride_al=lora_a.stride(0), stride_ar=lora_a.stride(1), stride_ak=lora_a.stride(2),
            stride_bl=lora_b.stride(0), stride_bn=lora_b.stride(1), stride_br=lora_b.stride(2),
            stride_y0=strides_y[0], stride_y1=strides_y[1], stride_y2=strides_y[2],
            stride_um=sr, stride_uk=m * sr, STAGE=stage, SEQ_IDS=seq_ids,
            NUM_SLICES=len(y2), SPLIT_K=split_k, PHASE=0, **blocks)
        stages.append(_StagePlan((grid_m, grid_n), kwargs))
    coop = STAGE_COOP in cfg["stages"]
    if coop and interpreted():   # no barrier under the interpreter: its two halves in turn
        kwargs = stages[0].kwargs
        stages = [_StagePlan(stages[0].grid, {**kwargs, "PHASE": 1}),
                  _StagePlan(stages[0].grid, {**kwargs, "PHASE": 2})]
    needs_u = coop or STAGE_SHRINK in cfg["stages"]
    ctr = _counters(2 * stages[0].grid[0], x2.device) if coop else None
    return _Plan(stages, (split_k, m, sr) if needs_u else None, ctr)


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 barrier counters (2 per row of the grid), shared by launches on `device`:
    stream order keeps two cooperative launches from overlapping, and each resets its own.
    Allocated (and zeroed) at the first call of a shape, which must be eager, before any
    CUDA-graph capture of it, as the warm-up every graph needs is."""
    key = (device, n)
    ctr = _COUNTERS.get(key)
    if ctr is None:
        ctr = _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return ctr


def _aligned(t: torch.Tensor, slot: int) -> int:
    """The bit of pointer `slot` (0…9, the kernel's order) in an alignment mask: whether Triton
    would specialise it as 16-byte aligned."""
    return (t.data_ptr() & 15 == 0) << (len(POINTERS) - 1 - slot)


def _launch(plan: _Plan, ptrs: tuple, aligned: int) -> None:
    """Launch a plan's stages. On a GPU, the compiled kernels found by Triton's own
    `kernel[grid]` path the first time are launched directly afterwards (Triton 3.6 and 3.9
    expose the same `CompiledKernel.run(gx, gy, gz, stream, function, packed_metadata,
    launch_metadata, enter_hook, exit_hook, *args)` and pass it the same arguments), skipping
    the binder, specialisation and cache key (≈ 17 µs of host time per launch with this
    kernel's 35 arguments). A compiled kernel depends on what Triton specialises on: every
    integer argument (fixed by the plan's key), the dtypes (in the key) and whether each
    pointer is 16-byte aligned (`aligned`), so it is bound by those and the current device.
    Triton's path is kept wherever it does more: the interpreter, launch hooks (profilers;
    Triton 3.6 and 3.9 hold them in HookChains whose empty `calls` the launcher would call for
    nothing, while a None hook it skips), pre-run hooks."""
    if _direct:
        get_device, get_stream, runtime = _direct
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        # A hook that does something: a HookChain with calls, or any other callable.
        if (enter is None or not getattr(enter, "calls", True)) \
                and (leave is None or not getattr(leave, "calls", True)) \
                and not _gated_lora_kernel.pre_run_hooks:
            device = get_device()
            launches = plan.direct.get((device, aligned))
            if launches is not None:
                stream = get_stream(device)
                for run, gx, gy, function, metadata, tail in launches:
                    run(gx, gy, 1, stream, function, metadata, None, None, None, *ptrs, *tail)
                return
            kernels = [_gated_lora_kernel[stage.grid](*ptrs, **stage.kwargs)
                       for stage in plan.stages]
            if all(all(hasattr(k, a) for a in ("function", "packed_metadata", "run"))
                   for k in kernels):
                plan.direct[(device, aligned)] = [
                    (k.run, *stage.grid, k.function, k.packed_metadata, stage.tail)
                    for k, stage in zip(kernels, plan.stages)]
            return
    for stage in plan.stages:
        _gated_lora_kernel[stage.grid](*ptrs, **stage.kwargs)
    if not _direct and DIRECT_LAUNCH and not interpreted():
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        _direct.extend([active.get_current_device, active.get_current_stream, knobs.runtime])


def _frozen(value):
    """A config as a hashable plan-key part."""
    if isinstance(value, dict):
        return tuple(sorted((repr(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


class GatedLoraLauncher:
    """The launcher of one projection group: `launcher(ys, x, ids, seq_ids)` adds the LoRA term
    into the base outputs `ys` in place. lora_a [L, S·R, K], lora_b [L, ΣN_s, R], scaling
    [S, L] fp32 contiguous; ys S × [..., N_s] viewable as [M, N_s]; x [..., K]; ids [B]
    (seq_ids, x = [B, T, K]) or x.shape[:-1]. Arguments are assumed checked. `config`
    (pick_config's format) forces a path and block sizes (tests, tuners).

    A `group` launcher (a patched layer's, the default) is called with its group's F.linear
    outputs every time: contiguous ys of the same widths (its first call's), which its plan
    key therefore leaves out (every line of a call counts on the host: bench/bench_host.py),
    and its decode-sized plans (M ≤ 64) keep their fp32 buffer u (≤ 200 KB) instead of
    allocating it per call: calls run in stream order, so one call's expand has read u before
    the next call's shrink writes it (one stream at a time per patched layer, as a model's
    forward runs). Otherwise (`add_gated_lora_`) ys may be any viewable layout, keyed per
    call, and u is allocated per call."""

    __slots__ = ("lora_a", "lora_b", "scaling", "config", "group", "fixed", "aligned", "kept",
                 "__weakref__")

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                 config: dict | None = None, group: bool = True):
        self.lora_a, self.lora_b, self.scaling = lora_a, lora_b, scaling
        self.config, self.group = config, group
        self.fixed = (lora_a.device, lora_a.shape, lora_a.stride(), lora_a.dtype, lora_b.shape,
                      lora_b.stride(), lora_b.dtype, scaling.dtype, _frozen(config))
        self.aligned = _aligned(lora_a, 1) | _aligned(lora_b, 2) | _aligned(scaling, 3)
        self.kept: dict[tuple, torch.Tensor] = {}   # u by shape, for a group

    def __reduce__(self):
        """A copy or a pickle keeps the adapters, not the buffers of this process."""
        return GatedLoraLauncher, (self.lora_a, self.lora_b, self.scaling, self.config,
                                   self.group)

    def __call__(self, ys: list[torch.Tensor], x: torch.Tensor, ids: torch.Tensor,
                 seq_ids: bool) -> None:
        n_ys = len(ys)
        y0 = ys[0]
        y1 = ys[1] if n_ys > 1 else y0
        y2 = ys[2] if n_ys > 2 else y0
        if self.group:
            if len(self.fixed) == 9:   # a group's first call: its widths join its fixed layout
                self.fixed = (*self.fixed, tuple(y.shape[-1] for y in ys))
            key = (self.fixed, x.shape, x.stride(), x.dtype, ids.shape, ids.stride(),
                   ids.dtype, seq_ids, n_ys)
        else:
            key = (self.fixed, x.shape, x.stride(), x.dtype, ids.shape, ids.stride(),
                   ids.dtype, seq_ids, n_ys, y0.shape, y0.stride(), y1.shape, y1.stride(),
                   y2.shape, y2.stride())
        plan = _PLANS.get(key)
        if plan is None:
            if len(_PLANS) >= MAX_PLANS:
                _PLANS.clear()
            plan = _PLANS[key] = self._plan(ys, x, ids, seq_ids)
        if not plan.stages:
            return
        if plan.copy_x:
            x = x.reshape(-1, x.shape[-1])        # [M, K]: the kernel reads x as a matrix
        if plan.copy_ids:
            ids = ids.reshape(-1).contiguous()    # the kernel indexes ids densely
        scaling = u = self.scaling   # u: a placeholder pointer where no stage reads it
        if plan.u_shape is not None:
            u = self.kept.get(plan.u_shape) if plan.decode and self.group else None
            if u is None:
                u = torch.empty(plan.u_shape, dtype=torch.float32, device=x.device)  # [SK, M, SR]
                if plan.decode and self.group:
                    self.kept[plan.u_shape] = u
        # One bit per pointer (x, a, b, scaling, ids, u, y0, y1, y2, ctr → bits 9…0): whether
        # Triton specialises it as 16-byte aligned; a, b, scaling's and ctr's are fixed.
        aligned = (self.aligned | plan.aligned | (x.data_ptr() & 15 == 0) << 9
                   | (ids.data_ptr() & 15 == 0) << 5 | (u.data_ptr() & 15 == 0) << 4
                   | (y0.data_ptr() & 15 == 0) << 3 | (y1.data_ptr() & 15 == 0) << 2
                   | (y2.data_ptr() & 15 == 0) << 1)
        _launch(plan, (x, self.lora_a, self.lora_b, scaling, ids, u, y0, y1, y2,
                       plan.ctr if plan.ctr is not None else scaling), aligned)

    def _plan(self, ys: list[torch.Tensor], x: torch.Tensor, ids: torch.Tensor,
              seq_ids: bool) -> _Plan:
        """The plan of this call's layout, with x as the kernel reads it ([M, K], a view of x
        where possible, else a copy the call makes again)."""
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        if m == 0:
            return _Plan([], None, None)
        ids2 = ids if ids.dim() == 1 and ids.is_contiguous() else ids.reshape(-1).contiguous()
        t = x.shape[1] if seq_ids else 1
        if seq_ids and t == 1:
            seq_ids = False  # decode: one row per sequence, so per-row tiles pack them densely
        y2 = [y if y.dim() == 2 else y.view(-1, y.shape[-1]) for y in ys]   # [M, N_s]
        plan = _make_plan(m, t, seq_ids, x2, self.lora_a, self.lora_b, y2, self.config)
        plan.decode = m <= FUSED_MAX_ROWS
        plan.copy_x = x2.data_ptr() != x.data_ptr()
        plan.copy_ids = ids2.data_ptr() != ids.data_ptr()
        # Without counters ctr's slot holds scaling, whose own bit already tells its alignment.
        plan.aligned = _aligned(plan.ctr, 9) if plan.ctr is not None else 0
        return plan


def add_gated_lora_(ys: list[torch.Tensor], x: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scaling: torch.Tensor, adapter_ids: torch.Tensor,
                    seq_ids: bool, config: dict | None = None) -> None:
    """Add the gated LoRA term into the base outputs `ys` (each [..., N_s]) in place, through
    a launcher made for this call (see GatedLoraLauncher; u is allocated per call)."""
    GatedLoraLauncher(lora_a, lora_b, scaling, config, group=False)(ys, x, adapter_ids, seq_ids)
