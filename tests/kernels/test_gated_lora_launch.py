"""gated_lora's launch side: the cooperative stage (its two-launch form under the interpreter,
against the float64 reference), the path choice, the lean launcher, and the launch cache's
keying on Triton's specialisation (in a subprocess: it needs Triton's compiled path, with the
GPU launcher replaced by a no-op, see tests/kernels/launch_keys.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from prism_fast.kernels import gated_lora as gl
from tests.helpers import compiled_gpu_mode, make_ids, make_lora, stack_slices
from tests.kernels.test_gated_lora import check_op

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def coop_config(split_k: int, bn: int = 16) -> dict:
    return {"stages": [gl.STAGE_COOP], "SPLIT_K": split_k,
            gl.STAGE_COOP: dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=16, BLOCK_R=16)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("m,k,ns,rank", [(1, 64, (48,), 8), (7, 37, (45, 19, 19), 8),
                                         (33, 100, (70, 30), 20), (5, 130, (17,), 32)])
def test_coop_matches_reference(m, k, ns, rank, split_k, dtype):
    """The cooperative body, run as its two halves (PHASE 1 then 2) by the interpreter: the
    shrink units spread over the expand's grid (fewer or more units than programs), K splits
    summed by the expand, several slices and adapters, mixed closed rows."""
    n_adapters = 3
    x = torch.randn(m, k, dtype=dtype)
    ws = [torch.randn(n, k, dtype=dtype) / k**0.5 for n in ns]
    bs = [torch.randn(n, dtype=dtype) for n in ns]
    parts = [make_lora(n_adapters, rank, k, n, dtype) for n in ns]
    a, b, scaling = stack_slices(parts)              # [L, S·R, K], [L, ΣN, R], [S, L]
    ids = make_ids((m,), n_adapters)
    ys = gl.gated_lora_linear_triton(x, ws, bs, a, b, scaling, ids, config=coop_config(split_k))
    lo = 0
    for s, (w, bias, y) in enumerate(zip(ws, bs, ys)):
        hi = lo + w.shape[0]
        check_op(x, w, bias, a[:, s * rank:(s + 1) * rank], b[:, lo:hi], scaling[s], ids, y)
        lo = hi


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)
def test_coop_per_sequence_ids_and_closed(dtype):
    """Per-sequence ids (x [B, T, K], ids [B]) with a closed sequence whose tiles exit early."""
    x = torch.randn(3, 20, 40, dtype=dtype)
    w = torch.randn(24, 40, dtype=dtype) / 40**0.5
    a, b, scaling = make_lora(2, 8, 40, 24, dtype)
    ids = torch.tensor([1, -1, 0])
    y = gl.gated_lora_linear_triton(x, [w], [None], a, b, scaling, ids,
                                    config=coop_config(2))[0]
    check_op(x, w, None, a, b, scaling, ids, y)


def test_coop_runs_as_two_launches_under_the_interpreter():
    x = torch.randn(4, 32)
    ys = [torch.zeros(4, 16)]
    a, b, s = make_lora(1, 8, 32, 16, torch.float32)
    plan = gl._make_plan(4, 1, False, x, a, b, ys, coop_config(2))
    assert [st.kwargs["PHASE"] for st in plan.stages] == [1, 2]
    assert all(st.kwargs["STAGE"] == gl.STAGE_COOP for st in plan.stages)
    assert plan.ctr is not None and plan.ctr.shape == (2 * plan.stages[0].grid[0],)


def test_decode_path_choice():
    """Split by default at every decode size; fused and coop only when asked for (table or
    use_choices); coop falls back to split where its grid cannot be co-resident."""
    llama = [(4096, (4096, 1024, 1024)), (4096, (4096,)), (4096, (14336, 14336)), (14336, (4096,))]
    for m in (1, 8, 32, 64):
        for k, ns in llama:
            cfg = gl.config_for(m, k, ns, 16, "NVIDIA H200", 132, table={})
            assert cfg["stages"] == [gl.STAGE_SHRINK, gl.STAGE_EXPAND]
    cfg = gl.config_for(1, 4096, (4096, 1024, 1024), 16, "NVIDIA H200", 132,
                        table={"path:1": "fused"})
    assert cfg["stages"] == [gl.STAGE_FUSED]
    cfg = gl.config_for(1, 4096, (4096, 1024, 1024), 16, "NVIDIA H200", 132, table={},
                        path="coop")
    assert cfg["stages"] == [gl.STAGE_COOP]
    grid_n = sum(-(-n // cfg[gl.STAGE_COOP]["BLOCK_N"]) for n in (4096, 1024, 1024))
    assert grid_n <= 132
    # gate/up at M = 64: 4 row tiles × 2 × 14336 / 256 programs > 132 SMs: split instead
    cfg = gl.config_for(64, 4096, (14336, 14336), 16, "NVIDIA H200", 132, table={}, path="coop")
    assert cfg["stages"] == [gl.STAGE_SHRINK, gl.STAGE_EXPAND]
    # prefill always splits
    cfg = gl.config_for(4096, 4096, (4096,), 16, "NVIDIA H200", 132, table={}, path="fused")
    assert cfg["stages"][0] == gl.STAGE_SHRINK


def test_use_choices_reaches_pick_config():
    cpu = torch.device("cpu")
    try:
        gl.use_choices("cpu", {"512|256|16|8": "fused"})
        assert gl.pick_config(5, 512, (256,), 16, cpu)["stages"] == [gl.STAGE_FUSED]
        assert gl.pick_config(9, 512, (256,), 16, cpu)["stages"][0] == gl.STAGE_SHRINK  # M 16
        with pytest.raises(ValueError, match="path: expected one of"):
            gl.use_choices("cpu", {"512|256|16|8": "fast"})
    finally:
        gl.use_choices("cpu", {"512|256|16|8": None})
    assert gl.pick_config(5, 512, (256,), 16, cpu)["stages"][0] == gl.STAGE_SHRINK


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launcher_matches_generic_path(dtype):
    """GatedLoraLauncher (a patched group's eager path) gives what add_gated_lora_ gives, for
    decode and prefill layouts, per-sequence and per-token ids, and a non-viewable x."""
    k, ns, r = 48, (40, 24), 8
    a, b, s = make_lora(2, 2 * r, k, sum(ns), dtype)
    a = a[:, :2 * r].contiguous()
    b = b[:, :, :r].contiguous()
    scaling = torch.stack([s, s * 0.5]).float().contiguous()        # [S, L]
    launcher = gl.GatedLoraLauncher(a, b, scaling)
    cases = [(torch.randn(4, 1, k, dtype=dtype), torch.tensor([0, -1, 1, 0]), True),
             (torch.randn(3, 9, k, dtype=dtype), torch.tensor([1, 0, -1]), True),
             (torch.randn(10, k, dtype=dtype), make_ids((10,), 2), False),
             (torch.randn(9, 3, k, dtype=dtype).transpose(0, 1), torch.tensor([0, 1, -1]), True)]
    for x, ids, seq in cases:
        for _ in range(2):    # a new plan, then the kept one
            ys_ref = [torch.randn(*x.shape[:-1], n, dtype=dtype) for n in ns]
            ys = [y.clone() for y in ys_ref]
            gl.add_gated_lora_(ys_ref, x, a, b, scaling, ids, seq)
            launcher(ys, x, ids, seq)
            for y, y_ref in zip(ys, ys_ref):
                assert torch.equal(y, y_ref)


@pytest.mark.skipif(not torch.cuda.is_available() or not compiled_gpu_mode(),
                    reason="the grid barrier needs a GPU (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("m", [1, 8, 32, 64])
def test_coop_one_launch_on_gpu(m):
    """The one-launch cooperative kernel (its grid barrier) on Llama-3-8B q/k/v at decode,
    twice in a row (the counters reset themselves), against the split path."""
    k, ns, r = 4096, (4096, 1024, 1024), 16
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    a = torch.randn(1, 3 * r, k, device=dev, dtype=dt) / k**0.5
    b = torch.randn(1, sum(ns), r, device=dev, dtype=dt) * 0.1
    scaling = torch.full((3, 1), 2.0, device=dev)
    ids = torch.zeros(m, dtype=torch.int32, device=dev)
    props = torch.cuda.get_device_properties(dev)
    coop = gl.config_for(m, k, ns, r, props.name, props.multi_processor_count, table={},
                         path="coop")
    assert coop["stages"] == [gl.STAGE_COOP]
    split = gl.config_for(m, k, ns, r, props.name, props.multi_processor_count, table={})
    for _ in range(2):
        ys = [torch.zeros(m, n, device=dev, dtype=dt) for n in ns]
        ref = [torch.zeros(m, n, device=dev, dtype=dt) for n in ns]
        gl.add_gated_lora_(ys, x, a, b, scaling, ids, False, coop)
        gl.add_gated_lora_(ref, x, a, b, scaling, ids, False, split)
        torch.cuda.synchronize()
        for y, y_ref in zip(ys, ref):
            assert torch.linalg.norm((y - y_ref).float()) <= 1e-2 * torch.linalg.norm(y_ref.float())


def test_launch_cache_keyed_on_specialisation():
    """A 16-byte-misaligned x is never launched with the kernel compiled for an aligned one
    (and the lean launcher launches what the generic path launches): tests/kernels/launch_keys.py's
    check, with Triton's compiled path and a no-op GPU launcher, so it runs on a CPU."""
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no CUDA backend here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.launch_keys"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "launch cache keying: ok" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available() or not compiled_gpu_mode(),
                    reason="the direct launch exists on a GPU only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("m,k,ns", [(1, 4096, (4096, 1024, 1024)), (8, 14336, (4096,)),
                                    (300, 4096, (14336, 14336))])
def test_direct_launch_equals_tritons_launch_on_gpu(m, k, ns):
    """A plan's first call goes through Triton's kernel[grid]; later calls launch the compiled
    kernel directly. Same kernel, same inputs, no atomics: bit-identical results, at decode
    and prefill sizes, through the generic path and a patched group's launcher."""
    dev, dt, r = torch.device("cuda"), torch.bfloat16, 16
    x = torch.randn(m, k, device=dev, dtype=dt)
    a = torch.randn(2, len(ns) * r, k, device=dev, dtype=dt) / k**0.5
    b = torch.randn(2, sum(ns), r, device=dev, dtype=dt) * 0.1
    scaling = torch.full((len(ns), 2), 2.0, device=dev)
    ids = make_ids((m,), 2).to(dev)
    launcher = gl.GatedLoraLauncher(a, b, scaling)
    for run in (lambda ys: gl.add_gated_lora_(ys, x, a, b, scaling, ids, False),
                lambda ys: launcher(ys, x, ids, False)):
        outs = []
        for _ in range(3):          # Triton's launch, then the direct one, twice
            ys = [torch.ones(m, n, device=dev, dtype=dt) for n in ns]
            run(ys)
            outs.append(ys)
        torch.cuda.synchronize()
        assert gl._direct, "the direct launch was resolved"
        for ys in outs[1:]:
            for y, y_ref in zip(ys, outs[0]):
                assert torch.equal(y, y_ref)
