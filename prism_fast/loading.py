"""Loading personas: official PRISM output directories, PEFT adapter directories, PeftModels.

A PRISM output directory (github.com/zizhao-hu/PRISM, prism/run_gated_lora.py) holds
    persona_expert/adapter_config.json, persona_expert/adapter_model.safetensors  (PEFT LoRA)
    gate.pt                  state dict: gate.0.weight [256, H], gate.0.bias [256],
                                         gate.3.weight [2, 256], gate.3.bias [2]
    gated_lora_config.json   training metadata
Every checkpoint is read with safetensors or `torch.load(..., weights_only=True)`: no pickled
code runs.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prism_fast.adapter_config import check_numbers, is_target, match_pattern, targets_module

PRISM_ADAPTER_SUBDIR = "persona_expert"
GATE_FILE = "gate.pt"
PRISM_CONFIG_FILE = "gated_lora_config.json"
GATE_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")


@dataclass
class LoraWeights:
    """One persona's LoRA on one module: delta = scaling · B A x."""

    a: torch.Tensor        # [r, K]
    b: torch.Tensor        # [N, r]
    scaling: float


@dataclass
class Persona:
    """One LoRA adapter: module path (relative to the causal-LM root) → its weights."""

    name: str
    modules: dict[str, LoraWeights]
    source: str
    layers_to_transform: list[int] | None = None   # adapter_config.json's, if it names layers
    made_for: str | None = None                    # adapter_config's base_model_name_or_path
    model_layers: int | None = None                # the layer count of the model it was made for



@dataclass
class PrismAdapter:
    """What `load_prism` returns and `patch_model(adapter=...)` accepts."""

    personas: list[Persona]
    gate: dict[str, torch.Tensor] | None = None     # keys "0.weight", "0.bias", "3.weight", "3.bias"
    prism_config: dict = field(default_factory=dict)
    gated_sources: list[str] = field(default_factory=list)  # PRISM dirs whose gates were left out


# ---- files ------------------------------------------------------------------------------------


def _check_readable(path: Path) -> None:
    """A file that exists but cannot be read is named as such (PEFT and safetensors report it
    as "No such file"; Path.is_file() as missing where its folder cannot be searched)."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError as e:
        raise PermissionError(f"{path.name}: {path} exists but cannot be read (permission "
                              f"denied)") from e
    except OSError as e:
        if not path.is_file():
            raise FileNotFoundError(f"{path.name}: expected a file at {path}, found none") from e
        raise


def _read_json(path: Path) -> dict:
    _check_readable(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path.name}: expected valid JSON in {path}, got: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object in {path}, got a JSON "
                         f"{type(data).__name__}")
    return data


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    _check_readable(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for a corrupt file
        raise ValueError(f"{path.name}: could not read {path} as a checkpoint: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path.name}: expected a state dict of tensors in {path}, got "
                         f"{type(state).__name__}")
    return state


def load_gate(gate: str | Path | dict) -> dict[str, torch.Tensor]:
    """A gate.pt path or state dict → {"0.weight", "0.bias", "3.weight", "3.bias"} (shapes checked
    against each other here; against the model in patch_model)."""
    if isinstance(gate, (str, Path)):
        path = Path(gate)
        if not path.is_file():
            raise FileNotFoundError(f"gate: expected a gate.pt file at {path}, found none")
        state = _load_tensors(path)
    elif isinstance(gate, dict):
        state = gate
    else:
        raise TypeError(f"gate: expected a path to gate.pt or a state dict, got "
                        f"{type(gate).__name__}")
    state = {k.removeprefix("gate."): v for k, v in state.items()}
    missing = [k for k in GATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"gate: expected keys {['gate.' + k for k in GATE_KEYS]}, missing "
                         f"{['gate.' + k for k in missing]} (got {sorted(state)})")
    w1, b1, w2, b2 = (state[k] for k in GATE_KEYS)
    if w1.dim() != 2 or b1.shape != (w1.shape[0],) or w2.dim() != 2 \
            or w2.shape[1] != w1.shape[0] or b2.shape != (w2.shape[0],):
        raise ValueError(f"gate: expected gate.0.weight (D, H), gate.0.bias (D,), gate.3.weight "
                         f"(C, D), gate.3.bias (C,), got {[tuple(t.shape) for t in (w1, b1, w2, b2)]}")
    return {k: state[k] for k in GATE_KEYS}


# ---- PEFT adapters ----------------------------------------------------------------------------


def _read_adapter(path: Path, raw: dict, weights_file: Path,
                  use_peft: bool) -> tuple[dict, dict[str, torch.Tensor], object, object]:
    """(adapter config, adapter weights, pattern lookup, whether PEFT targets a module) of a
    PEFT directory whose files exist.

    With peft installed, PEFT reads them itself (LoraConfig.from_pretrained fills in its own
    defaults, load_peft_weights its own file formats), so its format cannot drift from ours;
    without it, the config is the JSON already read (`raw`) and `weights_file` is read here."""
    if use_peft:
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists
        from peft.utils import load_peft_weights
        from peft.utils.other import get_pattern_key

        try:
            lora_config = LoraConfig.from_pretrained(str(path))
        except (TypeError, ValueError) as e:
            raise ValueError(f"adapter_config.json: PEFT could not read {path}: {e}") from e
        config = lora_config.to_dict()
        _check_readable(weights_file)
        try:
            weights = load_peft_weights(str(path), device="cpu")
        except Exception as e:  # safetensors and torch raise many types for a corrupt file
            raise ValueError(f"adapter_model: could not read the weights in {path} as a "
                             f"checkpoint: {e}") from e

        def lookup(patterns: dict, module: str, default):
            key = get_pattern_key(patterns.keys(), module)
            return patterns.get(key, default)

        def targeted(module: str) -> bool:
            return is_target(config, module,
                              lambda: check_target_module_exists(lora_config, module))

        return config, weights, lookup, targeted
    return raw, _load_tensors(weights_file), match_pattern, \
        lambda module: is_target(raw, module, lambda: targets_module(raw, module))


def _peft_installed() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def load_peft_dir(path: str | Path, name: str | None = None,
                  use_peft: bool | None = None) -> Persona:
    """A PEFT LoRA adapter directory → Persona (module paths relative to the causal-LM root).
    use_peft: read it with peft's own loaders (default: where peft is installed)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter: expected a PEFT adapter directory at {path}, found none")
    raw = _read_json(path / "adapter_config.json")   # our messages for missing / invalid JSON
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter: expected a LoRA adapter (peft_type LORA) in {path}, got "
                         f"{raw.get('peft_type')}")
    weights_file = next((path / f for f in ("adapter_model.safetensors", "adapter_model.bin")
                         if (path / f).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"adapter: expected adapter_model.safetensors in {path}, found "
                                f"none")
    config, weights, lookup, targeted = _read_adapter(
        path, raw, weights_file, _peft_installed() if use_peft is None else use_peft)
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"adapter: {flag}=True in {path} is not supported by the gated LoRA "
                             f"kernels (expected plain LoRA)")
    if config.get("target_parameters"):
        raise ValueError(f"adapter: target_parameters {config['target_parameters']} in {path} "
                         f"puts LoRA on raw parameters (e.g. fused MoE experts); only nn.Linear "
                         f"targets are supported")
    if config.get("modules_to_save"):
        raise ValueError(f"adapter: modules_to_save {config['modules_to_save']} in {path} trains "
                         f"full modules, which a per-row gate cannot route; not supported")
    r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    check_numbers(path, "r", [r0, *rank_pattern.values()], int)
    check_numbers(path, "lora_alpha", [alpha0, *alpha_pattern.values()], (int, float))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if m is None:
            raise ValueError(f"adapter: unexpected tensor {key!r} in {path} (expected only "
                             f"lora_A / lora_B weights)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    # PEFT loads only the modules its config targets and ignores other keys of the file.
    ignored = sorted(m for m in pairs if not targeted(m))
    if ignored:
        warnings.warn(f"adapter: {path} holds LoRA weights for modules its adapter_config.json "
                      f"does not target; ignored, as PEFT does: {', '.join(ignored)}",
                      stacklevel=3)
    modules = {}
    for module, ab in pairs.items():
        if module in ignored:
            continue
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter: {module} in {path} has lora_{''.join(ab)} without its "
                             f"pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter: {module} in {path}: expected lora_A (r, K) and lora_B "
                             f"(N, r), got {tuple(a.shape)} and {tuple(b.shape)}")
        r = lookup(rank_pattern, module, r0)
        alpha = lookup(alpha_pattern, module, alpha0)
        if r != a.shape[0]:
            raise ValueError(f"adapter: {module} in {path}: config says rank {r}, weights have "
                             f"{a.shape[0]}")
        # PEFT's LoraLayer.update_layer: alpha / r, or alpha / √r with rsLoRA.
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = LoraWeights(a=a, b=b, scaling=scaling)
    if not modules:
        raise ValueError(f"adapter: no LoRA weights found in {path}")
    layers = config.get("layers_to_transform")
    return Persona(name=name or path.name, modules=modules, source=str(path),
                   layers_to_transform=[layers] if isinstance(layers, int) else layers,
                   made_for=config.get("base_model_name_or_path"))


def load_prism(path: str | Path | list) -> PrismAdapter:
    """A PRISM output directory, a plain PEFT adapter directory, or a list of those (several
    personas, persona i = adapter i). A PRISM directory brings its gate.pt (a missing one is a
    FileNotFoundError: use its persona_expert/ subdirectory for the adapter alone). Several
    PRISM gates cannot be merged into one L + 1 class gate: pass that gate to
    `patch_model(gate=...)`, or use the persona_expert/ subdirectories and `set_routes`."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise ValueError("adapter: expected at least one adapter directory, got an empty list")
        odd = next((i for i, p in enumerate(path) if not isinstance(p, (str, Path))), None)
        if odd is not None:
            raise TypeError(f"adapter[{odd}]: expected a directory path (str or Path), got "
                            f"{type(path[odd]).__name__}")
        loaded = [load_prism(p) for p in path]
        if len(loaded) == 1:
            return loaded[0]
        return PrismAdapter(personas=[p for a in loaded for p in a.personas],
                            gated_sources=[str(p) for p, a in zip(path, loaded) if a.gate])
    if not isinstance(path, (str, Path)):
        hint = " (for several personas pass a list of directories, persona i = adapter i, " \
            "e.g. list(adapters.values()))" if isinstance(path, dict) else ""
        raise TypeError(f"adapter: expected a directory path, a list of them, or a PrismAdapter, "
                        f"got {type(path).__name__}{hint}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter: expected a PRISM output or PEFT adapter directory at "
                                f"{root}, found none")
    if (root / "adapter_config.json").is_file():
        return PrismAdapter(personas=[load_peft_dir(root)])
    if not (root / PRISM_ADAPTER_SUBDIR).is_dir():
        raise FileNotFoundError(f"adapter: expected {root}/adapter_config.json (PEFT) or "
                                f"{root}/{PRISM_ADAPTER_SUBDIR}/ (PRISM output), found neither")
    persona = load_peft_dir(root / PRISM_ADAPTER_SUBDIR, name=root.name)
    # PRISM trains LoRA on layers 1…N−1 of its N-layer model (run_gated_lora.py:
    # layers_to_transform = range(1, N)), so such a list names the model's layer count.
    layers = persona.layers_to_transform
    if layers and layers == list(range(1, len(layers) + 1)):
        persona.model_layers = len(layers) + 1
    if not (root / GATE_FILE).exists():
        raise FileNotFoundError(f"gate: expected {root / GATE_FILE} in the PRISM output directory, "
                                f"found none (for the adapter without its gate, pass "
                                f"{root / PRISM_ADAPTER_SUBDIR})")
    gate = load_gate(root / GATE_FILE)
    config = _read_json(root / PRISM_CONFIG_FILE) if (root / PRISM_CONFIG_FILE).exists() else {}
    return PrismAdapter(personas=[persona], gate=gate, prism_config=config)
