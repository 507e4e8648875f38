"""Layers you can see: kernels/ imports only torch, triton and the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "triton", "__future__", "functools", "json", "math", "os", "pathlib",
           "typing", "dataclasses", "weakref"}


def test_kernels_import_only_torch_triton_stdlib():
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:          # relative import inside kernels/
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ALLOWED, f"{path.name} imports {name}"


def test_importing_kernels_pulls_in_neither_transformers_nor_peft():
    code = ("import sys, prism_fast.kernels; "
            "bad = [m for m in ('transformers', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_is_installed_under_prism_fast_not_top_level():
    import prism_fast.kernels

    # A namespace package (no __init__.py: see setup.py), found in the checkout's kernels/.
    paths = [Path(p).resolve() for p in prism_fast.kernels.__path__]
    assert paths == [(ROOT / "kernels").resolve()]
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py would shadow Hugging Face's `kernels` when the checkout is on sys.path"


def test_setup_installs_every_package_of_prism_fast():
    # A subpackage missing from setup.py's list is absent from a wheel: its imports fail only
    # after a real install, never in the checkout.
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(ast.literal_eval(k.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Call) for k in node.keywords if k.arg == "packages")
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "prism_fast").rglob("__init__.py")}
    assert found <= set(listed), f"setup.py packages miss {sorted(found - set(listed))}"


# Run from the repository root, where the README runs pytest and `python -m bench`: the checkout
# is on sys.path there, ahead of site-packages.
_FROM_ROOT = """
import importlib.metadata, pathlib, sys
import kernels
dist = importlib.metadata.distribution("kernels")
assert pathlib.Path(kernels.__file__).resolve().is_relative_to(
    pathlib.Path(dist.locate_file("")).resolve()), ("shadowed", kernels.__path__)
import transformers.activations
import torch
import prism_fast
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
model = LlamaForCausalLM(config).eval()
from peft import LoraConfig, get_peft_model
lora = LoraConfig(r=4, lora_alpha=8, layers_to_transform=[1],
                  target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
pm = get_peft_model(model, lora, adapter_name="persona_expert")
prism_fast.patch_model(pm)
ids = torch.randint(0, 50, (2, 6))
out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                  do_sample=False)
assert out.shape == (2, 9), out.shape
print("ok", prism_fast.get_routes(pm).tolist())
"""


def test_readme_commands_work_from_the_repository_root_beside_hf_kernels():
    """transformers ≥ 5.25 imports Hugging Face's `kernels`; the checkout's kernels/ must not
    shadow it. A fresh interpreter, working directory = the repository root, `-c` (so that '' —
    the root — leads sys.path, as for pytest and `python -m bench`)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` is not installed: pip install -e '.[dev]' "
                    "installs it (transformers ≥ 5.25 requires it)")
    done = subprocess.run([sys.executable, "-c", _FROM_ROOT], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


# Layers between the folders: tests/ stands alone (never imports bench/), the library imports
# neither bench/ nor tests/, and no first-party modules import each other in a cycle. Every
# import counts, also those inside functions: a lazy import is still a dependency.
FIRST_PARTY = ("prism_fast", "kernels", "bench", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":          # installed and imported as prism_fast.kernels
        parts.insert(0, "prism_fast")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _first_party_files() -> dict[str, Path]:
    files = {}
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.relative_to(ROOT).parts[:2] == ("prism_fast", "kernels"):
                continue               # the link to kernels/, read there
            files[_module_name(path)] = path
    return files


def _imported_names(name: str, path: Path) -> set[str]:
    """Absolute dotted names `path` imports: `from a import b` gives a.b (a module or not)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:             # relative: up from this module's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_tests_never_import_bench_and_the_library_neither_bench_nor_tests():
    for name, path in _first_party_files().items():
        top = name.split(".")[0]
        banned = {"tests": ("bench",), "prism_fast": ("bench", "tests")}.get(top, ())
        for imported in _imported_names(name, path):
            assert imported.split(".")[0] not in banned, \
                f"{path.relative_to(ROOT)} imports {imported}"


def test_no_import_cycle_among_first_party_modules():
    files = _first_party_files()
    graph = {}
    for name, path in files.items():
        deps = set()
        for imported in _imported_names(name, path):
            while imported and imported not in files:   # `from a import f`: the module a
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        graph[name] = deps
    # Depth-first search: a module met again while still on the path closes a cycle.
    state: dict[str, int] = {}          # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
