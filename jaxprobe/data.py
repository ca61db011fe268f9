"""Labelled text sets through `datasets`: the project's offline copies (IMDB, SST-2, Subj, FPB, HS18,
MMLU in `data/`),
any local csv/json/parquet file, or any `datasets` name. Every loader returns a `datasets.Dataset`
with exactly two columns, `text` (str) and `label` (int), in the source's row order, so Hub-style
indices and `shuffle(seed=...)` carry over.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxprobe.errors import UserError

DATA_DIR = Path(os.environ.get("JAXPROBE_DATA", Path(__file__).resolve().parent.parent / "data"))

# name -> split -> parquet file in DATA_DIR (IMDB rows are in the HF Hub's order; see data/README.md)
BUILTIN = {
    "imdb": {"train": "imdb_train.parquet", "test": "imdb_test.parquet"},
    "sst2": {"train": "sst2_train.parquet", "validation": "sst2_validation.parquet"},
    "subj": {"train": "subj_train.parquet", "test": "subj_test.parquet"},
    "fpb": {"train": "fpb_allagree.parquet"},  # sentences_allagree; Hugging Face has only a train split
    "hs18": {"train": "hs18.parquet"},         # all four labels; the paper keeps label < 2
    "mmlu": {"test": "mmlu_test.parquet", "validation": "mmlu_validation.parquet", "dev": "mmlu_dev.parquet"},
}
_LOCAL_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_split(source: str, split: str, *, text_column: str = "text", label_column: str | None = "label",
               extra_columns: tuple[str, ...] = (), optional_label: bool = False):
    """Load one split as a `datasets.Dataset` with columns `text` and `label` (then `extra_columns`,
    under their own names, e.g. MMLU's `choices` and `subject`); `text` only when `label_column` is
    None, or with `optional_label` when the data has no such column: an unlabelled set.

    `source` is a built-in name (`imdb`, `sst2`, `subj`, `fpb`, `hs18`, `mmlu`), a local
    .csv/.tsv/.json/.jsonl/.parquet file (one split: `split` is only a label then), or anything
    `datasets.load_dataset` accepts.
    """
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    key = source.lower().replace("-", "")
    if key in BUILTIN:
        if split not in BUILTIN[key]:
            raise UserError(f"dataset {source!r} has splits {sorted(BUILTIN[key])}, not {split!r}")
        path = DATA_DIR / BUILTIN[key][split]
        if not path.is_file():
            raise UserError(f"missing data file {path} (set JAXPROBE_DATA to the folder holding it)")
        ds = datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
    elif Path(source).suffix.lower() in _LOCAL_BUILDERS:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        builder = _LOCAL_BUILDERS[path.suffix.lower()]
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # noqa: BLE001 - datasets wraps the reader's error in its own types
            cause = e.__cause__ or e.__context__ if type(e).__name__ == "DatasetGenerationError" else e
            cause = cause or e
            detail = str(cause).splitlines()[0] if str(cause) else ""
            if "corresponds to no data" in detail or isinstance(cause, StopIteration):
                raise UserError(f"{path}: holds no rows") from None
            raise UserError(f"{path}: not a readable {builder} file: {type(cause).__name__}: {detail}") from None
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
            raise UserError(f"could not load dataset {source!r} split {split!r}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if len(ds) == 0:
        raise UserError(f"dataset {source!r} split {split!r} holds no rows")
    if optional_label and label_column not in ds.column_names:
        label_column = None
    for col, what in ((text_column, "--text-column"), (label_column, "--label-column"),
                      *((c, "a column the task reads") for c in extra_columns)):
        if col is not None and col not in ds.column_names:
            raise UserError(f"dataset {source!r} has no column {col!r} ({what}); "
                            f"columns are {ds.column_names}")
    ds = ds.select_columns([text_column] + ([label_column] if label_column is not None else []) + list(extra_columns))
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if label_column is not None and label_column != "label":
        ds = ds.rename_column(label_column, "label")
    return ds


def is_single_file(source: str) -> bool:
    """True for a local csv/json/parquet source: one file = one split (the split is only a label)."""
    return source.lower().replace("-", "") not in BUILTIN and Path(source).suffix.lower() in _LOCAL_BUILDERS


def reference_sample(ds, n: int, seed: int = 42):
    """`ds.shuffle(seed=seed).select(range(n))`, the sample every reference notebook draws."""
    if n > len(ds):
        raise UserError(f"asked for {n} rows but the split has only {len(ds)}")
    return ds.shuffle(seed=seed).select(range(n))


def reference_sample_rows(ds, n: int, seed: int = 42):
    """Like `reference_sample`, but also returns each sampled row's index in `ds` (int64 [n]),
    which the activation store records so a sample can be traced back to its source rows."""
    import numpy as np

    if n > len(ds):
        raise UserError(f"asked for {n} rows but the split has only {len(ds)}")
    sample = ds.add_column("_row", np.arange(len(ds), dtype=np.int64)).shuffle(seed=seed)
    sample = sample.select(range(n))
    rows = np.asarray(sample["_row"], dtype=np.int64)
    return sample.remove_columns("_row"), rows


def check_examples(texts, labels, rows, where: str, n_classes: int = 2) -> None:
    """Refuse, in one line naming the row, an empty/whitespace text or a label outside 0..K-1.

    `rows` are the examples' row indices in the source split; `where` names the source
    (e.g. "imdb split 'train'").
    """
    allowed = "0 or 1" if n_classes == 2 else f"a class id 0..{n_classes - 1}"
    for i, (text, label, row) in enumerate(zip(texts, labels, rows, strict=True)):
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where} row {int(row)} (sample item {i}): empty or whitespace-only text")
        if isinstance(label, bool) or label not in range(n_classes):
            raise UserError(f"{where} row {int(row)} (sample item {i}): label {label!r} is not {allowed} "
                            f"({n_classes} label names given; map the labels to 0..{n_classes - 1} first)")


def check_binary_examples(texts, labels, rows, where: str) -> None:
    """`check_examples` for two classes (labels 0/1)."""
    check_examples(texts, labels, rows, where, 2)
