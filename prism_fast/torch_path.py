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
    in place (`addmm_` / `index_add_`), so the only allocations are u and, for gathered rows,
    the gathered x and the expand's output.
That needs the ids on the host: when they are on the CPU (the patched model's routes live on
layer 0's device) and nothing is being traced, they are read there, which costs no device sync.
Under torch.compile / graph capture, or with ids on a GPU, a trace-safe formulation runs
instead: one shrink over every adapter's A, a one-hot mask that zeroes the other adapters (and
closed rows), and `torch.where` so that closed rows still take F.linear's output untouched.

Closed rows are never written: bit-identical to F.linear. The LoRA intermediate is fp32; for
fp16/bf16 the sum y + Δ is formed in fp32 and rounded once, as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_fast.kernels.gated_lora import ids_per_sequence
from prism_fast.reference import per_token_ids

# Per-sequence ids of at most this many entries are read as a Python list (≈ 1 µs for 8);
# longer per-token id vectors are grouped with torch.unique instead.
_LIST_IDS = 256


def gated_lora_linear_torch(x: torch.Tensor, weights: list[torch.Tensor],
                            biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                            lora_b: torch.Tensor, scaling: torch.Tensor,
                            adapter_ids: torch.Tensor) -> list[torch.Tensor]:
    """Base projections by F.linear + the gated LoRA term; returns [y_s [..., N_s] per slice]."""
    ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]            # S × [..., N_s]
    n_slices = len(weights)
    n_adapters = lora_a.shape[0]
    rank = lora_a.shape[1] // n_slices
    scaling = scaling.reshape(n_slices, n_adapters)                       # [S, L]
    offsets = [0]
    for w in weights:
        offsets.append(offsets[-1] + w.shape[0])
    if x.numel() == 0 or lora_a.numel() == 0:
        return ys
    if adapter_ids.device.type == "cpu" and not tracing():
        _add_gathered(ys, x, lora_a, lora_b, scaling, adapter_ids,
                      ids_per_sequence(x, adapter_ids), rank, offsets)
        return ys
    return _add_masked(ys, x, lora_a, lora_b, scaling, adapter_ids, rank, offsets)


def tracing() -> bool:
    """True under torch.compile or CUDA-graph capture: no syncs and no data-dependent branches
    (routing's hooks use it too)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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


def _add_gathered(ys, x, lora_a, lora_b, scaling, ids, per_sequence, rank, offsets) -> None:
    """Eager, ids on the host: per adapter, its rows gathered, one shrink, S expands, in place."""
    k = x.shape[-1]
    n_slices = len(ys)
    if per_sequence:                      # gather whole sequences: x as [B, T·K]
        b = x.shape[0]
        rows = x.reshape(b, -1)                                            # [B, T·K]
        outs = [y.view(b, -1, y.shape[-1]) for y in ys]                    # [B, T, N_s]
    else:
        rows = x.reshape(-1, k)                                            # [M, K]
        outs = [y.view(-1, 1, y.shape[-1]) for y in ys]                    # [M, 1, N_s]
    for adapter, index in _groups(ids, lora_a.shape[0]):
        xa = rows if index is None else rows.index_select(0, index)
        xa = xa.reshape(-1, k).to(torch.float32)                           # [m, K] (no copy fp32)
        a = lora_a[adapter].to(torch.float32)                              # [S·R, K]
        u = xa @ a.T                                                       # [m, S·R] fp32
        u.view(-1, n_slices, rank).mul_(scaling[:, adapter].view(n_slices, 1))
        for s, (y, out) in enumerate(zip(ys, outs)):
            u_s = u[:, s * rank:(s + 1) * rank]                            # [m, R]
            b_s = lora_b[adapter, offsets[s]:offsets[s + 1]].to(torch.float32)  # [N_s, R]
            if index is None and y.dtype == torch.float32:
                out.view(-1, y.shape[-1]).addmm_(u_s, b_s.T)               # y += u_s B_sᵀ
                continue
            delta = (u_s @ b_s.T).view(-1, out.shape[1], out.shape[2])     # [g, T, N_s]
            if y.dtype == torch.float32:
                out.index_add_(0, index, delta)
            elif index is None:
                out.copy_(out.to(torch.float32).add_(delta))               # one rounding
            else:
                out.index_copy_(0, index, out.index_select(0, index).to(torch.float32)
                                .add_(delta).to(y.dtype))


def _add_masked(ys, x, lora_a, lora_b, scaling, ids, rank, offsets):
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
