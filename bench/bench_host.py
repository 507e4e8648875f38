"""Host time of prism_fast's eager decode path, with the compiled launcher replaced by a no-op.

    python -m bench.bench_host [--layers 8] [--batch 1] [--rounds 2000] [--triton-path]

Runs anywhere: Triton's driver reports an sm_90 device, `compile` returns a stand-in kernel and
its `run` (the C launcher) only counts (prism_fast.testing.noop_triton). Counted: prism_fast's
Python on the decode path and Triton's host launch path (`JITFunction.run`, or the cached direct
`CompiledKernel.run`); not counted: the C launcher (≈ 2-4 µs per launch on a GPU host) and any
device time. Per launch group: the median over rounds of (patched − unpatched forward, timed
back to back) / groups, one decode step of an L-layer Llama (hidden 64, LoRA on q/k/v, o,
gate/up, down of layers 1…L−1), every route open. CPU host time: not a GPU result.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from unittest import mock

# Triton's compiled path, not its interpreter: this benchmark stubs what needs a GPU.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

from bench import timing  # noqa: E402
from prism_fast.testing.noop_triton import install_noop_triton  # noqa: E402


def _models(layers: int, dtype: torch.dtype):
    """An unpatched Llama and a copy patched with a random rank-16 PEFT adapter (saved to a
    temporary directory and loaded as a user would), so both run the same HF code."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    import prism_fast
    from bench.models import add_peft_adapter

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    base = LlamaForCausalLM(config).to(dtype).eval()
    peft = add_peft_adapter(copy.deepcopy(base), init_lora_weights=True, task_type=None)
    model = copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as tmp:
        peft.save_pretrained(tmp)
        # patch_model takes the Triton backend for CPU tensors only from an interpreter: it is
        # made to believe in one while it resolves the backend (the kernels stay compiled).
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            with mock.patch("prism_fast.ops.backend.interpreted", lambda: True):
                prism_fast.patch_model(model, f"{tmp}/persona_expert", backend="triton")
        finally:
            os.environ.pop("TRITON_INTERPRET", None)
    return base, model


def _decode_step(model, ids: torch.Tensor, cache) -> float:
    """Seconds of one decode forward; the cache is cropped back so every step is alike."""
    start = time.perf_counter()
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    took = time.perf_counter() - start
    cache.crop(-1)   # drop the step just appended
    return took


def measure(layers: int, batch: int, n_rounds: int, triton_path: bool) -> dict:
    """Median host µs of one decode step, base and patched, interleaved; per launch group."""
    import prism_fast
    from prism_fast.kernels import gated_lora_launch

    compiled = install_noop_triton()
    if triton_path:   # every launch through JITFunction.run: the direct launch switched off
        gated_lora_launch.DIRECT_LAUNCH = False
    from transformers import DynamicCache

    base, patched = _models(layers, torch.float32)
    prism_fast.set_routes(patched, torch.zeros(batch, dtype=torch.int32))   # all open
    prompt = torch.randint(3, 128, (batch, 8))
    step = torch.randint(3, 128, (batch, 1))
    caches = []
    with torch.inference_mode():
        for model in (base, patched):
            cache = DynamicCache()
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            caches.append(cache)
        for _ in range(20):   # warm-up: plans, compiled stand-ins, allocator
            for model, cache in zip((base, patched), caches):
                _decode_step(model, step, cache)
        n0 = sum(k.launches for k in compiled)
        _decode_step(patched, step, caches[1])
        launches = sum(k.launches for k in compiled) - n0
        times = timing.rounds({name: functools.partial(_decode_step, model, step, cache)
                               for name, model, cache in (("base", base, caches[0]),
                                                          ("patched", patched, caches[1]))},
                              n_rounds, warmup=0)
    groups = 4 * (layers - 1)
    base_us = statistics.median(times["base"]) * 1e6
    patched_us = statistics.median(times["patched"]) * 1e6
    # Each round times both forwards back to back: the median of the paired differences is
    # less moved by other processes on a shared machine than a difference of medians.
    diffs = [(p - b) * 1e6 / groups for b, p in zip(times["base"], times["patched"])]
    q1, q2, q3 = statistics.quantiles(diffs, n=4)
    return dict(layers=layers, batch=batch, groups=groups, launches=launches, base_us=base_us,
                patched_us=patched_us, per_group_us=q2, per_group_iqr=(q1, q3),
                path="Triton JITFunction.run" if triton_path else "cached direct launch",
                compiled=len(compiled))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --host",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--triton-path", action="store_true",
                        help="launch through JITFunction.run every time (no direct launch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.layers, args.batch, args.rounds, args.triton_path)
    print(f"CPU host time (not a GPU result), triton {triton.__version__}, torch "
          f"{torch.__version__}: {res['path']}")
    print(f"  {res['layers']}-layer Llama, B = {res['batch']}, {res['groups']} launch groups, "
          f"{res['launches']} launches per decode step")
    print(f"  base {res['base_us']:.0f} µs, patched {res['patched_us']:.0f} µs per step: "
          f"{res['per_group_us']:.1f} µs per launch group (interquartile "
          f"{res['per_group_iqr'][0]:.1f}–{res['per_group_iqr'][1]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
