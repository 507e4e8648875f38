"""Triton compile signatures of prism_fast's kernels, for compiling them for a GPU target that
is not here (Triton's code generator, no GPU needed): tests/kernels/test_compile_sm90.py
compiles every variant, kernel_resources.py reads ptxas's report of each."""

from __future__ import annotations


def gated_lora_pointers(dtype: str, ids: str = "i32",
                        adapters: str | None = None) -> dict[str, str]:
    """Pointer types of one `_gated_lora_kernel` launch: x and the outputs in `dtype`, A and B
    in `adapters` (default: `dtype`; "fp32" for adapter_dtype=torch.float32); ids int32 as a
    patched model passes them (the public op also accepts int64 ids)."""
    pointers = {p: f"*{dtype}" for p in ("x_ptr", "y0_ptr", "y1_ptr", "y2_ptr")}
    pointers.update(a_ptr=f"*{adapters or dtype}", b_ptr=f"*{adapters or dtype}",
                    scale_ptr="*fp32", ids_ptr=f"*{ids}", buf_ptr="*fp32", ctr_ptr="*i32")
    return pointers


def signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton's compile signature for a kernel: the given pointer types, the constexprs, and
    i32 scalars, except the row stride of x, which arrives as a 64-bit int when it is large."""
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    if "stride_xm" in sig:
        sig["stride_xm"] = "i64"
    return sig


def fused_base_pointers(dtype: str, ids: str = "i32") -> dict[str, str]:
    """Pointer types of one `_fused_base_lora_kernel` launch: everything in `dtype` but the
    fp32 scaling and the ids."""
    from prism_fast.kernels.fused_base_lora import POINTERS

    pointers = {p: f"*{dtype}" for p in POINTERS}
    pointers.update(scale_ptr="*fp32", ids_ptr=f"*{ids}")
    return pointers
