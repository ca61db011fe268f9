"""Files jaxprobe writes: crash-safe writes (every file appears whole or not at all: a temp name,
fsync, rename, so a killed run never leaves a half-written shard that looks complete) and
`jaxprobe_home()`, the folder jaxprobe keeps its own files in (converted models, XLA's cache)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxprobe import processes
from jaxprobe.errors import UserError


def jaxprobe_home() -> Path:
    """$JAXPROBE_HOME, default ~/.cache/jaxprobe ($JAXPROBE_CACHE, its old name, still works)."""
    home = os.environ.get("JAXPROBE_HOME") or os.environ.get("JAXPROBE_CACHE")
    return Path(home) if home else Path.home() / ".cache" / "jaxprobe"


def _one_line(error: OSError, folder: Path) -> Exception:
    """A full disk, a read-only folder or a denied write as one line naming the folder; other OS
    errors unchanged."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
    if error.errno in reasons:
        return UserError(f"cannot write in {folder}: {reasons[error.errno]} (files written before are intact)")
    return error


def _atomic_write(path: Path, fill: Callable[[str], None]) -> None:
    """`fill(tmp)` writes the whole content to a temp file beside `path`, which then replaces
    `path` in one rename: `path` is whole or absent, never half-written. Only the writing process
    writes (see jaxprobe/processes.py); in the others this does nothing."""
    if not processes.is_writer():
        return
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; ours are ordinary data files
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _one_line(e, path.parent) from None
        raise


def _bytes(write: Callable) -> Callable[[str], None]:
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
    return fill


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write one .npy file atomically (never pickled: object arrays are refused)."""
    array = np.asarray(array)
    _atomic_write(Path(path), _bytes(lambda f: np.save(f, array, allow_pickle=False)))


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, pretty-printed and with a trailing newline."""
    data = (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode()
    _atomic_write(Path(path), _bytes(lambda f: f.write(data)))


def save_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(Path(path), _bytes(lambda f: f.write(text.encode())))


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


# ---------------------------------------------------------------- output folders

LOCK = ".jaxprobe.lock"


def _first_difference(stored: dict, asked: dict) -> str:
    for key in [*asked, *(k for k in stored if k not in asked)]:
        if stored.get(key) != asked.get(key):
            show = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."  # noqa: E731
            return f"{key}: stored {show(stored.get(key))}, asked {show(asked.get(key))}"
    return "format"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(out: Path) -> None:
    """Claim `out` for this process: a lock file holding our pid, taken over only from a dead
    owner, removed when this process exits."""
    import atexit

    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner == os.getpid():
                return
            if owner and _pid_alive(owner):
                raise UserError(f"{out} is being written by another jaxprobe run (pid {owner}); wait "
                                "for it to finish or choose another --out") from None
            path.unlink(missing_ok=True)  # its owner died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: path.unlink(missing_ok=True) if path.is_file()
                        and path.read_text().strip() == str(os.getpid()) else None)
        return


def claim_folder(out: str | os.PathLike, marker: str, settings: dict, *, what: str,
                 format: str | None = None) -> dict | None:
    """The one output-folder guard. Refuses a file, a folder holding anything but an earlier run
    of the same settings, and a folder another live jaxprobe process is writing; then claims it.
    Returns the stored marker (a JSON object whose "settings" equal `settings`) when resuming,
    None for a new or empty folder; the caller writes the marker itself."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    path = out / marker
    stored = None
    if path.is_file():
        stored = load_json_object(path)
        if format is not None and stored.get("format") != format:
            raise UserError(f"{path} was not written by jaxprobe {what} (format "
                            f"{stored.get('format')!r}, expected {format!r})")
        if not isinstance(stored.get("settings"), dict):
            raise UserError(f"{path}: has no settings object; not written by jaxprobe {what}")
        if stored["settings"] != settings:
            raise UserError(f"{out} holds {what} made with other settings "
                            f"({_first_difference(stored['settings'], settings)}); choose another "
                            "--out (nothing was changed)")
    elif out.is_dir() and any(not is_leftover(p) for p in out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no {marker}; refusing to write into "
                        "it (choose an empty or new folder)")
    _claim(out)
    return stored


def claim_empty_folder(out: str | os.PathLike, *, allowed: tuple[str, ...] = (), what: str) -> None:
    """Claim `out` for a writer that has no settings marker (conversion): refuses a file and a
    folder holding anything but the names in `allowed` (what the same writer left when killed)."""
    check_empty_folder(out, allowed=allowed, what=what)
    _claim(Path(out))


def check_empty_folder(out: str | os.PathLike, *, allowed: tuple[str, ...] = (), what: str) -> None:
    """`claim_empty_folder`'s checks alone: nothing is created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in allowed and not is_leftover(p))
        if others:
            raise UserError(f"--out {out} holds {others[0]!r}, which is not {what}; choose an empty "
                            "or new folder (nothing was changed)")


def release_folder(out: str | os.PathLike) -> None:
    """Give up this process's claim on `out` before it exits (a finished conversion)."""
    path = Path(out) / LOCK
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def _claim(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        _lock(out)
    except OSError as e:
        raise _one_line(e, out) from None
    for tmp in out.rglob(".*.tmp"):  # a killed run's half-written files: never part of a result
        tmp.unlink(missing_ok=True)


def is_leftover(path: Path) -> bool:
    """What a killed jaxprobe run leaves in a folder it had not yet written a file to."""
    return path.name == LOCK or (path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp"))


def load_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from a file jaxprobe wrote, or one line naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------- resumable sharded arrays


def remove_stale_temp_files(folder: Path) -> None:
    """Temp files of a run that died mid-write (`.NAME.XXXX.tmp`): never part of a result."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def load_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    """np.load that turns a missing, truncated or corrupt file into one line naming it."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: truncated or corrupt .npy file ({str(e).splitlines()[0]}); "
                        "delete it and rerun the command that wrote it") from None


def first_non_finite_row(array: np.ndarray, chunk_rows: int = 256) -> int | None:
    """Index of the first row (axis 0) holding NaN or inf, or None; reads a memmap in chunks."""
    for start in range(0, len(array), chunk_rows):
        ok = np.isfinite(np.asarray(array[start:start + chunk_rows])).reshape(
            min(chunk_rows, len(array) - start), -1).all(axis=1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


class ShardedArrayWriter:
    """The one resumable writer of a float32 [n_rows, *row_shape] array, used by `extract` and
    `evaluate`: rows are computed in fixed shards of `shard_size` (the unit a killed run resumes
    from; a shard's rows never depend on where a run stopped), each saved atomically under
    `folder/shards/`, then merged into one .npy through a temp file and a rename."""

    def __init__(self, folder: str | os.PathLike, n_rows: int, row_shape: tuple[int, ...], shard_size: int):
        self.folder = Path(folder)
        self.shape = (int(n_rows), *map(int, row_shape))
        self.shard_size = int(shard_size)
        self.slices = [slice(start, min(n_rows, start + shard_size)) for start in range(0, n_rows, shard_size)]

    def shard_path(self, index: int) -> Path:
        return self.folder / "shards" / f"part-{index:05d}.npy"

    def _checked(self, index: int) -> np.ndarray:
        """A finished shard, refused in one line if its shape, dtype or values are wrong."""
        path = self.shard_path(index)
        rows = self.slices[index]
        shard = load_npy(path, mmap=True)
        expected = (rows.stop - rows.start, *self.shape[1:])
        if shard.shape != expected or shard.dtype != np.float32:
            raise UserError(f"{path}: shard holds {shard.dtype}{list(shard.shape)}, expected "
                            f"float32{list(expected)}; delete it and rerun to recompute it")
        bad = first_non_finite_row(shard)
        if bad is not None:
            raise UserError(f"{path}: row {rows.start + bad} holds NaN or inf; delete the shard and "
                            "rerun to recompute it")
        return shard

    def pending(self) -> list[int]:
        """Indices of the shards still to compute, as the writing process sees them (the others
        compute the same ones); the finished ones are checked on the way."""
        def todo() -> list[int]:
            missing = []
            for index in range(len(self.slices)):
                if self.shard_path(index).is_file():
                    self._checked(index)  # refuses a damaged shard in one line
                else:
                    missing.append(index)
            return missing

        return processes.decided(todo)

    def write(self, index: int, rows: np.ndarray) -> None:
        save_npy(self.shard_path(index), np.asarray(rows, dtype=np.float32))

    def merge(self, path: str | os.PathLike) -> None:
        """All shards into `path` (in this folder's file system): checked first, written to a temp
        file beside it and renamed, so `path` is whole or absent; then the shards are removed."""
        if not processes.is_writer():
            return
        path = Path(path)
        remove_stale_temp_files(path.parent)
        shards = [self._checked(i) for i in range(len(self.slices))]
        needed = int(np.prod(self.shape)) * 4 + 4096
        if free_bytes(path.parent) < needed:
            raise UserError(f"cannot merge into {path}: it needs {needed / 2**20:,.1f} MiB and "
                            f"{path.parent} has {free_bytes(path.parent) / 2**20:,.1f} MiB free "
                            "(the shards are intact: free space and rerun)")

        def fill(tmp: str) -> None:
            merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.shape)
            for rows, shard in zip(self.slices, shards):
                merged[rows] = shard
            merged.flush()

        _atomic_write(path, fill)
        shutil.rmtree(self.folder / "shards", ignore_errors=True)
