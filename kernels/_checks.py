"""Argument checks shared by the ops: errors name the argument, what was expected and what was
given (SPEC §5). Host-side only; nothing here synchronises with a device."""

from __future__ import annotations

import typing

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def expect(cond: bool, exc: type[Exception], msg: str | typing.Callable[[], str]) -> None:
    """Raise exc(msg) unless cond. A message given as a callable is formatted only on failure:
    checks run on every call of a registered op (formatting dtypes, devices and shapes eagerly
    cost 21.6 µs of a 3-projection decode group's check on this project's CPU)."""
    if not cond:
        raise exc(msg() if callable(msg) else msg)


def check_input(name: str, t: object) -> None:
    """The leading floating-point tensor that fixes every other argument's device and dtype."""
    expect(isinstance(t, torch.Tensor), TypeError,
           lambda: f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    expect(t.dtype in FLOATS, TypeError,
           lambda: f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")


def check_tensor(name: str, t: object, ref: torch.Tensor, ref_name: str,
                 ndim: int | None = None, dtype: torch.dtype | None = None) -> None:
    """A tensor on ref's device, with ndim dimensions and the given dtype where those are set."""
    expect(isinstance(t, torch.Tensor), TypeError,
           lambda: f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    expect(t.device == ref.device, ValueError,
           lambda: f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")
    if dtype is not None:
        expect(t.dtype == dtype, TypeError,
               lambda: f"{name}: expected dtype {dtype} (the dtype of {ref_name}), got {t.dtype}")
    if ndim is not None:
        expect(t.dim() == ndim, ValueError,
               lambda: f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")


def check_range(name: str, t: torch.Tensor, lo: int, hi: int, meaning: str) -> None:
    """An integer tensor's values in lo…hi. Checked on CPU only (a device tensor's min / max
    would synchronise) and not while compiling; out-of-range values never read memory anyway."""
    if t.device.type == "cpu" and t.numel() > 0 and not torch.compiler.is_compiling():
        vmin, vmax = int(t.min()), int(t.max())
        expect(vmin >= lo and vmax <= hi, ValueError,
               lambda: f"{name}: expected values in {lo}…{hi} ({meaning}), got values in {vmin}…{vmax}")
