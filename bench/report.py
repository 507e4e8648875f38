"""The benchmarks' one report writer: run metadata, markdown tables, and results written
atomically (a complete JSON / markdown / plot or none)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def git_info() -> tuple[str, bool]:
    """(HEAD's sha, whether the tree has changes), or ("unknown", False) outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return sha, dirty


def version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def run_meta(command: str, argv: list[str] | None) -> dict:
    """What every results file starts with: date, versions, git, threads, the command line."""
    sha, dirty = git_info()
    return dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=version("triton"), transformers=version("transformers"),
                peft=version("peft"), python=platform.python_version(), git_sha=sha,
                git_dirty=dirty,
                command=" ".join([command, *(argv if argv is not None else sys.argv[1:])]))


def check_writable(out_dir: Path) -> None:
    """--out: created and written to once before anything is measured (SystemExit naming it)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise SystemExit(f"--out: cannot write in {out_dir} ({e.strerror or e})") from None


# ---- markdown -----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def num(v: float) -> str:
    """Three significant digits without exponents: 12345 → 12345, 9.126 → 9.13, 0.0123."""
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def times(ratio: float) -> str:
    """A speed-up or a size ratio: 1.23×, 45×."""
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.0f}×"


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# ---- files --------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o644)     # a results file, not the temporary file's private 0600
    os.replace(tmp.name, path)


def suffixed(stem: Path, ext: str) -> Path:
    """stem + ext, also where the stem has a dot (`decode-floor-qwen2.5-7b`: with_suffix would
    replace ".5-7b")."""
    return stem.with_name(stem.name + ext)


def write(stem: Path, data: dict, markdown: str | None = None,
          plot: Callable[[Path], bool] | None = None) -> list[Path]:
    """stem.json (data), stem.md (markdown) and stem.png (`plot(path)`, False: nothing to plot;
    left out without matplotlib), each written whole or not at all. Returns the paths written."""
    written = [suffixed(stem, ".json")]
    write_atomic(written[0], json.dumps(data, indent=1, default=str) + "\n")
    if markdown is not None:
        written.append(suffixed(stem, ".md"))
        write_atomic(written[-1], markdown)
    if plot is not None:
        png, tmp = suffixed(stem, ".png"), suffixed(stem, ".tmp.png")
        try:
            if plot(tmp):
                os.replace(tmp, png)
                written.append(png)
        except ImportError:
            print("plot skipped: matplotlib is not installed", file=sys.stderr, flush=True)
        finally:
            tmp.unlink(missing_ok=True)
    return written


def save_figure(fig, path: Path, dpi: int = 110) -> bool:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return True


def pyplot():
    """matplotlib.pyplot with the file-only backend (ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
