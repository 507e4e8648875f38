"""The launch cache's keying on Triton's specialisation, with Triton's compiled path and a no-op
GPU launcher (prism_fast.testing.noop_triton), so it runs on a CPU:

    python -m tests.kernels.launch_keys

tests/kernels/test_gated_lora_launch.py runs it in a subprocess: the test session has
TRITON_INTERPRET=1 set, under which `@triton.jit` yields interpreted functions.
"""

from __future__ import annotations

import os
import sys

# Triton's compiled path, not its interpreter: set before triton's first import.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from prism_fast.testing.noop_triton import NoOpCompiled, install_noop_triton  # noqa: E402


def check_keys() -> None:
    """The launch cache never reuses a compiled kernel for arguments Triton would specialise
    differently: a 16-byte-misaligned x (a view one element in) gets its own compile, launched
    with the misaligned tensor, and the aligned one keeps its own kernel."""
    from prism_fast.kernels import gated_lora as gl

    compiled = install_noop_triton()
    k, n, r = 64, 48, 8
    buf = torch.randn(3 * k + 1)
    a = torch.randn(1, r, k)
    b = torch.randn(1, n, r)
    scaling = torch.ones(1, 1)
    ids = torch.zeros(3, dtype=torch.int32)

    def call(x):
        y = torch.zeros(3, n)
        gl.add_gated_lora_([y], x, a, b, scaling, ids, False)

    def kernel_of(x) -> NoOpCompiled:
        hits = [kn for kn in compiled if kn.launches and kn.last_args[0] is x
                and kn.constexprs["STAGE"] == gl.STAGE_SHRINK]
        assert len(hits) == 1, f"{len(hits)} kernels launched with this x"
        return hits[0]

    aligned = buf[:3 * k].view(3, k)
    misaligned = buf[1:].view(3, k)
    assert aligned.data_ptr() % 16 == 0 and misaligned.data_ptr() % 16 != 0
    for x in (aligned, aligned, aligned):   # 1st: Triton's path (compiles); then direct
        call(x)
    n_shrink_expand = len(compiled)
    k_aligned = kernel_of(aligned)
    assert k_aligned.attrs, "the aligned x should carry a divisibility attribute"
    direct = k_aligned.launches
    assert direct == 3, f"expected 3 launches of the aligned shrink, got {direct}"
    call(misaligned)
    assert len(compiled) == 2 * n_shrink_expand, "a misaligned x must compile new kernels"
    k_mis = kernel_of(misaligned)
    assert k_mis is not k_aligned and k_mis.attrs != k_aligned.attrs
    call(misaligned)
    call(aligned)
    assert kernel_of(misaligned) is k_mis and k_mis.launches == 2
    assert kernel_of(aligned) is k_aligned and k_aligned.launches == 4
    # A different M is another plan: its integer arguments (M, stride_uk) specialise anew.
    y = torch.zeros(2, n)
    gl.add_gated_lora_([y], buf[:2 * k].view(2, k), a, b, scaling, ids[:2], False)
    assert len(compiled) == 3 * n_shrink_expand
    # GatedLoraLauncher (a patched group's lean path) launches exactly what the generic path
    # launches: the same kernels, the same pointers and integer arguments, and its own plan for
    # a misaligned x. Two slices of per-sequence ids [B] with x [B, T, K], T = 1 (decode).
    a2, b2 = torch.randn(1, 2 * r, k), torch.randn(1, 2 * n, r)
    s2 = torch.ones(2, 1)
    seq = torch.zeros(3, dtype=torch.int32)
    launcher = gl.GatedLoraLauncher(a2, b2, s2)
    for x in (buf[:3 * k].view(3, 1, k), buf[1:].view(3, 1, k)):
        records = []
        ys = [torch.zeros(3, 1, n), torch.zeros(3, 1, n)]
        for run in (lambda ys, x=x: gl.add_gated_lora_(ys, x, a2, b2, s2, seq, True),
                    lambda ys, x=x: launcher(ys, x, seq, True)):
            before = {id(kn): kn.launches for kn in compiled}
            run(ys)
            run(ys)
            used = [kn for kn in compiled if kn.launches > before.get(id(kn), 0)]
            # pointers by address (u is a fresh buffer per call), then every other argument
            records.append(sorted(
                (kn.constexprs["STAGE"], id(kn), tuple(
                    (a.data_ptr() if i != 5 else -1) if isinstance(a, torch.Tensor) else a
                    for i, a in enumerate(kn.last_args))) for kn in used))
            assert all(kn.launches - before.get(id(kn), 0) == 2 for kn in used)
        generic, lean = records
        assert [rec[0] for rec in generic] == [gl.STAGE_SHRINK, gl.STAGE_EXPAND]
        assert [(st, args) for st, _, args in generic] == [(st, args) for st, _, args in lean]
        assert [kid for _, kid, _ in generic] == [kid for _, kid, _ in lean], \
            "the launcher must reuse the kernel Triton compiled for this specialisation"
    print(f"launch cache keying: ok ({len(compiled)} compiled stand-ins)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    check_keys()
    sys.exit(0)
