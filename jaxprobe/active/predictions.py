"""Per-item class predictions from anywhere: an evaluate folder, or a `.npy`, `.csv` or `.parquet`
file of logits or probabilities from any model or framework ("bring your own predictions").

A predictions file holds one row per pool item:
    .npy                  float [N, K]; the item ids are the row numbers 0..N-1
    .csv / .parquet       an `id` column, K numeric class columns (every other column, in file
                          order), and optionally `label` (class id 0..K-1 or a label word) and
                          `text` (shown to whoever labels the item)
Rows whose values all lie in [0, 1] and sum to 1 (within 1e-3) are read as probabilities (and
logged, a zero probability floored at 1e-12); anything else as logits. Either way the pool holds
log-probabilities [N, K].
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxprobe.errors import UserError

PREDICTION_SUFFIXES = (".npy", ".csv", ".parquet")
RESERVED_COLUMNS = ("id", "label", "text")
PROBABILITY_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class Pool:
    """One model's predictions on a pool, wherever they came from."""

    source: str               # what the user named (folder or file)
    logits: np.ndarray        # float64 [N, K] as given (probabilities: their logs); scores read these
    ids: list[str]            # the item ids as text (what a labels file names)
    labels: np.ndarray | None  # int64 [N], or None for an unlabelled pool
    texts: list[str] | None   # the items' texts when known
    label_words: list[str] | None
    row_indices: np.ndarray | None  # int64 source-split rows (evaluate folders)
    positional: bool = False  # ids are row numbers (.npy): aligned with a target by position

    @property
    def n_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def log_probs(self) -> np.ndarray:
        """float64 [N, K], normalised."""
        return self.logits - np.logaddexp.reduce(self.logits, axis=1, keepdims=True)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self.log_probs, np.float64).tobytes())
        h.update("\n".join(self.ids).encode())
        return h.hexdigest()[:16]


def is_predictions_file(source: str | Path) -> bool:
    return Path(source).suffix.lower() in PREDICTION_SUFFIXES and not Path(source).is_dir()


def as_logits(values: np.ndarray, where: str) -> np.ndarray:
    """float64 logits [N, K] from logits or probabilities (module docstring), checked."""
    x = np.asarray(values, np.float64)
    if x.ndim != 2 or x.shape[1] < 2 or len(x) < 1:
        raise UserError(f"{where}: expected predictions [N, K>=2], got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise UserError(f"{where}: row {bad[0]} has a NaN or infinite value ({x[bad[0]].tolist()})")
    if ((x >= 0) & (x <= 1)).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        x = np.log(np.maximum(x, PROBABILITY_FLOOR))
    return x


def _labels_from_column(values, words: list[str] | None, k: int, where: str) -> np.ndarray:
    values = list(values)
    lookup = {w: i for i, w in enumerate(words or [])}
    out = np.empty(len(values), np.int64)
    for i, v in enumerate(values):
        if isinstance(v, str) and v in lookup:
            out[i] = lookup[v]
            continue
        try:
            label = int(v)
            if label != float(v):
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{where}: row {i} has label {v!r}, not a class id 0..{k - 1}") from None
        if not 0 <= label < k:
            raise UserError(f"{where}: row {i} has label {label}, outside 0..{k - 1} for K={k}")
        out[i] = label
    return out


def load_predictions_file(path: str | Path, *, flag: str = "--target") -> Pool:
    """A `.npy`, `.csv` or `.parquet` predictions file as a `Pool` (module docstring)."""
    path = Path(path)
    where = f"{flag} {path}"
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        from jaxprobe.files import load_npy

        values = load_npy(path)
        if values.dtype.kind not in "fiu":
            raise UserError(f"{where}: expected a float array [N, K], got {values.dtype}")
        logits = as_logits(values, where)
        return Pool(str(path), logits, [str(i) for i in range(len(logits))], None, None, None, None,
                    positional=True)
    import pandas as pd

    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types; the user needs one line
        raise UserError(f"{where}: not a readable {suffix[1:]} file: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if "id" not in frame.columns:
        raise UserError(f"{where}: no `id` column (columns: {list(frame.columns)})")
    classes = [c for c in frame.columns if c not in RESERVED_COLUMNS]
    non_numeric = [c for c in classes if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise UserError(f"{where}: class column {non_numeric[0]!r} is not numeric (every column but "
                        f"{', '.join(RESERVED_COLUMNS)} is one class's logit or probability)")
    ids = [str(v) for v in frame["id"]]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{where}: id {dup!r} appears more than once")
    logits = as_logits(frame[classes].to_numpy(np.float64), where)
    words = [str(c) for c in classes]
    labels = None
    if "label" in frame.columns:
        labels = _labels_from_column(frame["label"], words, len(classes), f"{where} column label")
    texts = [str(t) for t in frame["text"]] if "text" in frame.columns else None
    return Pool(str(path), logits, ids, labels, texts, words, None)


def load_pool(source: str | Path, *, flag: str = "--target", need_labels: bool = False) -> Pool:
    """An evaluate folder's pool subset or a predictions file, as a `Pool`."""
    if is_predictions_file(source):
        pool = load_predictions_file(source, flag=flag)
        if need_labels and pool.labels is None:
            raise UserError(f"{flag} {source}: has no `label` column, and this needs the labels of every item")
        return pool
    from jaxprobe.active.inputs import load_evaluation

    ev = load_evaluation(source, "pool", flag=flag, need_labels=need_labels)
    return Pool(str(source), np.asarray(ev.logits, np.float64), [str(int(i)) for i in ev.indices], ev.labels, None,
                list(ev.meta.get("label_words") or []) or None, ev.indices)


def aligned(target: Pool, other: Pool, flag: str = "--surrogate") -> Pool:
    """`other` with its rows in `target`'s id order; refused unless both hold the same items and K."""
    if other.n_classes != target.n_classes:
        raise UserError(f"{flag} {other.source}: K={other.n_classes} classes, but --target {target.source} "
                        f"has K={target.n_classes}")
    if other.positional and len(other.ids) == len(target.ids):
        return dataclasses.replace(other, ids=list(target.ids), positional=False)
    if other.ids == target.ids:
        return other
    position = {item: i for i, item in enumerate(other.ids)}
    missing = [i for i in target.ids if i not in position]
    if missing or len(other.ids) != len(target.ids):
        what = f"has no item {missing[0]!r}" if missing else f"has {len(other.ids)} items, not {len(target.ids)}"
        raise UserError(f"{flag} {other.source} {what} of --target {target.source}: not the same pool")
    order = np.array([position[i] for i in target.ids])
    pick = lambda a: None if a is None else a[order]
    return dataclasses.replace(other, logits=other.logits[order], ids=list(target.ids), labels=pick(other.labels),
                               texts=None if other.texts is None else [other.texts[i] for i in order],
                               row_indices=pick(other.row_indices))


def as_evaluation(pool: Pool, like=None):
    """A labelled predictions `Pool` as an `inputs.Evaluation` (what `acquire` reads): row indices
    are the integer ids when every id is one, else the row numbers; a surrogate without labels
    takes those of `like`."""
    from jaxprobe.active.inputs import Evaluation

    labels = pool.labels if pool.labels is not None else (like.labels if like is not None else None)
    try:
        indices = np.array([int(i) for i in pool.ids], np.int64)
    except ValueError:
        indices = np.arange(len(pool.ids), dtype=np.int64)
    words = like.meta.get("label_words") if like is not None else pool.label_words
    meta = {"model": pool.source, "label_words": words, "icl": None, "sizes": {}, "ids": pool.ids}
    return Evaluation(Path(pool.source), "pool", pool.logits.astype(np.float32), labels, indices, meta, {})


def load_acquire_input(source: str, *, flag: str, like=None):
    """What `acquire` reads for --target / --surrogate: an evaluate folder's pool subset as before,
    or a predictions file (labels needed from the target's file), aligned by id with `like`."""
    from jaxprobe.active.inputs import load_evaluation

    if not is_predictions_file(source):
        return load_evaluation(source, "pool", flag=flag)
    pool = load_predictions_file(source, flag=flag)
    if like is None and pool.labels is None:
        raise UserError(f"{flag} {source}: has no `label` column; acquire simulates active testing on a "
                        "fully labelled pool (use `jaxprobe propose` for an unlabelled one)")
    if like is not None:
        target_pool = Pool(str(like.directory), like.logits.astype(np.float64), like.meta.get("ids") or
                           [str(int(i)) for i in like.indices], like.labels, None, None, like.indices)
        pool = aligned(target_pool, pool, flag)
    return as_evaluation(pool, like)
