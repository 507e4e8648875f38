#!/usr/bin/env bash
# The GPU verdict of issue 9 in ≤ 300 s on an H100/H200 with torch, triton, transformers and
# peft preinstalled (no network). The kernel suite already runs on CPU in CI: not rerun here.
#   0. `import pytest` (the GPU tests need it), versions, install without dependencies
#   (a) the decode-path table (the per-op sweep's split / fused / coop providers, the opt-in
#       fused base kernel, fuse_base=True: base + LoRA in one launch, and prism_fast's own
#       choice) vs base F.linear, Llama-3-8B and Qwen2.5-7B groups, bf16, r = 16, all open,
#       M = 1, 8, 32, 64, graphed and eager, each checked against the reference  → paths/*
#   (b) the targets: per decoder layer (M = 1…64 all open / half / closed, prefill M = 4096;
#       graphed and eager) → layer/*; end to end (8 Llama-3-8B layers: eager and graphed
#       decode, all open / half / closed)                                   → e2e/*
#   (c) GPU-only tests: patched model compiled / graphed / sync-free, the all-closed graph
#       without LoRA launches, the cooperative kernel's barrier, Llama-sized kernels, the
#       fused base kernel compiled (mixed adapters and closed rows in one tile, vs float64)
#   (d) in the time left: prism_fast.tune on a Llama-3-8B-shaped 2-layer model (in the log)
# Every step has its own share of the budget and a `timeout`; the script stops itself at
# TOTAL_S (default 300). At most 8 files land in OUT_DIR, one folder deep:
#   gpu_check.log, paths/<GPU>-<date>.{json,md}, layer/<GPU>-<date>.{json,md,png},
#   e2e/decode-floor-llama3-8b-<GPU>.{json,md}
#
# Usage: bench/gpu_check.sh [OUT_DIR]        OUT_DIR defaults to $OUT, else ./gpu_check_out
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
log="$out/gpu_check.log"
start=$SECONDS
total="${TOTAL_S:-300}"
left() { echo $(( total - (SECONDS - start) )); }
# share S: the smaller of S seconds and what is left minus a reserve R for the later steps
share() { local s=$1 r=$2 l; l=$(( $(left) - r )); [ "$l" -lt "$s" ] && s=$l; [ "$s" -lt 1 ] && s=1; echo "$s"; }

# tests/conftest.py defaults TRITON_INTERPRET to 1 (the CPU interpreter) with setdefault: say 0
# explicitly so the kernels are compiled for the GPU.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

# First: pytest, which step (c) needs (checked before spending any GPU time).
have_pytest=$(python -c "import pytest" 2>/dev/null && echo 1 || echo 0)
{
    echo "== gpu_check $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null)"
    if [ "$have_pytest" = 1 ]; then echo "pytest: ok"; else
        echo "pytest: MISSING (step c will be skipped; pip install pytest)"; fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    python -c "import torch, triton, transformers, peft; print('torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$log"

echo "== install" | tee -a "$log"
if ! timeout 60 python -m pip install --no-deps --no-build-isolation -q -e . >>"$log" 2>&1; then
    # Seen with an old setuptools and no `wheel` package: run from the source tree instead
    # (prism_fast/kernels is a link to kernels/ in the checkout, as setup.py maps it).
    echo "install FAILED: running from the source tree" | tee -a "$log"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# (a) 95 s at most (+15 s for the case in flight), keeping 170 s for (b) and (c)
a_s=$(share 95 170)
echo "== (a) decode paths, budget ${a_s} s" | tee -a "$log"
timeout $(( a_s + 15 )) python -m bench --sweep --device cuda --quick --no-gate --no-plot \
    --shapes llama3-8b,qwen2.5-7b --projections qkv,o,gate_up,down --m 1,8,32,64 --share 1 \
    --rank 16 --adapters 1 --dtypes bf16 --modes graph,eager \
    --providers base,split,fused,coop,fused_base,prism_fast \
    --out "$out/paths" --time-budget "$a_s" 2>&1 | tee -a "$log"
echo "(a) exit code ${PIPESTATUS[0]} (124 = timeout), at $(( SECONDS - start )) s" | tee -a "$log"

# (b) 80 s at most, keeping 60 s for (c): per layer (graphed and eager), then end to end
b_s=$(share 40 115)
echo "== (b1) targets per decoder layer, budget ${b_s} s" | tee -a "$log"
timeout $(( b_s + 15 )) python -m bench --sweep --device cuda --quick --no-gate \
    --shapes llama3-8b --projections layer --m 1,8,32,64,4096 --share 1,0.5,0 --rank 16 \
    --adapters 1 --dtypes bf16 --modes graph,eager --providers base,prism_fast \
    --out "$out/layer" --time-budget "$b_s" 2>&1 | tee -a "$log"
echo "(b1) exit code ${PIPESTATUS[0]} (124 = timeout), at $(( SECONDS - start )) s" | tee -a "$log"
b_s=$(share 40 75)
echo "== (b2) targets end to end (8 Llama-3-8B layers), budget ${b_s} s" | tee -a "$log"
timeout $(( b_s + 15 )) python -m bench --e2e --device cuda --model llama3-8b --layers 8 \
    --modes eager,graph --providers base,prism_open,prism_half,prism_closed --rounds 3 \
    --out "$out/e2e" --time-budget "$b_s" 2>&1 | tee -a "$log"
echo "(b2) exit code ${PIPESTATUS[0]} (124 = timeout), at $(( SECONDS - start )) s" | tee -a "$log"

# (c) GPU-only tests, 60 s at most
c_s=$(share 60 5)
if [ "$have_pytest" = 1 ] && [ "$c_s" -gt 10 ]; then
    echo "== (c) GPU-only tests, ${c_s} s" | tee -a "$log"
    timeout "$c_s" python -m pytest -q -p no:cacheprovider \
        tests/kernels/test_gated_lora_launch.py::test_direct_launch_equals_tritons_launch_on_gpu \
        tests/test_gpu.py tests/test_graph_closed.py \
        tests/kernels/test_gated_lora_launch.py::test_coop_one_launch_on_gpu \
        tests/kernels/test_gated_lora.py::test_gpu_compiled \
        tests/kernels/test_prism_gate.py::test_gpu_compiled \
        tests/kernels/test_fused_base_lora.py::test_mixed_adapters_in_one_tile \
        2>&1 | tail -40 | tee -a "$log"
    echo "(c) exit code ${PIPESTATUS[0]} (124 = timeout), at $(( SECONDS - start )) s" \
        | tee -a "$log"
else
    echo "== (c) skipped (pytest: $have_pytest, ${c_s} s left)" | tee -a "$log"
fi

# (d) the tuner on the model's own groups, with what is left
d_s=$(share 60 5)
if [ "$d_s" -gt 15 ]; then
    echo "== (d) prism_fast.tune, ${d_s} s" | tee -a "$log"
    # its cache in a scratch folder: the choices are printed into the log
    PRISM_FAST_CACHE_DIR="$(mktemp -d)" timeout "$d_s" python - <<'EOF' 2>&1 | tee -a "$log"
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import prism_fast

# Llama-3-8B's layer shapes, 2 layers (LoRA on layer 1), a small vocabulary.
config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=1024)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
lora = LoraConfig(r=16, lora_alpha=32, layers_to_transform=[1],
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"])
model = prism_fast.patch_model(get_peft_model(model, lora, adapter_name="persona_expert"))
for attempt in ("first run", "second run (cache)"):
    t = time.monotonic()
    choices = prism_fast.tune(model)
    print(f"tune {attempt}: {time.monotonic() - t:.2f} s, choices {choices}")
EOF
else
    echo "== (d) skipped: ${d_s} s left" | tee -a "$log"
fi
echo "== done in $(( SECONDS - start )) s (budget ${total} s): $out" | tee -a "$log"
