"""Test harness: run Triton through its CPU interpreter, with the bfloat16 `tl.dot` fix.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def _fix_interpreter_bf16_dot() -> None:
    """triton-lang/triton#11584: the interpreter's `tl.dot` multiplies bfloat16 operands as their
    raw uint16 bit patterns (results ~1e10). Convert bfloat16 operands to float32 before its
    matmul; the kernels stay unchanged. Test harness only, never installed with the library.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_prism_bf16_fix", False):
        return
    original = builder.create_dot

    def as_f32(handle):
        if handle.dtype == tl.bfloat16:
            data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None)
            return interpreter.TensorHandle(data.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

    create_dot._prism_bf16_fix = True
    builder.create_dot = create_dot


_fix_interpreter_bf16_dot()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
