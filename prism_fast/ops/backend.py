"""Which implementation runs an op: the one place that reads a backend name and the one rule
that picks between an op's Triton launcher, its registered custom op and its PyTorch path."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from prism_fast.kernels.gated_lora import interpreted

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, device: torch.device) -> bool:
    """Resolve a backend name: "auto" runs Triton on CUDA tensors and the reference elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    # Both: kernels built for the interpreter, and TRITON_INTERPRET=1 still set (triton reads
    # it again when it launches).
    if device.type != "cuda" and not (interpreted()
                                      and os.environ.get("TRITON_INTERPRET") == "1"):
        late = " (it is set now, but was not when triton and prism_fast were imported: the " \
            "kernels were compiled for a GPU)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        raise ValueError(f"backend: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                         f"triton is imported to run on CPU{late}; got tensors on {device}")
    return True


def pick(triton: bool, registered: Callable, launcher: Callable, torch_path: Callable
         ) -> Callable:
    """The implementation of one call: the PyTorch path unless `triton`; under torch.compile
    the registered `torch.ops.prism_fast.*` op (the launcher is opaque to Dynamo), else the
    eager Triton launcher."""
    if not triton:
        return torch_path
    return registered if torch.compiler.is_compiling() else launcher
