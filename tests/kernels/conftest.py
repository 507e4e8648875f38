"""Kernel tests run through the CPU interpreter by default. With TRITON_INTERPRET=0 on a CUDA
machine (bench/gpu_check.sh), every kernel test runs compiled on the GPU instead: tensors are
created on the default device, which is then cuda."""

import pytest
import torch

from tests.helpers import compiled_gpu_mode


@pytest.fixture(autouse=True)
def _kernel_device():
    if not compiled_gpu_mode():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")
