#!/usr/bin/env bash
# One GPU check for issue 4, in about 8 minutes, on a machine with torch, triton, transformers,
# peft (and optionally pytest-benchmark, matplotlib) but no network:
#   1. install the project (no dependencies, no build isolation: nothing is downloaded),
#   2. run the test suite compiled on the GPU (TRITON_INTERPRET=0),
#   3. run the full benchmark sweep under a time budget, so that it stops cleanly in time.
# Everything lands in one folder: gpu_check.log, bench.log, <GPU>-<yyyymmdd>.{json,md,png}
# (and tune.log + <GPU>.json with TUNE=1).
#
# Usage: bench/gpu_check.sh [OUT_DIR]        OUT_DIR defaults to $OUT, else ./gpu_check_out
# Environment: TOTAL_S (default 470) the whole budget in seconds; TEST_S (default 240) the tests'
# limit; TUNE=1 also runs bench/tune_gated_lora.py (TUNE_S seconds, default 120, taken from the
# sweep's share) and writes its table to OUT_DIR, not into kernels/configs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
start=$SECONDS
total="${TOTAL_S:-470}"
left() { echo $(( total - (SECONDS - start) )); }

# tests/conftest.py defaults TRITON_INTERPRET to 1 (the CPU interpreter) with setdefault: say 0
# explicitly so the kernels are compiled for the GPU.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

{
    echo "== gpu_check $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu_check.log"

echo "== install" | tee -a "$out/gpu_check.log"
if ! python -m pip install --no-deps --no-build-isolation -q -e . >>"$out/gpu_check.log" 2>&1; then
    # Seen with an old setuptools and no `wheel` package (no bdist_wheel for the editable
    # build): run from the source tree instead, with prism_fast.kernels linked to kernels/ as
    # setup.py's package_dir maps it. The link exists only in this scratch copy.
    echo "install FAILED: running from the source tree" | tee -a "$out/gpu_check.log"
    [ -e prism_fast/kernels ] || ln -s ../kernels prism_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

test_s="${TEST_S:-240}"
tests_start=$SECONDS
{
    echo "== GPU tests (compiled, TRITON_INTERPRET=0)"
    # First what only a GPU can check: the patched model compiled, graphed and sync-free, and
    # the kernels at Llama-like sizes.
    timeout "$test_s" python -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        tests/kernels/test_gated_lora.py::test_gpu_compiled \
        tests/kernels/test_prism_gate.py::test_gpu_compiled
    echo "GPU tests: exit code $? (124 = hit TEST_S)"
    # Then the whole kernel suite on cuda tensors (tests/kernels/conftest.py), in the time left:
    # ~630 kernel variants to compile. test_compile_sm90 needs no GPU (CI runs it); the
    # model-patching tests on CPU tensors need the interpreter and add nothing here.
    rest=$(( test_s - (SECONDS - tests_start) ))
    if [ "$rest" -gt 20 ]; then
        timeout "$rest" python -m pytest -q -p no:cacheprovider tests/kernels \
            tests/test_reference.py -k "not gpu_compiled" \
            --deselect tests/kernels/test_compile_sm90.py
        echo "kernel suite: exit code $? (124 = hit its $rest s)"
    fi
} 2>&1 | tee -a "$out/gpu_check.log"

if [ "${TUNE:-0}" = 1 ]; then
    tune_s="${TUNE_S:-120}"
    echo "== tune ($tune_s s)" | tee -a "$out/gpu_check.log"
    timeout $(( tune_s + 60 )) python -m bench.tune_gated_lora --time-budget "$tune_s" \
        --out "$out/$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))').json" \
        2>&1 | tee "$out/tune.log"
fi

# The sweep's own budget stops new measurements; `timeout` (SIGTERM: the partial results are
# still written) backs it up with 45 s for the case in flight and the files.
budget=$(( $(left) - 45 ))
if [ "$budget" -lt 60 ]; then
    echo "== only ${budget} s left for the sweep: running it anyway with a 60 s budget" \
        | tee -a "$out/gpu_check.log"
    budget=60
fi
echo "== sweep: python -m bench --full --time-budget $budget" | tee -a "$out/gpu_check.log"
timeout $(( budget + 45 )) python -m bench --full --out "$out" --time-budget "$budget" 2>&1 \
    | tee "$out/bench.log"
echo "== done in $(( SECONDS - start )) s: $out" | tee -a "$out/gpu_check.log"
