"""Triton's launch path on a machine without a GPU: the active driver reports an sm_90 device
and stream 0, the gated-LoRA kernel's `compile` returns a stand-in compiled kernel, and that
kernel's `run` (the C launcher that would call cuLaunchKernel) only counts. Everything else is
Triton's and prism_fast's real host code, on CPU tensors.

Used by bench/bench_host.py (host time per launch) and tests/kernels/launch_keys.py (the launch
cache's keying). TRITON_INTERPRET must be unset before triton is first imported: under the
interpreter `@triton.jit` yields interpreted functions, which have no compile step to replace.
"""

from __future__ import annotations

from triton.backends.compiler import GPUTarget


class NoOpCompiled:
    """Stands in for triton.compiler.CompiledKernel: the attributes Triton's launch path and
    prism_fast's direct launch read, a specialisation record, and a launcher that only counts."""

    def __init__(self, src, options: dict):
        self.attrs = dict(src.attrs)            # Triton's specialisation (divisibility by 16, …)
        names = src.fn.arg_names
        self.constexprs = {names[k[0]]: v for k, v in src.constants.items()}
        self.name = src.name
        self.function = 0
        self.packed_metadata = ()
        self.metadata = None
        self.launches = 0
        self.last_args: tuple = ()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
            exit_hook, *args):
        self.launches += 1      # no list of every call: it would keep buffers alive and
        self.last_args = args   # grow the garbage collector's work, timed with the launch


class _NoOpDriver:
    """The parts of Triton's active driver its launch path calls: device, stream, target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


def install_noop_triton() -> list[NoOpCompiled]:
    """Make the gated-LoRA kernel 'compile' into NoOpCompiled objects and launch into a counter;
    returns the list of kernels compiled so far (filled as Triton compiles)."""
    from triton.runtime import driver

    from prism_fast.kernels import gated_lora as gl

    driver.set_active(_NoOpDriver())
    fn = gl._gated_lora_kernel
    assert hasattr(fn, "device_caches"), "TRITON_INTERPRET must be unset before triton's import"
    fn.device_caches[0]                      # creates the binder, which sets fn.compile
    compiled: list[NoOpCompiled] = []

    def compile_(src, target=None, options=None, **_):
        kernel = NoOpCompiled(src, options or {})
        compiled.append(kernel)
        return kernel

    fn.compile = compile_
    return compiled
