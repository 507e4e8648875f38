"""Layers you can see: kernels/ imports only torch, triton and the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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

    # resolve(): bench/gpu_check.sh, where an install fails, links prism_fast/kernels → kernels
    assert Path(prism_fast.kernels.__file__).resolve().parent == (ROOT / "kernels").resolve()
