"""Reading `jaxprobe evaluate` folders into checked arrays (docs/formats.md has the layout): the
one place active testing meets files another command wrote.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.files import load_json_object, load_npy

EVALUATION_FORMAT = "jaxprobe.evaluation/1"


SUBSET_NAMES = ("pool", "test")  # the evaluated subsets


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One finished subset of an evaluate folder."""

    directory: Path
    subset: str
    logits: np.ndarray   # float32 [N, K]
    labels: np.ndarray | None  # int64 [N]; None for a pool evaluated without labels
    indices: np.ndarray  # int64 [N], rows of the source split
    meta: dict
    metrics: dict

    @property
    def n_classes(self) -> int:
        return self.logits.shape[1]


def load_evaluation(directory: str | Path, subset: str = "pool", *, flag: str = "--target",
                    need_labels: bool = True) -> Evaluation:
    """Read `directory/<subset>` with every check a consumer needs; errors name `flag` and the file.
    A subset evaluated without labels (`evaluate --no-labels`) is refused in one line unless
    `need_labels` is False; its `labels` are then None."""
    directory = Path(directory)
    meta_path, sub = directory / "meta.json", directory / subset
    if not meta_path.is_file():
        raise UserError(f"{flag} {directory}: no meta.json; not a folder written by jaxprobe evaluate")
    meta = _checked_meta(load_json_object(meta_path), f"{flag} {meta_path}")
    if not (sub / "metrics.json").is_file():
        what = "has no test subset (evaluated with --test-size 0)" if (
            subset == "test" and meta["sizes"].get("test_size") == 0) else "is not finished"
        raise UserError(f"{flag} {directory}: {subset} {what}; rerun its jaxprobe evaluate command")
    metrics = load_json_object(sub / "metrics.json")
    if meta.get("labelled") is False:
        if need_labels:
            raise UserError(f"{flag} {directory}: evaluated without labels (--no-labels or no label column), "
                            "and this needs them; label a queue with jaxprobe propose / estimate instead")
        logits, indices = (load_npy(sub / f"{name}.npy") for name in ("logits", "indices"))
        labels = np.zeros(len(logits), np.int64)  # checked below like real labels, then dropped
    else:
        logits, labels, indices = (load_npy(sub / f"{name}.npy") for name in ("logits", "labels", "indices"))
    name = f"{flag} {sub / 'logits.npy'}"
    if logits.ndim != 2 or logits.shape[1] < 2 or logits.dtype.kind != "f":
        raise UserError(f"{name}: expected float logits [N, K>=2], got {logits.dtype} {logits.shape}")
    bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
    if bad.size:
        raise UserError(f"{name}: row {bad[0]} has a NaN or infinite logit ({logits[bad[0]].tolist()})")
    if labels.shape != (len(logits),) or indices.shape != (len(logits),):
        raise UserError(f"{flag} {sub}: labels.npy {labels.shape} / indices.npy {indices.shape} do not "
                        f"match logits.npy's {len(logits)} rows")
    if labels.dtype.kind not in "iu":
        raise UserError(f"{flag} {sub / 'labels.npy'}: labels must be integers, not {labels.dtype}")
    out_of_range = np.flatnonzero((labels < 0) | (labels >= logits.shape[1]))
    if out_of_range.size:
        i = out_of_range[0]
        raise UserError(f"{flag} {sub / 'labels.npy'}: row {i} has label {labels[i]}, outside "
                        f"0..{logits.shape[1] - 1} for K={logits.shape[1]} logits")
    if indices.dtype.kind not in "iu":
        raise UserError(f"{flag} {sub / 'indices.npy'}: row indices must be integers, not {indices.dtype}")
    return Evaluation(directory, subset, logits.astype(np.float32, copy=False),
                      None if meta.get("labelled") is False else labels.astype(np.int64),
                      indices.astype(np.int64), meta, metrics)


def _checked_meta(meta: dict, where: str) -> dict:
    """meta.json with the keys readers use, each of the right type."""
    if meta.get("format") != EVALUATION_FORMAT:
        raise UserError(f"{where}: format {meta.get('format')!r}, expected {EVALUATION_FORMAT!r}; not "
                        "written by jaxprobe evaluate")
    words = meta.get("label_words")
    if not isinstance(words, list) or len(words) < 2 or not all(isinstance(w, str) for w in words):
        raise UserError(f"{where}: label_words must be a list of two or more words, not {words!r}")
    if not isinstance(meta.get("sizes"), dict):
        raise UserError(f"{where}: sizes must be an object, not {meta.get('sizes')!r}")
    icl = meta.get("icl")
    if icl is not None and not (isinstance(icl, dict) and isinstance(icl.get("n", 0), int)):
        raise UserError(f"{where}: icl must be an object with an integer n, not {icl!r}")
    if not isinstance(meta.get("model"), (str, dict)):
        raise UserError(f"{where}: model must name the evaluated model, not {meta.get('model')!r}")
    return meta


def check_same_rows(a: Evaluation, b: Evaluation, names: tuple[str, str] = ("--target", "--surrogate")) -> None:
    """Refuse two evaluations that are not on the same rows in the same order with the same K."""
    where = f"{names[0]} {a.directory} and {names[1]} {b.directory}"
    if a.n_classes != b.n_classes:
        raise UserError(f"{where} have different numbers of classes (K={a.n_classes} vs K={b.n_classes})")
    if a.meta.get("label_words") != b.meta.get("label_words"):
        raise UserError(f"{where} use different label words ({a.meta.get('label_words')} vs "
                        f"{b.meta.get('label_words')})")
    if len(a.indices) != len(b.indices) or set(a.indices.tolist()) != set(b.indices.tolist()):
        raise UserError(f"{where} were evaluated on different {a.subset} rows (evaluate the second "
                        f"with --subsets {a.directory / 'subsets.json'})")
    if not np.array_equal(a.indices, b.indices):
        raise UserError(f"{where} hold the same {a.subset} rows in a different order")
    if not np.array_equal(a.labels, b.labels):
        raise UserError(f"{where} have different labels for the same {a.subset} rows")
