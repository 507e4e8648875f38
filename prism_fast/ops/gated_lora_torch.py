"""The fast PyTorch path of the gated multi-LoRA linear: what patched models run on CPU (and
wherever `backend="torch"` is chosen). Same contract as the Triton launcher
`kernels/gated_lora.py::gated_lora_linear_triton`; `prism_fast.reference` stays the oracle.

For every slice s (1 to 3 projections that read the same input, e.g. q/k/v or gate/up):

    y_s[i] = F.linear(x[i], W_s, b_s)                                      id[i] ∉ {0…L−1}
    y_s[i] = F.linear(x[i], W_s, b_s) + scaling[s, id] · (x[i] A_s[id]ᵀ) B_s[id]ᵀ   otherwise

    x [..., K]; lora_a [L, S·R, K] (slice s owns rows s·R…s·R+R−1); lora_b [L, ΣN_s, R];
    scaling [S, L]; ids x.shape[:-1] (per token) or [B] for x [B, T, K] (per sequence).

Where the reference computes every adapter densely over every row, this path
  * runs one shrink matmul per adapter for the whole group's stacked A (S·R columns at once),
  * computes it only for the rows (or sequences) that use that adapter, gathered by index,
    and skips closed rows entirely (a batch with every route closed costs only F.linear),
  * folds the scaling into the small fp32 intermediate u [m, S·R] and adds u_s B_sᵀ into y_s
    in place (`addmm_` / `index_add_`).
A decode step repeats the last step's call (every row open on the same adapter, the same rows):
its operands are then kept in a `Lane` that the patched layer calls directly.
That needs the ids on the host: when they are on the CPU (the patched model's routes live on
layer 0's device) and nothing is being traced, they are read there, which costs no device sync.
Under torch.compile / graph capture, or with ids on a GPU, a trace-safe formulation runs
instead: one shrink over every adapter's A, a one-hot mask that zeroes the other adapters (and
closed rows), and `torch.where` so that closed rows still take F.linear's output untouched.

Closed rows are never written: bit-identical to F.linear. The LoRA intermediate is fp32; for
fp16/bf16 the sum y + Δ is formed in fp32 and rounded once, as the reference does.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from prism_fast.kernels.gated_lora import ids_per_sequence
from prism_fast.ops.gated_lora_fused_base import FusedBase
from prism_fast.reference import per_token_ids

# Per-sequence ids of at most this many entries are read as a Python list (≈ 1 µs for 8);
# longer per-token id vectors are grouped with torch.unique instead.
_LIST_IDS = 256


def gated_lora_linear_torch(x: torch.Tensor, weights: list[torch.Tensor],
                            biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                            lora_b: torch.Tensor, scaling: torch.Tensor,
                            adapter_ids: torch.Tensor, prepared: Prepared | None = None
                            ) -> list[torch.Tensor]:
    """Base projections by F.linear + the gated LoRA term; returns [y_s [..., N_s] per slice].

    prepared: the group's `Prepared` over these lora_a, lora_b, scaling (a patched layer's,
    built once); without it the eager path prepares them for this call only."""
    if x.numel() == 0 or lora_a.numel() == 0:
        return [F.linear(x, w, b) for w, b in zip(weights, biases)]
    if adapter_ids.device.type == "cpu" and not tracing(x):
        if prepared is None:
            prepared = Prepared(lora_a, lora_b, scaling, slice_offsets(weights), cache=False)
        return prepared(x, weights, biases, adapter_ids)
    ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]             # S × [..., N_s]
    scaling = scaling.reshape(len(weights), lora_a.shape[0])               # [S, L]
    rank = lora_a.shape[1] // len(weights)
    return _add_masked(ys, x, lora_a, lora_b, scaling, adapter_ids, rank, slice_offsets(weights))


def slice_offsets(weights: list[torch.Tensor]) -> list[int]:
    """Row offsets of each slice in the stacked B: [0, N_0, N_0 + N_1, …]."""
    offsets = [0]
    for w in weights:
        offsets.append(offsets[-1] + w.shape[0])
    return offsets


def tracing(x: torch.Tensor | None = None) -> bool:
    """True under torch.compile or CUDA-graph capture: no syncs and no data-dependent branches
    (routing's hooks use it too). With x on the CPU no capture can record it: one flag read."""
    if torch.compiler.is_compiling():
        return True
    if x is not None and x.device.type == "cpu":
        return False
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# (ids, version, adapters, plan) of the last ids grouped with caching on: the other groups of
# the same forward read the same routes tensor (continuous batching's per-token ids change every
# forward, so each group's own cache misses once per forward; this makes it once per forward).
_last_plan: tuple = (None, -1, 0, [])


def _grouped(ids: torch.Tensor, n_adapters: int) -> list | None:
    """The plan another group of this forward made of these ids (their current version), if
    any. Their version is read only once they are the tensor kept (inference-mode tensors
    have none, and are never kept)."""
    last = _last_plan
    if last[0] is ids and last[1] == ids._version and last[2] == n_adapters:
        return last[3]
    return None


def version_of(ids: torch.Tensor) -> int | None:
    """ids' version counter; None for inference-mode tensors, which carry none."""
    try:
        return ids._version
    except RuntimeError:
        return None


def shared_plan(ids: torch.Tensor, n_adapters: int, version: int | None) -> list:
    """_groups(ids), taken from the last grouping of these ids at this version where there is
    one (another group of this forward, or merge_open's decision), else made and kept."""
    global _last_plan
    plan = None if version is None else _grouped(ids, n_adapters)
    if plan is None:
        plan = _groups(ids, n_adapters)
        if version is not None:
            _last_plan = (ids, version, n_adapters, plan)
    return plan


def _groups(ids: torch.Tensor, n_adapters: int) -> list[tuple[int, torch.Tensor | None]]:
    """[(adapter, indices of its entries or None for "all of them")] for valid ids only."""
    if ids.numel() <= _LIST_IDS:
        values = ids.reshape(-1).tolist()
        present = sorted({v for v in values if 0 <= v < n_adapters})
        if len(present) == 1 and all(v == present[0] for v in values):
            return [(present[0], None)]
        return [(a, torch.tensor([i for i, v in enumerate(values) if v == a]))
                for a in present]
    flat = ids.reshape(-1)
    present = [a for a in torch.unique(flat).tolist() if 0 <= a < n_adapters]
    if len(present) == 1 and bool((flat == present[0]).all()):
        return [(present[0], None)]
    return [(a, (flat == a).nonzero().squeeze(1)) for a in present]


class Prepared:
    """The eager path of one group, its operands prepared once: per adapter, Aᵀ [K, S·R] and
    per slice B_sᵀ [R, N_s] in fp32, the scaling folded into Bᵀ (a copy of B; for fp16/bf16
    adapters an fp32 copy of A too). Then an open group costs one shrink GEMM and, per slice,
    F.linear + one in-place expand (`addmm_`).

    cache=True (a patched layer's routes): the host-side grouping of the ids is kept until the
    ids tensor changes (another tensor, or its version counter moved: routes are written in
    place by copy_), so decode steps read no ids at all; only for tensors the caller cannot
    alter behind torch's back (prism_fast's own routes, which are copies)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                 offsets: list[int], cache: bool = True):
        n_adapters, sr, k = lora_a.shape
        n_slices = len(offsets) - 1
        rank = sr // n_slices
        scale = scaling.reshape(n_slices, n_adapters).T.to(torch.float32)     # [L, S]
        sizes = torch.tensor([hi - lo for lo, hi in zip(offsets, offsets[1:])], device=scale.device)
        a = lora_a.to(torch.float32)                                          # [L, S·R, K]
        b = lora_b.to(torch.float32) * scale.repeat_interleave(sizes, dim=1)[:, :, None]
        self.a_t = [a[i].T for i in range(n_adapters)]                        # L × [K, S·R]
        # Bᵀ contiguous [R, N_s]: the expand at M = 1 then streams rows (≈ 30 % faster here)
        self.b_t = [[b[i, lo:hi].T.contiguous() for lo, hi in zip(offsets, offsets[1:])]
                    for i in range(n_adapters)]                                # L × S × [R, N_s]
        # fp32 bytes held beside the group's own stacked adapters (reported by the benchmark):
        # the scaled Bᵀ, and Aᵀ where the adapters are not fp32 already.
        self.extra_bytes = b.numel() * 4 + (0 if a is lora_a else a.numel() * 4)
        self.k, self.rank, self.n_adapters, self.cache = k, rank, n_adapters, cache
        self.n_slices = n_slices
        self._ids: torch.Tensor | None = None
        self._version = -1
        self._plan: list[tuple[int, torch.Tensor | None]] = []
        self.fused: FusedBase | None = None     # set by the patched layer's Group (fp32 CPU)
        self.lane: Lane | None = None            # the last all-open fp32 call's, kept

    def plan(self, ids: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        """_groups(ids), computed once per routes version where caching is on."""
        version = version_of(ids) if self.cache else None
        if version is not None and ids is self._ids and version == self._version:
            return self._plan
        plan = shared_plan(ids, self.n_adapters, version)
        if version is not None:
            self._ids, self._version, self._plan = ids, version, plan
        return plan

    def __call__(self, x: torch.Tensor, weights: list[torch.Tensor],
                 biases: list[torch.Tensor | None], ids: torch.Tensor) -> list[torch.Tensor]:
        plan = self.plan(ids)
        if len(plan) == 1 and plan[0][1] is None:
            fused = self.fused
            if plan[0][0] == 0 and fused is not None and fused.valid():
                return fused(x, self.b_t[0])          # base + shrink in one GEMM
            if ids is self._ids and x.dtype == torch.float32 and not x.requires_grad:
                self.lane = Lane(self, x, weights, biases, plan[0][0])   # kept for the next
                return self.lane(x)
            return self._uniform(x, weights, biases, plan[0][0])
        ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]             # S × [..., N_s]
        if plan:
            self._gathered(ys, x, plan, ids_per_sequence(x, ids))
        return ys

    def _uniform(self, x, weights, biases, adapter: int) -> list[torch.Tensor]:
        """Every row open on one adapter (PRISM's common case): no gather, no index, no mask."""
        x2 = x.reshape(-1, self.k)                                            # [M, K]
        u = torch.mm(x2.to(torch.float32), self.a_t[adapter])                 # [M, S·R] fp32
        shape = None if x.dim() == 2 else (*x.shape[:-1], -1)
        ys = []
        for w, b, u_s, b_t in zip(weights, biases, self._cut(u, len(weights)),
                                  self.b_t[adapter]):
            y = F.linear(x2, w, b)                                            # [M, N_s]
            if y.dtype == torch.float32:
                y.addmm_(u_s, b_t)                                            # y += u_s B_sᵀ
            else:
                y = y.to(torch.float32).addmm_(u_s, b_t).to(y.dtype)          # one rounding
            ys.append(y if shape is None else y.view(shape))
        return ys

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) start without a lane: a copy of its u and of u's views
        need not share storage, and the next call builds a fresh one anyway."""
        return {**self.__dict__, "lane": None}

    def _cut(self, u: torch.Tensor, n_slices: int) -> list[torch.Tensor]:
        """u [m, S·R] → S × [m, R] views (narrow: the cheapest way to cut, by measurement)."""
        r = self.rank
        return [u] if n_slices == 1 else [u.narrow(1, s * r, r) for s in range(n_slices)]

    def _gathered(self, ys, x, plan, per_sequence: bool) -> None:
        """Per adapter, its rows gathered, one shrink, S expands; closed rows never written."""
        k = self.k
        if per_sequence:                  # gather whole sequences: x as [B, T·K]
            b = x.shape[0]
            rows = x.reshape(b, -1)                                            # [B, T·K]
            outs = [y.view(b, -1, y.shape[-1]) for y in ys]                    # [B, T, N_s]
        else:
            rows = x.reshape(-1, k)                                            # [M, K]
            outs = [y.view(-1, 1, y.shape[-1]) for y in ys]                    # [M, 1, N_s]
        for adapter, index in plan:
            xa = rows if index is None else rows.index_select(0, index)
            u = torch.mm(xa.reshape(-1, k).to(torch.float32), self.a_t[adapter])  # [m, S·R]
            us = self._cut(u, len(ys))
            for y, out, u_s, b_t in zip(ys, outs, us, self.b_t[adapter]):
                if index is None and y.dtype == torch.float32:
                    out.view(-1, y.shape[-1]).addmm_(u_s, b_t)                 # y += u_s B_sᵀ
                    continue
                delta = torch.mm(u_s, b_t).view(-1, out.shape[1], out.shape[2])  # [g, T, N_s]
                if y.dtype == torch.float32:
                    out.index_add_(0, index, delta)
                elif index is None:
                    out.copy_(out.to(torch.float32).add_(delta))               # one rounding
                else:
                    out.index_copy_(0, index, out.index_select(0, index).to(torch.float32)
                                    .add_(delta).to(y.dtype))


def _add_masked(ys, x, lora_a, lora_b, scaling, ids, rank, offsets) -> list[torch.Tensor]:
    """Trace-safe: no data-dependent shape or branch; every row computed, closed rows kept."""
    n_adapters, sr, k = lora_a.shape
    n_slices = len(ys)
    ids = per_token_ids(x, ids).reshape(-1)                                # [M]
    x2 = x.reshape(-1, k).to(torch.float32)                                # [M, K]
    u = x2 @ lora_a.to(torch.float32).view(n_adapters * sr, k).T           # [M, L·S·R]
    select = ids[:, None] == torch.arange(n_adapters, device=ids.device)   # [M, L]
    weight = select.to(torch.float32)[:, :, None] * scaling.T.to(torch.float32)  # [M, L, S]
    u = u.view(-1, n_adapters, n_slices, rank) * weight[..., None]         # [M, L, S, R]
    is_open = select.any(dim=1)[:, None]                                   # [M, 1]
    out = []
    for s, y in enumerate(ys):
        b_s = lora_b[:, offsets[s]:offsets[s + 1]].to(torch.float32)       # [L, N_s, R]
        delta = torch.einsum("mlr,lnr->mn", u[:, :, s], b_s)               # [M, N_s]
        y2 = y.reshape(-1, y.shape[-1])
        out.append(torch.where(is_open, (y2.to(torch.float32) + delta).to(y.dtype), y2)
                   .view(y.shape))
    return out


class Lane:
    """The operands of one all-open fp32 call kept for the next ones (the decode steps): the
    shrink's output u [M, S·R] with its slices paired to the adapter's B_sᵀ, and what they were
    built for. Cutting a fresh u and walking the dispatch costs more per step than the
    adapter's bytes at M = 1 (bench/results/cpu/decode-floor.md). One thread's: two threads
    never share its u."""

    def __init__(self, prepared: Prepared, x: torch.Tensor, weights, biases, adapter: int):
        self.ids, self.version = prepared._ids, prepared._version    # the routes' plan
        self.plan, self.n_adapters = prepared._plan, prepared.n_adapters   # [(adapter, None)]
        self.k, self.thread = prepared.k, threading.get_ident()
        self.rows = x.numel() // self.k
        self.weights, self.biases = tuple(weights), tuple(biases)
        self.a_t = prepared.a_t[adapter]                                    # [K, S·R]
        self.u = torch.empty(self.rows, prepared.n_slices * prepared.rank,
                             dtype=torch.float32, device=x.device)         # [M, S·R]
        self.steps = list(zip(self.weights, self.biases,
                              prepared._cut(self.u, prepared.n_slices), prepared.b_t[adapter]))

    def fits(self, x: torch.Tensor, ids: torch.Tensor) -> bool:
        """The same routes (tensor and version, or ids another group of this forward grouped
        into the same plan: continuous batching's per-token ids are new every forward), thread
        and rows; fp32, no autograd. The caller checks that the weights are still
        `self.weights` and `self.biases`."""
        if (ids is not self.ids or ids._version != self.version) \
                and _grouped(ids, self.n_adapters) != self.plan:
            return False
        return (x.dtype == torch.float32 and not x.requires_grad
                and x.numel() == self.rows * self.k
                and threading.get_ident() == self.thread)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        x2 = x.reshape(self.rows, self.k)                                   # [M, K]
        torch.mm(x2, self.a_t, out=self.u)
        shape = None if x.dim() == 2 else (*x.shape[:-1], -1)
        ys = []
        for w, b, u_s, b_t in self.steps:
            y = F.linear(x2, w, b).addmm_(u_s, b_t)                          # [M, N_s]
            ys.append(y if shape is None else y.view(shape))
        return ys
