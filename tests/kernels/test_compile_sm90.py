"""Compile every kernel variant for a real GPU target (sm_90) with Triton's code generator.

The interpreter runs kernels as NumPy and accepts code the compiler rejects; this compiles
each STAGE / SEQ_IDS / NUM_SLICES / dtype variant down to a cubin, without needing a GPU.
It runs in a subprocess because the test session has TRITON_INTERPRET=1 set, under which
`@triton.jit` yields interpreted functions.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile

import pytest


def main() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from prism_fast.kernels.fused_base_lora import _fused_base_lora_kernel
    from prism_fast.kernels.gated_lora import _gated_lora_kernel
    from prism_fast.kernels.prism_gate import _prism_gate_kernel
    from prism_fast.testing.kernel_signatures import (
        fused_base_pointers,
        gated_lora_pointers,
        signature,
    )

    # A fresh cache, so that every variant really runs through the code generator (as when the
    # signatures came from prism_fast.testing.kernel_resources, whose import set one).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="prism_sm90_")

    target = GPUTarget("cuda", 90, 32)

    def compile_one(fn, pointers, constexprs):
        src = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs),
                        constexprs=constexprs)
        kernel = triton.compile(src, target=target, options={"num_warps": 4})
        assert kernel.asm.get("cubin"), f"no cubin for {fn.__name__} {constexprs}"

    # int32 ids (a patched model's) in every dtype; int64 (torch.tensor's default) once.
    for dt, ids in (("bf16", "i32"), ("fp16", "i32"), ("fp32", "i32"), ("bf16", "i64")):
        # STAGE 3 is the cooperative kernel with its grid barrier (PHASE 0: one launch).
        for stage, seq_ids, n_slices in itertools.product((0, 1, 2, 3), (False, True), (1, 3)):
            compile_one(_gated_lora_kernel, gated_lora_pointers(dt, ids), dict(
                STAGE=stage, SEQ_IDS=seq_ids, NUM_SLICES=n_slices,
                SPLIT_K=2 if stage in (1, 3) else 1, BLOCK_M=16 if stage in (0, 3) else 64,
                BLOCK_N=64, BLOCK_K=64, BLOCK_R=64 if stage != 3 else 16, PHASE=0))
        if ids != "i32":
            continue
        if dt != "fp32":     # fp32 adapters on a half-precision model (adapter_dtype=float32)
            for stage in (0, 1, 2, 3):
                compile_one(_gated_lora_kernel, gated_lora_pointers(dt, ids, "fp32"), dict(
                    STAGE=stage, SEQ_IDS=False, NUM_SLICES=3, SPLIT_K=2 if stage in (1, 3) else 1,
                    BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16, PHASE=0))
        ptrs = {p: f"*{dt}" for p in ("h_ptr", "w1_ptr", "b1_ptr", "w2_ptr", "b2_ptr")}
        ptrs["out_ptr"] = "*i32"
        compile_one(_prism_gate_kernel, ptrs, dict(BLOCK_B=16, BLOCK_H=64, BLOCK_D=64,
                                                   BLOCK_C=16))
    # The opt-in fused base + LoRA decode kernel: every dtype, 1 and 3 slices, with and without
    # biases, int64 ids once, fp32 adapters on half x (its default configs: kernel_resources).
    for dt, ids, adapters in (("bf16", "i32", None), ("fp16", "i32", None), ("fp32", "i32", None),
                              ("bf16", "i64", None), ("bf16", "i32", "fp32")):
        ptrs = fused_base_pointers(dt, ids)
        if adapters:
            ptrs.update(a_ptr=f"*{adapters}", b_ptr=f"*{adapters}")
        for n_slices, bias_bits in ((1, 0), (3, 5)):
            compile_one(_fused_base_lora_kernel, ptrs, dict(
                NUM_SLICES=n_slices, BIAS_BITS=bias_bits, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64,
                BLOCK_R=16))
    from prism_fast.kernels.topk_distill import _topk_distill_kernel

    scalars = dict(inv_t="fp32", t_sq="fp32", idx_ptr="*i32", mask_ptr="*i1", val_ptr="*fp16",
                   **{p: "*fp32" for p in ("ps_ptr", "pt_ptr", "kl_ptr", "gkl_ptr", "ds_ptr",
                                          "gh_ptr")})
    for dt in ("bf16", "fp16", "fp32"):
        for backward, bias, mask in itertools.product((False, True), repeat=3):
            compile_one(_topk_distill_kernel,
                        dict(scalars, h_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr=f"*{dt}"),
                        dict(BACKWARD=backward, HAS_BIAS=bias, HAS_MASK=mask, BLOCK_K=64,
                             BLOCK_H=128))
    print("compiled all variants for sm_90")


def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no CUDA backend here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.test_compile_sm90"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_default_configs_do_not_spill_registers():
    """Every variant pick_config chooses for Llama-3-8B / Qwen2.5-7B layers at ranks 8/16/64 on
    an H100, compiled for sm_90: ptxas reports no register spills
    (prism_fast.testing.kernel_resources)."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no CUDA backend here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "prism_fast.testing.kernel_resources",
                           "--check"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    main()
