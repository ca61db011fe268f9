"""`jaxprobe evaluate`: a model's label-token logits on fixed, seeded subsets of a classification set.

The first half of active testing (spec sections 2.2-2.3, 4): every model that takes part (zero-shot
target, few-shot target, surrogate) is run once over the same rows, and `jaxprobe acquire` then
works on the saved arrays only.

Output folder (`--out DIR`); what `jaxprobe acquire` reads:

    DIR/meta.json        model (name, fingerprint), dataset, prompt settings, label words and token
                         ids, ICL examples (source-row indices and text), `subsets_id`, `settings`
    DIR/subsets.json     the subsets (source-row indices of pool, test, ICL candidates) and a hash of
                         their rows; pass it to another run with `--subsets` to reuse the same rows
    DIR/pool/logits.npy  float32 [N, K]: raw next-token logits at the K label tokens (not normalised)
    DIR/pool/labels.npy  int64 [N]: true class 0..K-1 (K = len(label words), in label-id order)
    DIR/pool/indices.npy int64 [N]: row index in the source split, for every row of logits.npy
    DIR/pool/metrics.json  {"n", "accuracy", "cross_entropy", ...}: cross-entropy = mean over rows of
                         -log softmax(logits)[label], the softmax over the K label logits only
    DIR/test/...         the same for the held-out test subset (the "true risk" of a target); absent
                         when `--test-size 0`

`metrics.json` is written last: a subset is finished when it exists. Use `load_evaluation(DIR,
"pool")` to read one subset with every check done (finite logits, labels in range, shapes), and
`check_same_rows(a, b)` to refuse a target and surrogate evaluated on different rows or orders.

Resuming: logits are written to `DIR/<subset>/shards/logits-NNNNN.npy` in fixed-size shards of
input rows (`--shard-size`) as they finish; a rerun of the same command skips finished shards, and
the final arrays are bit-identical to an uninterrupted run (each shard is the same batch of work
either way). A folder made with different settings is refused, never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

from jaxprobe.active.prompts import (
    ICL_SELECTIONS, MULTI_TOKEN_POLICIES, SST2_LABEL_WORDS, build_prompts, default_instruction,
    resolve_label_tokens, select_icl_examples)
from jaxprobe.errors import UserError
from jaxprobe.io import load_json, save_json, save_npy

SUBSETS_FORMAT = "jaxprobe.subsets/1"
EVALUATION_FORMAT = "jaxprobe.evaluation/1"
SUBSET_NAMES = ("pool", "test")  # the evaluated subsets
SUBSET_ROLES = ("pool", "test", "icl_candidates")
DEFAULT_SIZES = {"pool_size": 2000, "test_size": 1000, "icl_candidates": 500, "seed": 0}


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Everything `jaxprobe evaluate` needs; the CLI flags are these fields (see `--help`)."""

    out: str
    model: str = "smollm2-135m"
    dataset: str = "sst2"
    split: str = "train"
    text_column: str = "text"
    label_column: str = "label"
    label_words: tuple[str, ...] = SST2_LABEL_WORDS
    answer_word: str = "Label"
    instruction: str | None = None  # None: default_instruction(label_words)
    icl: int = 0
    icl_selection: str = "class-proportional"
    icl_seed: int = 0
    # None: DEFAULT_SIZES, or the sizes recorded in `subsets`.
    pool_size: int | None = None
    test_size: int | None = None
    icl_candidates: int | None = None
    seed: int | None = None
    subsets: str | None = None
    multi_token_labels: str = "error"
    batch_size: int = 16
    shard_size: int = 256
    dtype: str = "float32"
    progress: bool = True

    @property
    def resolved_instruction(self) -> str:
        return default_instruction(self.label_words) if self.instruction is None else self.instruction


# ------------------------------------------------------------------------------------ subsets


def draw_subsets(n_rows: int, *, pool_size: int, test_size: int, icl_candidates: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Disjoint random subsets of `range(n_rows)`, each in ascending row order."""
    for flag, size in (("--pool-size", pool_size), ("--test-size", test_size),
                       ("--icl-candidates", icl_candidates)):
        if size < 0:
            raise UserError(f"{flag} must be >= 0, not {size}")
    if pool_size < 1:
        raise UserError(f"--pool-size must be at least 1, not {pool_size}")
    total = pool_size + test_size + icl_candidates
    if total > n_rows:
        raise UserError(f"--pool-size {pool_size} + --test-size {test_size} + --icl-candidates "
                        f"{icl_candidates} = {total} rows, but the split has only {n_rows}")
    order = np.random.default_rng(seed).permutation(n_rows)
    cuts = np.cumsum([pool_size, test_size, icl_candidates])
    return {"pool": np.sort(order[: cuts[0]]), "test": np.sort(order[cuts[0]: cuts[1]]),
            "icl_candidates": np.sort(order[cuts[1]: cuts[2]])}


def subset_rows(record: dict, name: str) -> np.ndarray:
    return np.asarray(record["rows"][name], np.int64)


def rows_digest(texts, labels) -> str:
    """sha256 over `f"{label}\\t{text}\\n"` of the given rows, in order (data/README.md's hash)."""
    h = hashlib.sha256()
    for text, label in zip(texts, labels):
        h.update(f"{label}\t{text}\n".encode("utf-8"))
    return h.hexdigest()


def subsets_id(subsets: dict) -> str:
    """One short id for a subsets record: equal ids mean the same rows in the same order."""
    h = hashlib.sha256(subsets["rows_sha256"].encode())
    for name in SUBSET_ROLES:
        h.update(subset_rows(subsets, name).tobytes())
    return h.hexdigest()[:16]


class LabelledSplit:
    """The source split's labels (all rows, as class ids) and its texts (read per row on demand)."""

    def __init__(self, config: EvaluateConfig):
        from jaxprobe.data import load_split

        self.source = f"{config.dataset} split {config.split}"
        self.dataset = load_split(config.dataset, config.split, text_column=config.text_column,
                                  label_column=config.label_column)
        self.n_rows = len(self.dataset)
        self.label_words = config.label_words
        self._raw_labels = np.asarray(self.dataset["label"])

    def labels(self, rows: np.ndarray) -> np.ndarray:
        raw = self._raw_labels[rows]
        k = len(self.label_words)
        if raw.dtype.kind in "UO":  # string labels: must be the label words themselves
            lookup = {w: i for i, w in enumerate(self.label_words)}
            for row, value in zip(rows, raw):
                if value not in lookup:
                    raise UserError(f"{self.source} row {row}: label {value!r} is not one of "
                                    f"--label-words {list(self.label_words)}")
            return np.array([lookup[v] for v in raw], np.int64)
        if raw.dtype.kind not in "iub":
            raise UserError(f"{self.source}: label column has type {raw.dtype}, not integer class ids")
        bad = np.flatnonzero((raw < 0) | (raw >= k))
        if bad.size:
            raise UserError(f"{self.source} row {rows[bad[0]]}: label {raw[bad[0]]} is outside 0..{k - 1} "
                            f"(one class per --label-words entry: {list(self.label_words)})")
        return raw.astype(np.int64)

    def texts(self, rows: np.ndarray) -> list[str]:
        texts = self.dataset.select(np.asarray(rows, np.int64))["text"] if len(rows) else []
        for row, text in zip(rows, texts):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{self.source} row {row}: text is empty or not a string ({text!r})")
        return list(texts)


def _check_subsets_record(record: dict, path: Path) -> None:
    """A hand-edited subsets file fails here with one line, not later with a traceback."""
    try:
        n_rows = int(record["n_rows"])
        sizes = {k: int(record["sizes"][k]) for k in DEFAULT_SIZES}
        rows = {k: subset_rows(record, k) for k in SUBSET_ROLES}
        str(record["rows_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--subsets {path}: missing or malformed entry ({e})") from None
    every = np.concatenate(list(rows.values()))
    if every.size and (every.min() < 0 or every.max() >= n_rows):
        raise UserError(f"--subsets {path}: a row index is outside 0..{n_rows - 1}")
    if len(np.unique(every)) != every.size:
        raise UserError(f"--subsets {path}: pool, test and ICL candidates overlap or repeat a row")
    for key, name in (("pool_size", "pool"), ("test_size", "test"), ("icl_candidates", "icl_candidates")):
        if sizes[key] != len(rows[name]):
            raise UserError(f"--subsets {path}: sizes.{key} is {sizes[key]} but it lists {len(rows[name])} rows")


def make_or_load_subsets(config: EvaluateConfig, split: LabelledSplit) -> dict:
    """The subsets record: drawn from `--seed`, or read from `--subsets` and checked against the data."""
    if config.subsets is None:
        sizes = {k: (DEFAULT_SIZES[k] if getattr(config, k) is None else getattr(config, k))
                 for k in DEFAULT_SIZES}
        drawn = draw_subsets(split.n_rows, **sizes)
        record = {"format": SUBSETS_FORMAT, "dataset": config.dataset, "split": config.split,
                  "n_rows": split.n_rows, "sizes": sizes, "rows": {k: v.tolist() for k, v in drawn.items()}}
    else:
        path = Path(config.subsets)
        if path.is_dir():
            path = path / "subsets.json"
        if not path.is_file():
            raise UserError(f"--subsets {config.subsets}: no such file (give a subsets.json or the "
                            f"folder of an earlier evaluate)")
        try:
            record = load_json(path)
        except ValueError as e:
            raise UserError(f"--subsets {path}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or record.get("format") != SUBSETS_FORMAT:
            raise UserError(f"--subsets {path}: not a subsets file written by jaxprobe evaluate")
        _check_subsets_record(record, path)
        for key in DEFAULT_SIZES:
            given = getattr(config, key)
            if given is not None and given != record["sizes"][key]:
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{flag} {given} disagrees with --subsets {path} ({record['sizes'][key]}); "
                                f"leave it out to use the file's")
        if record["n_rows"] != split.n_rows:
            raise UserError(f"--subsets {path} was drawn from {record['n_rows']} rows, but "
                            f"{split.source} has {split.n_rows}")
    rows = np.concatenate([subset_rows(record, k) for k in SUBSET_ROLES])
    digest = rows_digest(split.texts(rows), split.labels(rows))
    if config.subsets is not None and digest != record["rows_sha256"]:
        raise UserError(f"--subsets {config.subsets}: its rows hold different texts or labels in "
                        f"{split.source} (was it made from another dataset or split?)")
    record["rows_sha256"] = digest
    record["subsets_id"] = subsets_id(record)
    return record


# ------------------------------------------------------------------------------------ metrics


def label_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and mean cross-entropy over the K label logits (spec 2.3), computed in float64."""
    z = np.asarray(logits, np.float64)
    log_probs = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    losses = -log_probs[np.arange(len(labels)), labels]
    predicted = np.argmax(z, axis=1)
    k = z.shape[1]
    return {"n": int(len(labels)), "accuracy": float(np.mean(predicted == labels)),
            "cross_entropy": float(np.mean(losses)),
            "label_counts": np.bincount(labels, minlength=k).tolist(),
            "predicted_counts": np.bincount(predicted, minlength=k).tolist()}


# ------------------------------------------------------------------------------------ reading


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One finished subset of an evaluate folder."""

    directory: Path
    subset: str
    logits: np.ndarray   # float32 [N, K]
    labels: np.ndarray   # int64 [N]
    indices: np.ndarray  # int64 [N], rows of the source split
    meta: dict
    metrics: dict

    @property
    def n_classes(self) -> int:
        return self.logits.shape[1]


def load_evaluation(directory: str | Path, subset: str = "pool", *, flag: str = "--target") -> Evaluation:
    """Read `directory/<subset>` with every check a consumer needs; errors name `flag` and the file."""
    directory = Path(directory)
    meta_path, sub = directory / "meta.json", directory / subset
    if not meta_path.is_file():
        raise UserError(f"{flag} {directory}: no meta.json; not a folder written by jaxprobe evaluate")
    try:
        meta = load_json(meta_path)
    except ValueError as e:
        raise UserError(f"{flag} {meta_path}: not valid JSON ({e})") from None
    if not (sub / "metrics.json").is_file():
        what = "has no test subset (evaluated with --test-size 0)" if (
            subset == "test" and meta.get("sizes", {}).get("test_size") == 0) else "is not finished"
        raise UserError(f"{flag} {directory}: {subset} {what}; rerun its jaxprobe evaluate command")
    try:
        logits = np.load(sub / "logits.npy", allow_pickle=False)
        labels = np.load(sub / "labels.npy", allow_pickle=False)
        indices = np.load(sub / "indices.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {sub}: cannot read its arrays ({e})") from None
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
    return Evaluation(directory, subset, logits.astype(np.float32, copy=False), labels.astype(np.int64),
                      indices.astype(np.int64), meta, load_json(sub / "metrics.json"))


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


# ------------------------------------------------------------------------------------ running


def _settings(config: EvaluateConfig, subsets: dict, lm, label_token_ids: list[int],
              icl_rows: np.ndarray) -> dict:
    """What decides the numbers in an evaluate folder; a rerun must agree on all of it."""
    return {"model_fingerprint": lm.fingerprint, "dataset": config.dataset, "split": config.split,
            "text_column": config.text_column, "label_column": config.label_column,
            "subsets_id": subsets["subsets_id"], "label_words": list(config.label_words),
            "label_token_ids": label_token_ids, "answer_word": config.answer_word,
            "instruction": config.resolved_instruction, "icl": config.icl,
            "icl_selection": config.icl_selection, "icl_seed": config.icl_seed,
            "icl_rows": icl_rows.tolist(), "dtype": config.dtype, "shard_size": config.shard_size}


def _describe_difference(old: dict, new: dict) -> str:
    keys = [k for k in [*new, *(k for k in old if k not in new)] if old.get(k) != new.get(k)]
    k = keys[0]

    def shorten(value) -> str:
        text = repr(value)
        return text[:60] + "..." if len(text) > 60 else text

    return f"{k}: {shorten(old.get(k))} there vs {shorten(new.get(k))} now" + (
        f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _check_out_dir(out: Path) -> dict | None:
    """The existing meta.json of `out`, None for a new or empty folder; refuses anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if (out / "meta.json").is_file():
        try:
            meta = load_json(out / "meta.json")
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != EVALUATION_FORMAT:
            raise UserError(f"--out {out} holds a meta.json that jaxprobe evaluate did not write")
        return meta
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds other files; give a new or empty folder")
    return None


def run_evaluate(config: EvaluateConfig, *, lm=None, log=print) -> Path:
    """Evaluate (or finish evaluating) `config.model` into `config.out`. Pass `lm` to reuse a model."""
    if config.batch_size < 1 or config.shard_size < 1:
        raise UserError(f"--batch-size and --shard-size must be positive "
                        f"(got {config.batch_size}, {config.shard_size})")
    if config.icl_selection not in ICL_SELECTIONS:
        raise UserError(f"--icl-selection must be one of {', '.join(ICL_SELECTIONS)}")
    if config.multi_token_labels not in MULTI_TOKEN_POLICIES:
        raise UserError(f"--multi-token-labels must be one of {', '.join(MULTI_TOKEN_POLICIES)}")
    out = Path(config.out)
    existing = _check_out_dir(out)

    split = LabelledSplit(config)
    subsets = make_or_load_subsets(config, split)
    k = len(config.label_words)
    candidate_rows = subset_rows(subsets, "icl_candidates")
    icl_positions = select_icl_examples(split.labels(candidate_rows), config.icl, n_classes=k,
                                        seed=config.icl_seed, selection=config.icl_selection)
    icl_rows = candidate_rows[icl_positions]
    icl_examples = [(text, config.label_words[label])
                    for text, label in zip(split.texts(icl_rows), split.labels(icl_rows))]

    if lm is None:
        import jaxprobe

        lm = jaxprobe.load_model(config.model, dtype=config.dtype)
    rows = {name: subset_rows(subsets, name) for name in SUBSET_NAMES if len(subsets["rows"][name])}
    prompts = {name: build_prompts(split.texts(r), instruction=config.resolved_instruction,
                                   answer_word=config.answer_word, examples=icl_examples)
               for name, r in rows.items()}
    decode = getattr(lm.tokenizer, "decode", None)
    label_token_ids = resolve_label_tokens(lm.tokenize, prompts["pool"][0], config.label_words,
                                           multi_token=config.multi_token_labels, decode=decode)
    settings = _settings(config, subsets, lm, label_token_ids, icl_rows)
    if existing is not None and existing["settings"] != settings:
        raise UserError(f"--out {out} was made with different settings "
                        f"({_describe_difference(existing['settings'], settings)}); use a new --out")
    if existing is None:
        save_json(out / "subsets.json", {k_: v for k_, v in subsets.items() if k_ != "subsets_id"})
        save_json(out / "meta.json", {
            "format": EVALUATION_FORMAT, "model": {"name": lm.name, "source": str(config.model),
                                                   "fingerprint": lm.fingerprint},
            "dataset": config.dataset, "split": config.split, "subsets_id": subsets["subsets_id"],
            "sizes": subsets["sizes"],
            "prompt_format": "{instruction}" + "Sentence: '{s}' \\n{answer_word}: {label}\\n\\n" * bool(config.icl)
                             + "Sentence: '{s}' \\n{answer_word}:",
            "instruction": config.resolved_instruction, "answer_word": config.answer_word,
            "label_words": list(config.label_words), "label_token_ids": label_token_ids,
            "label_tokens": [decode([t]) if decode else None for t in label_token_ids],
            "icl": {"n": config.icl, "selection": config.icl_selection, "seed": config.icl_seed,
                    "rows": icl_rows.tolist(), "labels": [w for _, w in icl_examples]},
            "example_prompt": prompts["pool"][0], "settings": settings})

    todo = [name for name in rows if not (out / name / "metrics.json").is_file()]
    if todo:
        # One shared prefix for every prompt of this run, from whole-prompt tokenisations (the
        # "\n\n" before a query merges differently when the ICL text is tokenised on its own).
        prefix = lm.common_prefix([p for name in todo for p in prompts[name]])
        _evaluate_shards(lm, {n: prompts[n] for n in todo}, out, config=config,
                         label_token_ids=label_token_ids, prefix=prefix, rows=rows)
        for name in todo:
            _finish_subset(out / name, rows[name], split.labels(rows[name]), config.shard_size,
                           extra={"prefix_tokens_cached": len(prefix)})
    for name in rows:
        m = load_json(out / name / "metrics.json")
        log(f"{lm.name} {config.icl}-shot {name}: n={m['n']} accuracy={m['accuracy']:.4f} "
            f"cross-entropy={m['cross_entropy']:.4f}")
    return out


def _shard_path(subset_dir: Path, index: int) -> Path:
    return subset_dir / "shards" / f"logits-{index:05d}.npy"


def _evaluate_shards(lm, prompts: dict[str, list[str]], out: Path, *, config: EvaluateConfig,
                     label_token_ids: list[int], prefix: list[int], rows: dict) -> None:
    from tqdm.auto import tqdm

    work = []  # (subset, shard index, first row, end row) still to do
    done_rows = 0
    for name, texts in prompts.items():
        for index, start in enumerate(range(0, len(texts), config.shard_size)):
            end = min(start + config.shard_size, len(texts))
            if _shard_path(out / name, index).is_file():
                done_rows += end - start
            else:
                work.append((name, index, start, end))
    total = sum(len(t) for t in prompts.values())
    if done_rows:
        print(f"resuming {out}: {done_rows} of {total} prompts already done", file=sys.stderr)
    bar = tqdm(total=total, initial=done_rows, desc=f"evaluate {Path(config.out).name}", unit="prompt",
               disable=not config.progress, dynamic_ncols=True)
    for name, index, start, end in work:
        logits = lm.logits(prompts[name][start:end], token_ids=label_token_ids, prefix_tokens=prefix,
                           batch_size=config.batch_size)
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if bad.size:
            raise UserError(f"{config.model} gave a NaN or infinite logit for {name} row "
                            f"{rows[name][start + bad[0]]} of {config.dataset}; try --dtype float32")
        save_npy(_shard_path(out / name, index), logits.astype(np.float32))
        bar.update(end - start)
    bar.close()


def _finish_subset(subset_dir: Path, rows: np.ndarray, labels: np.ndarray, shard_size: int,
                   extra: dict) -> None:
    n_shards = -(-len(rows) // shard_size)
    logits = np.concatenate([np.load(_shard_path(subset_dir, i), allow_pickle=False) for i in range(n_shards)])
    if logits.shape[0] != len(rows):
        raise UserError(f"{subset_dir}/shards hold {logits.shape[0]} rows, expected {len(rows)}; "
                        f"the folder was changed by hand: use a new --out")
    save_npy(subset_dir / "logits.npy", logits)
    save_npy(subset_dir / "labels.npy", labels)
    save_npy(subset_dir / "indices.npy", rows)
    save_json(subset_dir / "metrics.json", {**label_metrics(logits, labels), **extra})
    shutil.rmtree(subset_dir / "shards")  # its rows now live in logits.npy


# ------------------------------------------------------------------------------------ CLI


def _words(value: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in value.split(","))
    if any(not w for w in words):
        raise argparse.ArgumentTypeError(f"expected comma-separated words, got {value!r}")
    return words


def _unescape(value: str) -> str:
    # Shells make a real newline awkward to type; "\n" in the flag means one.
    return value.replace("\\n", "\n")


def add_evaluate_arguments(parser: argparse.ArgumentParser, sizes: dict = DEFAULT_SIZES) -> None:
    """The data/prompt/subset flags shared by `evaluate` and `active-experiment` (`sizes`: the
    defaults the help shows for the subset flags left out)."""
    d = EvaluateConfig
    g = parser.add_argument_group("data and prompt")
    g.add_argument("--dataset", default=d.dataset,
                   help="built-in name (sst2, imdb), a local .csv/.json/.parquet file, or any "
                        "datasets.load_dataset name (default: %(default)s)")
    g.add_argument("--split", default=d.split, help="split to draw the subsets from (default: %(default)s)")
    g.add_argument("--text-column", default=d.text_column, help="(default: %(default)s)")
    g.add_argument("--label-column", default=d.label_column,
                   help="integer class ids 0..K-1, or strings equal to the label words (default: %(default)s)")
    g.add_argument("--label-words", type=_words, default=d.label_words, metavar="W0,W1,...",
                   help="one word per class, in class-id order; each must be one token after the "
                        "prompt (default: %s)" % ",".join(d.label_words))
    g.add_argument("--answer-word", default=d.answer_word,
                   help="the word before the colon the label follows (default: %(default)s)")
    g.add_argument("--instruction", type=_unescape, default=None,
                   help=r"text before the examples; '\n' means a newline (default: the paper's SST-2 "
                        "instruction for negative,positive, else a generic one over the label words)")
    g.add_argument("--multi-token-labels", choices=MULTI_TOKEN_POLICIES, default=d.multi_token_labels,
                   help="a label word that is several tokens: refuse it (error) or read its first "
                        "token, as the paper did for Subj (default: %(default)s)")
    g.add_argument("--icl-selection", choices=ICL_SELECTIONS, default=d.icl_selection,
                   help="in-context examples per class in proportion to the candidates' classes, "
                        "in one random order (the paper), or a plain random choice (the reference "
                        "code) (default: %(default)s)")
    g.add_argument("--icl-seed", type=int, default=d.icl_seed, help="(default: %(default)s)")
    s = parser.add_argument_group("subsets (disjoint, seeded, saved as row indices)")
    s.add_argument("--pool-size", type=int, default=None,
                   help="rows the acquisition draws from (default: %d)" % sizes["pool_size"])
    s.add_argument("--test-size", type=int, default=None,
                   help="held-out rows for the true risk; 0 for none (default: %d)" % sizes["test_size"])
    s.add_argument("--icl-candidates", type=int, default=None,
                   help="rows in-context examples are chosen from (default: %d)" % sizes["icl_candidates"])
    s.add_argument("--seed", type=int, default=None,
                   help="seed of the subset draw (default: %d)" % sizes["seed"])
    s.add_argument("--subsets", default=None, metavar="FILE",
                   help="reuse the subsets of an earlier evaluate (its subsets.json or its folder), "
                        "so every model sees the same rows; checked against the data")
    r = parser.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="prompts per forward pass at the longest prompts; shorter ones share batches of up to "
                        "as many tokens (default: %(default)s)")
    r.add_argument("--shard-size", type=int, default=d.shard_size,
                   help="prompts per saved shard: the unit a killed run resumes from (default: %(default)s)")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype, help="(default: %(default)s)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    fields = {f.name for f in dataclasses.fields(EvaluateConfig)}
    return EvaluateConfig(**{k: v for k, v in vars(args).items() if k in fields})


def add_evaluate_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a model's label-token logits on seeded pool/test subsets (active testing, step 1)",
        description="Run a model over the pool and test subsets of a classification set and save "
                    "its logits at the K label tokens (one forward pass per batch; the shared "
                    "in-context prefix is computed once).\n\n"
                    "Prompt: {instruction}[N x \"Sentence: '{s}' \\n{Answer}: {label}\\n\\n\"]"
                    "Sentence: '{s}' \\n{Answer}:\n\n"
                    "Writes OUT/meta.json, OUT/subsets.json and, for pool and test, logits.npy [N, K] "
                    "float32, labels.npy, indices.npy and metrics.json. Rerun the same command to "
                    "resume; a folder made with other settings is refused.",
        epilog="example:\n  jaxprobe evaluate --out runs/zero\n"
               "  jaxprobe evaluate --icl 50 --subsets runs/zero --out runs/icl50")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an unfinished run to resume)")
    parser.add_argument("--model", default=EvaluateConfig.model,
                        help="converted checkpoint, HF folder, .gguf file or smollm2-135m (default: %(default)s)")
    parser.add_argument("--icl", type=int, default=0, metavar="N",
                        help="in-context examples before each query (paper: 50; default: %(default)s)")
    add_evaluate_arguments(parser)
    parser.set_defaults(func=_evaluate_command)
    return parser


def _evaluate_command(args: argparse.Namespace) -> int:
    run_evaluate(config_from_args(args))
    return 0
