"""Test harness: run Triton through its CPU interpreter, with the interpreter fixes of
tests/interpreter_fixes.py. The kernels stay unchanged; these fixes live in the test harness
only, never installed with the library.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import models as M  # noqa: E402
from tests.interpreter_fixes import fix_interpreter  # noqa: E402

fix_interpreter()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def prism_dir(tmp_path):
    """A tiny Llama PRISM case (M.prism_case): (path, base, peft_model, gate)."""
    return M.prism_case(tmp_path / "prism_out", 8, 10)


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo cache before and after the test (use via pytest.mark.usefixtures)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
