"""The one door to the kernels: every gated LoRA, gate and distillation-loss evaluation goes
through here, one file per op holding its dispatch and its PyTorch path.

- gated_lora.py: `gated_lora_group` (the patched layers' entry) and the public
  `gated_lora_linear`; its PyTorch path gated_lora_torch.py (and gated_lora_fused_base.py,
  the CPU GEMM of an all-open group; gated_lora_merged.py, merge_open's merged copies).
- prism_gate.py: `gate_routes` (the routing state's entry) and the public `prism_gate`.
- topk_distill.py: the public `topk_distill_loss` and its PyTorch path.
- backend.py: `use_triton`, the one reading of a backend name, and `pick`, the one rule that
  chooses an op's implementation (the Triton launcher in eager mode, its registered
  `torch.ops.prism_fast.*` op under torch.compile, where the launcher is opaque, or the
  PyTorch path).

The Triton launchers, their argument checks and the registered ops live in kernels/;
`prism_fast.reference` stays the oracle of every path.
"""

# The public functions keep their names here: `prism_fast.ops.prism_gate` is the function (it
# was before ops became a package), its module is reached as sys.modules["prism_fast.ops.prism_gate"].
from prism_fast.kernels.gated_lora import GatedLoraLauncher
from prism_fast.ops.backend import BACKENDS, pick, use_triton
from prism_fast.ops.gated_lora import gated_lora_group, gated_lora_linear
from prism_fast.ops.gated_lora_torch import Lane, Prepared, gated_lora_linear_torch
from prism_fast.ops.prism_gate import gate_routes, prism_gate
from prism_fast.ops.topk_distill import REDUCTIONS, topk_distill_loss

__all__ = ["BACKENDS", "REDUCTIONS", "GatedLoraLauncher", "Lane", "Prepared", "gate_routes",
           "gated_lora_group", "gated_lora_linear", "gated_lora_linear_torch", "pick",
           "prism_gate", "topk_distill_loss", "use_triton"]
