"""Crash-safe writes: a file or a directory either appears complete or not at all.

Files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on POSIX).
Directories are built in a ``NAME.partial-XXXX`` sibling and renamed when complete, so an
interrupted run leaves at most a directory whose name says it is partial, never one that looks done.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any training) when ``out`` exists and may not be replaced."""
    p = Path(out)
    if p.exists() and not overwrite:
        raise ConfigError(f"--out {p}: already exists; choose another directory or pass --overwrite")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p}: exists and is not a directory")
    return p


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a partial sibling and move it to ``out`` only when the block completes.

    With ``overwrite`` an existing ``out`` is replaced (moved aside first, removed after the swap).
    On an exception the partial directory is removed and ``out`` is left as it was.
    """
    final = check_output_dir(out, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
