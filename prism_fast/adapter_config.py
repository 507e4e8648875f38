"""What an adapter_config.json says, read by hand where peft is not installed (the same rules
as PEFT's own, checked against them in tests/test_loading.py): rank/alpha patterns, which
modules the adapter targets, and its numbers' types."""

from __future__ import annotations

import re
from pathlib import Path


def match_pattern(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup (peft.utils.other.get_pattern_key): a key matches a
    module path suffix. Used where peft is not installed."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def is_target(config: dict, module: str, check) -> bool:
    """Whether PEFT puts this adapter's LoRA on `module` (a weights key's module path). Where
    the config cannot say without the model (no target_modules, "all-linear"), every module
    the weights hold counts."""
    targets = config.get("target_modules")
    if not targets or targets == "all-linear":
        return True
    return bool(check())   # PEFT's _ExcludedModule is falsy


def targets_module(config: dict, key: str) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists for a config dict, where peft is not
    installed: exclude_modules, target_modules (a regex or names), layers_to_transform."""
    exclude = config.get("exclude_modules")
    if exclude and (re.fullmatch(exclude, key) if isinstance(exclude, str)
                    else key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    matches = [re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key) for p in patterns] \
        or [re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)]
    match = next((m for m in matches if m is not None), None)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def check_numbers(path: Path, name: str, values: list, types) -> None:
    """r (and rank_pattern's values) positive integers, lora_alpha (and alpha_pattern's)
    numbers, as PEFT reads them; a string such as "8" is refused, not compared."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, types) or (name == "r" and v <= 0):
            kind = "a positive integer" if name == "r" else "a number"
            raise ValueError(f"adapter_config.json: {name} (and its pattern's values) expected "
                             f"{kind}, got {v!r} ({type(v).__name__}) in {path}")
