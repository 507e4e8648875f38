"""The trainer's output folder, written atomically: checked before any work starts, filled in a
temporary sibling folder, renamed into place only when complete. An interrupted run leaves the
previous output as it was (never a new gate.pt beside an old adapter), and an existing output
is replaced only when the caller asks to overwrite."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# What marks a folder as a training output (official layout).
OUTPUT_FILES = ("gate.pt", "gated_lora_config.json", "persona_expert")


def is_output(path: Path) -> bool:
    return any((path / name).exists() for name in OUTPUT_FILES)


def check(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The output path, if it can be written: a new or empty folder, or with `overwrite` a
    previous training output; its parent is created (FileExistsError / PermissionError /
    NotADirectoryError naming the path otherwise)."""
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir: expected a folder, got the file {out}")
    if out.is_dir() and any(out.iterdir()):
        if not is_output(out):
            raise FileExistsError(f"output_dir: {out} is a folder with other files, not a "
                                  f"training output (no {' / '.join(OUTPUT_FILES)}); expected "
                                  f"a new or empty folder")
        if not overwrite:
            raise FileExistsError(f"output_dir: {out} already holds a training output "
                                  f"(gate.pt, persona_expert/); pass overwrite=True "
                                  f"(--overwrite) to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(e.errno, f"output_dir: cannot create the folder {out.parent} "
                               f"({e.strerror})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir: cannot write in {out.parent} (permission denied)")
    return out


def start(out: Path) -> Path:
    """A fresh temporary folder beside `out`, where the run writes everything."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise type(e)(e.errno, f"output_dir: cannot write in {out.parent} ({e.strerror})") from None


def finish(tmp: Path, out: Path) -> Path:
    """Move the complete output into place, replacing a previous one (checked by `check`)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def abandon(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
