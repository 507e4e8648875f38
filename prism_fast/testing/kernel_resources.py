"""Registers, spills and shared memory of the gated-LoRA kernels, for a GPU that is not here.

    python -m prism_fast.testing.kernel_resources [--models …] [--ranks 8 16 64] [--check]
    (also `python -m bench.kernel_resources`)

Compiles every kernel variant that `config_for` (and the fused base kernel's config) picks for
decoder-layer shapes at M = 1…8192 on the named GPU with Triton's code generator (no GPU needed)
and prints ptxas's registers, spill bytes and shared memory. `--check` exits 1 if any variant
spills: tests/kernels/test_compile_sm90.py runs it in CI. A static check, not a timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import os
import re
import sys
import tempfile

# A fresh cache so that ptxas runs and reports. The kernels must be compiled, not interpreted:
# `main` refuses to run where TRITON_INTERPRET was set when they were imported.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="prism_resources_")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from prism_fast.kernels import fused_base_lora as fb  # noqa: E402
from prism_fast.kernels import gated_lora as gl  # noqa: E402
from prism_fast.testing.kernel_signatures import (  # noqa: E402
    fused_base_pointers,
    gated_lora_pointers,
    signature,
)
from prism_fast.testing.shapes import MODELS  # noqa: E402

M_SWEEP = (1, 8, 32, 64, 128, 512, 2048, 4096, 8192)
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
SMEM_PER_SM = 228 * 1024   # sm_90; sm_80 has 164 KiB
FUSED_BASE = 10   # the stage key of the opt-in fused base + LoRA kernel (fused_base_lora.py)


def variants(models: list[str], ranks: list[int], device_name: str, sms: int) -> dict:
    """{(stage, slices, SPLIT_K, blocks, num_warps, SEQ_IDS): [(model, rank, M, proj), ...]}.

    Every path at the decode sizes (M ≤ 64), the split path above; per-row ids at every M;
    per-sequence ids (a patched model's prefill) from M = 128 on."""
    out: dict = {}
    for model in models:
        shape = MODELS[model]
        names = ("qkv", "o", "gate_up", "down")
        for rank in ranks:
            for m in M_SWEEP:
                # Decode sizes: every selectable path (the tuner may pick any of them).
                paths = gl.PATHS if m <= gl.FUSED_MAX_ROWS else ("split",)
                for (name, (k, ns, _)), path in itertools.product(
                        zip(names, shape.groups("layer")), paths):
                    s = len(ns)
                    cfg = gl.config_for(m, k, tuple(ns), rank, device_name, sms, path=path)
                    for stage, seq_ids in itertools.product(cfg["stages"], (False, True)):
                        if seq_ids and m < 128:
                            continue
                        blocks = dict(cfg[stage])
                        warps = blocks.pop("num_warps", 4)
                        key = (stage, s, cfg["SPLIT_K"], tuple(sorted(blocks.items())), warps,
                               seq_ids)
                        out.setdefault(key, []).append((model, rank, m, name))
                if m > fb.MAX_ROWS:
                    continue
                # The opt-in fused base kernel (patch_model(..., fuse_base=True)), compiled with
                # a bias on every slice (the most it loads); SEQ_IDS has no meaning there.
                for name, (k, ns, _) in zip(names, shape.groups("layer")):
                    blocks = fb.config_for(m, k, tuple(ns), rank, sms)
                    warps = blocks.pop("num_warps")
                    key = (FUSED_BASE, len(ns), 1, tuple(sorted(blocks.items())), warps, False)
                    out.setdefault(key, []).append((model, rank, m, name))
    return out


def compile_variant(key: tuple, dtype: str, arch: int) -> dict:
    """ptxas's registers / spill bytes and Triton's shared memory for one kernel variant."""
    stage, slices, split_k, blocks, warps, seq_ids = key
    if stage == FUSED_BASE:
        fn, pointers = fb._fused_base_lora_kernel, fused_base_pointers(dtype)
        constexprs = dict(NUM_SLICES=slices, BIAS_BITS=(1 << slices) - 1, **dict(blocks))
    else:
        fn, pointers = gl._gated_lora_kernel, gated_lora_pointers(dtype)
        constexprs = dict(STAGE=stage, SEQ_IDS=seq_ids, NUM_SLICES=slices, SPLIT_K=split_k,
                          PHASE=0, **dict(blocks))
    src = ASTSource(fn=fn, signature=signature(fn, pointers, constexprs), constexprs=constexprs)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": warps})
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not (regs and spills):
        raise RuntimeError(f"no ptxas report for {key}:\n{text[-2000:]}")
    r, shared = int(regs[1]), kernel.metadata.shared
    by_regs = REGS_PER_SM // (((r + 7) // 8 * 8) * 32 * warps)
    by_smem = SMEM_PER_SM // shared if shared else MAX_WARPS_PER_SM
    return dict(regs=r, spill_stores=int(spills[1]), spill_loads=int(spills[2]), shared=shared,
                blocks_per_sm=min(by_regs, by_smem, MAX_WARPS_PER_SM // warps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     prog="python -m prism_fast.testing.kernel_resources")
    parser.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2.5-7b"],
                        choices=[m for m in MODELS if m != "tiny"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 64])
    parser.add_argument("--device-name", default="NVIDIA H100 80GB HBM3",
                        help="the GPU whose configs to take (its tuned table applies if any)")
    parser.add_argument("--sms", type=int, default=132, help="its multiprocessor count")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--check", action="store_true", help="exit 1 if any variant spills")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile in this many processes")
    args = parser.parse_args(argv)
    if not isinstance(gl._gated_lora_kernel, triton.runtime.JITFunction):
        raise SystemExit("kernel_resources compiles for a GPU: run it without TRITON_INTERPRET=1 "
                         "(the kernels were imported as interpreted functions)")

    found = variants(args.models, args.ranks, args.device_name, args.sms)
    stages = {gl.STAGE_FUSED: "fused", gl.STAGE_SHRINK: "shrink", gl.STAGE_EXPAND: "expand",
              gl.STAGE_COOP: "coop", FUSED_BASE: "fused_base"}
    print(f"{args.device_name} ({args.sms} SMs), sm_{args.arch}, {args.dtype}, triton "
          f"{triton.__version__}: {len(found)} kernel variants\n")
    print("| stage | S | SPLIT_K | ids | blocks (M, N, K, R) | warps | regs | spill B | smem KiB "
          "| blocks/SM | used by (first of n) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    spilled = []
    keys = sorted(found)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = pool.map(compile_variant, keys, [args.dtype] * len(keys),
                           [args.arch] * len(keys))
    for key, res in zip(keys, results):
        uses = found[key]
        stage, slices, split_k, blocks, warps, seq_ids = key
        b = dict(blocks)
        dims = f"{b['BLOCK_M']}, {b['BLOCK_N']}, {b['BLOCK_K']}, {b['BLOCK_R']}"
        model, rank, m, name = uses[0]
        ids = "seq" if seq_ids else "row"
        print(f"| {stages[stage]} | {slices} | {split_k} | {ids} | {dims} | {warps} | {res['regs']} "
              f"| {res['spill_stores']} | {res['shared'] / 1024:.0f} | {res['blocks_per_sm']} "
              f"| {model} r={rank} M={m} {name} ({len(uses)}) |")
        if res["spill_stores"] or res["spill_loads"]:
            spilled.append((stages[stage], slices, split_k, b, warps, seq_ids))
    print(f"\n{len(spilled)} of {len(found)} variants spill" + "".join(
        f"\n  {v}" for v in spilled))
    return 1 if args.check and spilled else 0


if __name__ == "__main__":
    sys.exit(main())
