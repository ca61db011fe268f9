"""The activation store: one folder per (model, data sample, template, positions) extraction.

Layout of a store folder:
  manifest.json        what made it (model name + fingerprint, dataset, split, sample, template,
                       positions, dtype, layer convention, jaxprobe version) and whether it is complete
  labels.npy           int64 [n]
  sample_indices.npy   int64 [n]: each example's row in the source split
  prompts.jsonl        the exact prompt strings, one JSON string per line
  shards/shard-K.npy   float32 [shard_size, n_hook_points, d_model] while the run is going
  activations.npy      float32 [n, n_hook_points, d_model], consolidated at the end (memory-mapped
                       by `open_activations`); the shards are then removed

Resumability: shard K always holds examples [K*shard_size, (K+1)*shard_size) and is computed by one
call of the compute function, every file is written atomically, and a rerun with the same settings
skips the shards that exist. So a killed run continues from its last complete shard and ends with
arrays bit-identical to an uninterrupted run. A rerun with different settings is refused, so a
store never mixes two extractions. No pickle anywhere (the reference's pickles are read through
`jaxprobe.refpickle`, which rebuilds only tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxprobe import processes
from jaxprobe.errors import UserError
from jaxprobe.files import (
    ShardedArrayWriter,
    claim_folder,
    first_non_finite_row,
    load_json_object,
    load_npy,
    save_json,
    save_npy,
    save_text,
)

STORE_FORMAT = "jaxprobe-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
SAMPLE_INDICES = "sample_indices.npy"
PROMPTS = "prompts.jsonl"
SHARD_DIR = "shards"
ACTIVATIONS = "activations.npy"

LAYER_CONVENTION = (
    "axis 1 index i is hook point i: 0 = token embeddings, i >= 1 = residual stream after block "
    "i-1 (HF hidden_states[i], without the final norm); the reference's `layers.N` is hook point N+1")


def sha256_strings(strings: Sequence[str]) -> str:
    """Order-sensitive hash of a list of strings (length-prefixed, so no two lists collide)."""
    h = hashlib.sha256()
    for s in strings:
        data = s.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()


def _normalised(obj):
    """JSON round trip, so settings compare the same before and after being stored."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxprobe")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def write_store(out: str | os.PathLike, *, prompts: Sequence[str], labels: Sequence[int],
                sample_indices: Sequence[int], settings: dict, n_hook_points: int, d_model: int,
                compute: Callable[[list[str]], np.ndarray], shard_size: int = 32,
                token_counts: Sequence[int] | None = None, describe: dict | None = None,
                progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Fill (or finish) the store at `out`, one shard per `compute(prompts_of_shard)` call.

    `settings` is everything that determines the numbers (model fingerprint, template, positions,
    dtype, batch size, ...); a store holding other settings is refused. `compute` must return
    float32 [len(texts), n_hook_points, d_model]. `token_counts` (per prompt) drive the tqdm bar's
    tokens/s; `describe` adds informational manifest fields. Returns the store path.
    """
    out = Path(out)
    n = len(prompts)
    if n == 0:
        raise UserError("nothing to extract: the sample is empty")
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}")
    labels = np.asarray(labels, dtype=np.int64)
    sample_indices = np.asarray(sample_indices, dtype=np.int64)
    if not len(labels) == len(sample_indices) == n:
        raise ValueError("prompts, labels and sample_indices differ in length")
    n_shards = -(-n // shard_size)
    shape = [n, n_hook_points, d_model]
    identity = _normalised({**settings, "n": n, "shape": shape, "shard_size": shard_size,
                            "prompts_sha256": sha256_strings(prompts),
                            "labels_sha256": sha256_array(labels),
                            "sample_indices_sha256": sha256_array(sample_indices)})
    manifest = {"format": STORE_FORMAT, "format_version": FORMAT_VERSION,
                "jaxprobe_version": _version(), "complete": False,
                **_normalised(describe or {}), "settings": identity,
                "n": n, "shape": shape, "dtype": "float32", "shard_size": shard_size,
                "n_shards": n_shards, "hook_points": list(range(n_hook_points)),
                "layer_convention": LAYER_CONVENTION, "files": {
                    "activations": ACTIVATIONS, "labels": LABELS,
                    "sample_indices": SAMPLE_INDICES, "prompts": PROMPTS}}

    def claim() -> dict:
        stored = claim_folder(out, MANIFEST, identity, what="an activation store", format=STORE_FORMAT)
        complete = bool(stored and stored.get("complete") and (out / ACTIVATIONS).is_file())
        if complete:
            _check_array(out / ACTIVATIONS, shape, np.float32)
            shutil.rmtree(out / "shards", ignore_errors=True)  # left over if killed at the very end
        if stored is not None:
            _check_side_files(out, labels, sample_indices)
        return {"stored": stored, "complete": complete}

    claimed = processes.decided(claim)  # process 0 reads the folder; every process acts on it
    stored = claimed["stored"]
    if claimed["complete"]:
        log(f"{out}: already complete ({n} examples)")
        return out
    if stored is not None:
        manifest = {**manifest, "created": stored.get("created")}
        log(f"{out}: resuming an unfinished store")
    else:
        import datetime

        manifest["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        save_json(out / MANIFEST, manifest)
    # Side files are written (atomically) when missing: a kill before them loses nothing.
    if not (out / LABELS).is_file():
        save_npy(out / LABELS, labels)
    if not (out / SAMPLE_INDICES).is_file():
        save_npy(out / SAMPLE_INDICES, sample_indices)
    if not (out / PROMPTS).is_file():
        save_text(out / PROMPTS, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))

    writer = ShardedArrayWriter(out, n, (n_hook_points, d_model), shard_size)
    todo = writer.pending()
    counts = np.asarray(token_counts if token_counts is not None else np.ones(n), dtype=np.int64)
    from tqdm.auto import tqdm

    with tqdm(total=int(counts.sum()), initial=int(counts.sum() - sum(counts[writer.slices[k]].sum() for k in todo)),
              unit="tok" if token_counts is not None else "text", unit_scale=True,
              desc=f"extract {out.name}", disable=not progress, dynamic_ncols=True) as bar:
        for k in todo:
            rows = writer.slices[k]
            acts = np.asarray(compute(list(prompts[rows])), dtype=np.float32)
            expected = (rows.stop - rows.start, n_hook_points, d_model)
            if acts.shape != expected:
                raise ValueError(f"compute returned shape {acts.shape}, expected {expected}")
            bad = first_non_finite_row(acts)
            if bad is not None:
                i = rows.start + bad
                raise UserError(f"NaN or inf activations for sample item {i} (source row "
                                f"{int(sample_indices[i])}); try --dtype float32")
            writer.write(k, acts)
            bar.update(int(counts[rows].sum()))

    writer.merge(out / ACTIVATIONS)
    save_json(out / MANIFEST, {**manifest, "complete": True})
    return out


def _check_array(path: Path, shape, dtype, expected: np.ndarray | None = None) -> None:
    """A file this store wrote, refused in one line if damaged since."""
    array = load_npy(path, mmap=True)
    if list(array.shape) != list(shape) or array.dtype != dtype or (
            expected is not None and not np.array_equal(array, expected)):
        raise UserError(f"{path}: damaged (holds {array.dtype}{list(array.shape)}, not what this store "
                        "wrote); delete the store and extract again")


def _check_side_files(out: Path, labels: np.ndarray, sample_indices: np.ndarray) -> None:
    for name, expected in ((LABELS, labels), (SAMPLE_INDICES, sample_indices)):
        if (out / name).is_file():
            _check_array(out / name, expected.shape, np.int64, expected)


@dataclass(frozen=True)
class ActivationStore:
    """An opened store: `activations` float32 [n, len(hook_points), d] (memory-mapped for
    jaxprobe stores), `labels` int64 [n], the `manifest`, and which hook point each slot of
    axis 1 is. Unpacks as `activations, labels, manifest = open_activations(path)`."""

    path: Path
    activations: np.ndarray
    labels: np.ndarray
    manifest: dict
    hook_points: tuple[int, ...]

    def __iter__(self):
        return iter((self.activations, self.labels, self.manifest))

    @property
    def d_model(self) -> int:
        return int(self.activations.shape[2])

    @property
    def data_file(self) -> Path:
        """The file the arrays come from, for error messages."""
        return self.path if self.path.is_file() else self.path / ACTIVATIONS

    def prompts(self) -> list[str] | None:
        """The exact prompt strings (None for a reference pickle, which does not keep them)."""
        path = self.path / PROMPTS
        if not path.is_file():
            return None
        try:
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: corrupt ({type(e).__name__}: {e})") from None
        if len(rows) != len(self.labels) or not all(isinstance(r, str) for r in rows):
            raise UserError(f"{path}: expected {len(self.labels)} prompt strings, one JSON string per line")
        return rows

    def layers(self, hook_points: Sequence[int]) -> np.ndarray:
        """float32 [n, len(hook_points), d] read into memory, refusing NaN/inf (naming the row)."""
        slots = []
        for h in hook_points:
            if h not in self.hook_points:
                raise UserError(f"{self.path} has no hook point {h} (it has "
                                f"{_describe_points(self.hook_points)})")
            slots.append(self.hook_points.index(h))
        data = np.asarray(self.activations[:, slots], dtype=np.float32)
        bad = first_non_finite_row(data)
        if bad is not None:
            raise UserError(f"{self.data_file}: NaN or inf in the activations of row {bad}")
        return data


def _describe_points(points: Sequence[int]) -> str:
    points = list(points)
    if len(points) > 2 and points == list(range(points[0], points[-1] + 1)):
        return f"hook points {points[0]}..{points[-1]}"
    return f"hook points {points}"


def open_activations(path: str | os.PathLike) -> ActivationStore:
    """Open a store folder (arrays memory-mapped) or a reference `*_demo_{L}.pkl` pickle (read
    without torch and without running pickle code, as a one-layer store at hook point L+1)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".pkl":
            raise UserError(f"{path}: not an activation store folder or a reference .pkl file")
        return _open_reference_pickle(path)
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path}: no {MANIFEST} (not a jaxprobe activation store)")
    manifest = load_json_object(path / MANIFEST)
    if manifest.get("format") != STORE_FORMAT:
        raise UserError(f"{path / MANIFEST} is not a jaxprobe activation store manifest")
    if not manifest.get("complete"):
        n_done = len(list((path / SHARD_DIR).glob("part-*.npy"))) if (path / SHARD_DIR).is_dir() else 0
        raise UserError(f"{path}: unfinished store ({n_done} of {manifest.get('n_shards')} shards); "
                        "rerun the extract command that made it to finish it")
    shape, points = manifest.get("shape"), manifest.get("hook_points")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(x) is int and x > 0 for x in shape)):
        raise UserError(f"{path / MANIFEST}: 'shape' must be three positive integers, not {shape!r}")
    if not (isinstance(points, list) and len(points) == shape[1] and all(type(x) is int for x in points)
            and points == sorted(set(points))):
        raise UserError(f"{path / MANIFEST}: 'hook_points' must be {shape[1]} increasing integers, not {points!r}")
    activations = load_npy(path / ACTIVATIONS, mmap=True)
    shape = tuple(shape)
    if activations.shape != shape or activations.dtype != np.float32:
        raise UserError(f"{path / ACTIVATIONS}: holds {activations.dtype}{list(activations.shape)}, "
                        f"the manifest says float32{list(shape)}")
    labels = load_npy(path / LABELS)
    if labels.shape != (shape[0],):
        raise UserError(f"{path / LABELS}: {labels.shape[0] if labels.ndim else 0} labels for "
                        f"{shape[0]} examples")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path / LABELS}: labels are {labels.dtype}, not integers")
    return ActivationStore(path, activations, labels.astype(np.int64), manifest, tuple(points))


def _open_reference_pickle(path: Path) -> ActivationStore:
    from jaxprobe.refpickle import load_reference_pickle, parse_reference_name

    split, with_prompts, layer = parse_reference_name(path)
    acts, labels = load_reference_pickle(path)
    manifest = {
        "format": "reference-pickle", "source": str(path), "split": split,
        "template": "vector-5shot" if with_prompts else "raw", "reference_layer": layer,
        "model": {"name": "reference", "fingerprint": None},
        "layer_convention": f"one layer: the reference's layers.{layer} output = hook point "
                            f"{layer + 1} (the OPT *_95 files hold decoder.layers.95.fc2 instead)",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "n": int(len(labels)), "shape": [int(len(labels)), 1, int(acts.shape[1])],
    }
    return ActivationStore(path, np.asarray(acts, np.float32)[:, None, :],
                           np.asarray(labels, np.int64), manifest, (layer + 1,))
