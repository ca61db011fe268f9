"""Crash-safe file writes: every file appears whole or not at all (write to a temp name, fsync,
rename), so a killed run never leaves a half-written shard that looks complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes files owner-only; ours are ordinary data files
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one .npy file atomically (never pickled: object arrays are refused)."""
    array = np.asarray(array)
    _atomic_write(Path(path), lambda f: np.save(f, array, allow_pickle=False))


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed and with a trailing newline."""
    data = (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def save_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def load_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
