"""Gated multi-LoRA linear: the base projection plus a per-row persona adapter.

For every output slice s (1 to 3 projections that read the same input, e.g. q/k/v or gate/up):

    y_s[i] = x[i] W_sᵀ (+ b_s)                                         id[i] ∉ {0…L−1}
    y_s[i] = x[i] W_sᵀ (+ b_s) + scaling[s, id] · (x[i] A_s[id]ᵀ) B_s[id]ᵀ  id[i] ∈ {0…L−1}

Shapes, with M = rows of x after flattening its leading dimensions:
    x        [M, K]          any strides
    W_s      [N_s, K], b_s [N_s] or None
    lora_a   [L, S·R, K]     slice s owns rows s·R … s·R+R−1 (an adapter of rank r < R is zero-padded)
    lora_b   [L, ΣN_s, R]    slice s owns rows N_0+…+N_{s−1} … (+N_s)
    scaling  [S, L] float32
    ids      [M] (one per row) or [B] with x = [B, T, K] (one per sequence);
             −1 is a closed gate, and so is any id outside 0…L−1 (memory safety: never indexed).

The base is `F.linear`, the very computation the unpatched layer does, so a closed row is
bit-identical to it: the kernels never store into closed rows. The LoRA term is added in place:

    u = x A[id]ᵀ       (shrink, fp32 accumulation, the [M, S·R] intermediate stays fp32)
    y += s · u B[id]ᵀ  (expand; for fp16/bf16, u is split into hi + lo halves so that two
                        tensor-core dots keep ≈16 mantissa bits of u, never one rounding to 8)

Paths, one kernel body (`STAGE`), chosen per call by `pick_config` (gated_lora_config.py):
  * SPLIT, the default (decode and prefill): SHRINK over every slice of the group, then EXPAND.
    The shrink splits K across programs when the grid is small, each split writing its own
    fp32 partial [SPLIT_K, M, S·R] that the expand sums (no memset, no atomics). With one id
    per sequence, row tiles never straddle sequences, so a tile has one adapter and a closed
    sequence costs its tiles an early exit. Why it is the decode default: see gated_lora_config.py.
  * FUSED, one launch, selectable at decode (≤ 64 rows): each program owns one N tile of one
    slice, computes its rows' shrink for that slice, then expands it.
  * COOP, one launch, experimental (decode, a table or prism_fast.tune's choice only; no GPU
    evidence yet): SHRINK's units spread over EXPAND's grid, a grid barrier, then EXPAND; run
    as two launches (PHASE 1, 2) under the interpreter, where programs run one after another.
Tiles whose rows are all closed return before loading x, A or B. A tile with several adapters
(per-token ids) loops over the distinct ids it holds.

This module is the entry: the argument checks, `gated_lora_linear_triton` and the
`torch.library` op. The rest, one idea a file: gated_lora_device.py (the kernel),
gated_lora_config.py (heuristics, tuned tables, the decode-path choice), gated_lora_launch.py
(the launcher and its plan cache); their public names are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_input, check_range, check_tensor, expect
from .gated_lora_config import (  # noqa: F401  (re-exported)
    FUSED_MAX_A_ELEMS,
    FUSED_MAX_ROWS,
    PATHS,
    choice_key,
    config_for,
    config_path,
    decode_path,
    device_key,
    pick_config,
    reload,
    tuned_table,
    use_choices,
    user_cache_dir,
)
from .gated_lora_device import (  # noqa: F401  (re-exported)
    MAX_SLICES,
    STAGE_COOP,
    STAGE_EXPAND,
    STAGE_FUSED,
    STAGE_SHRINK,
    _gated_lora_kernel,
    interpreted,
)
from .gated_lora_launch import (  # noqa: F401  (re-exported)
    GatedLoraLauncher,
    _direct,
    _make_plan,
    add_gated_lora_,
)

MAX_ADAPTERS = 64
MAX_RANK = 128

# ----------------------------------------------------------------------------------------------
# checks (shared with the PyTorch backend, so both raise the same errors)
# ----------------------------------------------------------------------------------------------

_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)  # signed: −1 means closed


def check_gated_lora_args(x: torch.Tensor, weights: list[torch.Tensor],
                          biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: torch.Tensor,
                          adapter_ids: torch.Tensor, check_values: bool = True) -> None:
    """Validate the multi-slice op's arguments (the public op's and the registered op's).

    Raises TypeError / ValueError naming the argument, what was expected and what was given.
    The id range is checked only where that needs no device sync (CPU tensors) and never while
    tracing or for fake tensors (`check_values=False`, and under torch.compile): an id outside
    −1…L−1 is then treated as a closed gate, by the kernels and by the reference alike.
    """
    check_input("x", x)
    expect(x.dim() >= 1, ValueError, "x: expected shape (..., K), got a 0-d tensor")
    k = x.shape[-1]
    expect(isinstance(weights, (list, tuple)) and isinstance(biases, (list, tuple)), TypeError,
           lambda: f"weights, biases: expected lists of tensors, got {type(weights).__name__} and "
           f"{type(biases).__name__}")
    s = len(weights)
    expect(1 <= s <= MAX_SLICES, ValueError,
           lambda: f"weights: expected 1 to {MAX_SLICES} projections, got {s}")
    expect(len(biases) == s, ValueError,
           lambda: f"biases: expected {s} entries (one per weight), got {len(biases)}")
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_projection(f"[{i}]" if s > 1 else "", w, b, x)
    check_tensor("lora_a", lora_a, x, "x", 3)
    check_tensor("lora_b", lora_b, x, "x", 3)
    # Adapters in x's dtype, or fp32 on a half-precision x (PEFT keeps LoRA weights in fp32).
    expect(lora_a.dtype in (x.dtype, torch.float32), TypeError,
           lambda: f"lora_a: expected dtype {x.dtype} (the dtype of x) or torch.float32, got "
           f"{lora_a.dtype}")
    expect(lora_b.dtype == lora_a.dtype, TypeError,
           lambda: f"lora_b: expected dtype {lora_a.dtype} (the dtype of lora_a), got {lora_b.dtype}")
    n_adapters, sr, ka = lora_a.shape
    expect(1 <= n_adapters <= MAX_ADAPTERS, ValueError,
           lambda: f"lora_a: expected 1 to {MAX_ADAPTERS} adapters (dim 0), got {n_adapters}")
    expect(sr % s == 0, ValueError,
           lambda: f"lora_a: expected dim 1 = {s}·R (rank R per projection, {s} projections), got {sr}")
    r = sr // s
    expect(1 <= r <= MAX_RANK, ValueError,
           lambda: f"lora_a: expected rank 1 to {MAX_RANK} per projection, got rank {r}"
           + (f" (dim 1 = {sr} for {s} projections)" if s > 1 else ""))
    expect(ka == k, ValueError, lambda: f"lora_a: expected shape (L, R, {k}) to match x, got "
           f"{tuple(lora_a.shape)}")
    n_total = sum(w.shape[0] for w in weights)
    expect(tuple(lora_b.shape) == (n_adapters, n_total, r), ValueError,
           lambda: f"lora_b: expected shape ({n_adapters}, {n_total}, {r}) to match lora_a and weight, "
           f"got {tuple(lora_b.shape)}")
    check_tensor("scaling", scaling, x, "x")
    expect(scaling.dtype.is_floating_point, TypeError,
           lambda: f"scaling: expected a floating-point tensor, got {scaling.dtype}")
    shapes = [(s, n_adapters)] if s > 1 else [(n_adapters,), (1, n_adapters)]
    expect(tuple(scaling.shape) in shapes, ValueError,
           lambda: f"scaling: expected shape {shapes[0]} (one per adapter"
           + (" and projection" if s > 1 else "") + f"), got {tuple(scaling.shape)}")
    check_tensor("adapter_ids", adapter_ids, x, "x")
    expect(adapter_ids.dtype in _INTS, TypeError,
           lambda: f"adapter_ids: expected a signed integer tensor, got {adapter_ids.dtype}")
    per_token = tuple(x.shape[:-1])
    per_seq = tuple(x.shape[:1]) if x.dim() == 3 else None
    shape = tuple(adapter_ids.shape)
    expect(shape == per_token or shape == per_seq, ValueError,
           lambda: f"adapter_ids: expected shape {per_token} (one per token)"
           + (f" or {per_seq} (one per sequence)" if per_seq else "") + f", got {shape}")
    if check_values:
        check_range("adapter_ids", adapter_ids, -1, n_adapters - 1, "-1 = base")


def _check_projection(index: str, w: torch.Tensor, b: torch.Tensor | None,
                      x: torch.Tensor) -> None:
    """One projection's weight [N, K] and bias [N] or None against x [..., K]."""
    k = x.shape[-1]
    check_tensor(f"weight{index}", w, x, "x", 2, x.dtype)
    expect(w.shape[1] == k, ValueError,
           lambda: f"weight: expected shape (N, {k}) to match x (..., {k}), got {tuple(w.shape)}")
    if b is not None:
        check_tensor(f"bias{index}", b, x, "x", 1, x.dtype)
        expect(b.shape[0] == w.shape[0], ValueError,
               lambda: f"bias: expected shape ({w.shape[0]},), got {tuple(b.shape)}")


def ids_per_sequence(x: torch.Tensor, adapter_ids: torch.Tensor) -> bool:
    """True when x is [B, T, K] and adapter_ids is [B]: one id per sequence."""
    return x.dim() == 3 and adapter_ids.dim() == 1


# ----------------------------------------------------------------------------------------------
# the op: F.linear for the base, the launcher for the LoRA term
# ----------------------------------------------------------------------------------------------


def gated_lora_linear_triton(x: torch.Tensor, weights: list[torch.Tensor],
                             biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                             lora_b: torch.Tensor, scaling: torch.Tensor,
                             adapter_ids: torch.Tensor,
                             config: dict | None = None) -> list[torch.Tensor]:
    """Base projections by `F.linear` (bit-exact for closed rows) + the gated LoRA kernels."""
    seq_ids = ids_per_sequence(x, adapter_ids)
    ys = [F.linear(x, w, b) for w, b in zip(weights, biases)]   # S × [..., N_s]
    if scaling.dim() != 2 or scaling.dtype != torch.float32 or not scaling.is_contiguous():
        scaling = scaling.reshape(len(weights), -1).to(torch.float32).contiguous()  # [S, L]
    add_gated_lora_(ys, x, lora_a, lora_b, scaling, adapter_ids, seq_ids, config)
    return ys


# ----------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile (no graph break), fake impl beside it
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("prism_fast::gated_lora", mutates_args=())
def gated_lora_op(x: torch.Tensor, weights: list[torch.Tensor],
                  biases: list[torch.Tensor | None], lora_a: torch.Tensor,
                  lora_b: torch.Tensor, scaling: torch.Tensor,
                  adapter_ids: torch.Tensor) -> list[torch.Tensor]:
    # Callable by anyone through torch.ops: the op guards its own arguments (SPEC §4). Id values
    # are not read: out-of-range ids are closed rows in the kernels, as in a compiled graph.
    check_gated_lora_args(x, weights, biases, lora_a, lora_b, scaling, adapter_ids,
                          check_values=False)
    return gated_lora_linear_triton(x, weights, biases, lora_a, lora_b, scaling, adapter_ids)


def group_outputs_like(x, weights, biases, lora_a, lora_b, scaling, adapter_ids):
    """The fake of every op with this signature (gated_lora, fused_base_lora): the arguments
    checked, then one empty [..., N_s] per slice."""
    check_gated_lora_args(x, weights, biases, lora_a, lora_b, scaling, adapter_ids,
                          check_values=False)
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


gated_lora_op.register_fake(group_outputs_like)
