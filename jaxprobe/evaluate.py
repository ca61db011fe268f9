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

Resuming: logits are written to `DIR/<subset>/shards/part-NNNNN.npy` in fixed-size shards of
input rows (`--shard-size`) as they finish; a rerun of the same command skips finished shards, and
the final arrays are bit-identical to an uninterrupted run (each shard is the same batch of work
either way). A folder made with different settings is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np

from jaxprobe import processes
from jaxprobe.active.estimators import label_metrics
from jaxprobe.active.inputs import EVALUATION_FORMAT
from jaxprobe.batching import readable_prefix
from jaxprobe.errors import UserError
from jaxprobe.files import (
    ShardedArrayWriter,
    claim_folder,
    load_json_object,
    load_npy,
    save_json,
    save_npy,
)
from jaxprobe.prompts import (
    CHOICE_LINE,
    ICL_SELECTIONS,
    MULTI_TOKEN_POLICIES,
    SENTENCE_QUERY,
    SST2_LABEL_WORDS,
    PromptFormat,
    build_prompts,
    check_query_format,
    default_instruction,
    resolve_label_tokens,
    select_icl_examples,
)
from jaxprobe.sources import DEFAULT_MODEL

SUBSETS_FORMAT = "jaxprobe.subsets/1"


SUBSET_NAMES = ("pool", "test")  # the evaluated subsets


SUBSET_ROLES = ("pool", "test", "icl_candidates")


DEFAULT_SIZES = {"pool_size": 2000, "test_size": 1000, "icl_candidates": 500, "seed": 0}


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Everything `jaxprobe evaluate` needs; the CLI flags are these fields (see `--help`)."""

    out: str
    model: str = DEFAULT_MODEL
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
    dtype: str = "auto"  # float32 on CPUs, bfloat16 on accelerators
    progress: bool = True
    mesh: tuple[int, int] | None = None  # (data, model) devices; None: load_model's default
    # Set by task presets (jaxprobe/tasks.toml); the defaults are the sentence tasks' prompt.
    query_format: str = SENTENCE_QUERY     # fields {text}, {answer_word}, {choices}
    choice_format: str = CHOICE_LINE       # one line per option; {letter} = the label word
    choices_column: str | None = None      # multiple choice: the options listed under the question
    group_column: str | None = None        # metrics per group as well (MMLU: subject)
    keep_labels: tuple[int, ...] | None = None  # rows with other labels are dropped first (HS: 0, 1)
    icl_split: str | None = None           # ICL candidates from this split (None: from `split`)
    no_labels: bool = False  # logits only; also when the data has no --label-column
    # None: logits only. N: also every hook point's activation (same forward pass) for pool and
    # test, and subset `examples`: the N labelled examples `--icl N` would pick (a probe surrogate's)
    activations: int | None = None

    @property
    def resolved_instruction(self) -> str:
        return default_instruction(self.label_words) if self.instruction is None else self.instruction

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.query_format, self.choice_format, self.label_words)


# Task fields recorded in settings only when set, so folders written before they existed still match.
TASK_FIELD_DEFAULTS = {"query_format": SENTENCE_QUERY, "choice_format": CHOICE_LINE, "choices_column": None,
                       "group_column": None, "keep_labels": None, "icl_split": None}


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
    for text, label in zip(texts, [""] * len(texts) if labels is None else labels):
        h.update(f"{label}\t{text}\n".encode("utf-8"))
    return h.hexdigest()


def subsets_id(subsets: dict) -> str:
    """One short id for a subsets record: equal ids mean the same rows in the same order."""
    h = hashlib.sha256(subsets["rows_sha256"].encode())
    for name in SUBSET_ROLES:
        h.update(subset_rows(subsets, name).tobytes())
    return h.hexdigest()[:16]


class LabelledSplit:
    """The source split's labels (all rows, as class ids) and its texts (read per row on demand).
    With `keep_labels` the split is first filtered to those labels; row indices then count the
    kept rows (as the reference's `filter(label < 2)` for HS)."""

    def __init__(self, config: EvaluateConfig, split: str | None = None):
        from jaxprobe.data import load_split

        split = config.split if split is None else split
        self.source = f"{config.dataset} split {split}"
        extra = tuple(c for c in (config.choices_column, config.group_column) if c is not None)
        self.dataset = load_split(config.dataset, split, text_column=config.text_column,
                                  label_column=None if config.no_labels else config.label_column,
                                  extra_columns=extra, optional_label=True)
        self.choices_column, self.group_column = config.choices_column, config.group_column
        if config.keep_labels is not None and "label" in self.dataset.column_names:
            keep = np.isin(np.asarray(self.dataset["label"]), np.asarray(config.keep_labels))
            self.dataset = self.dataset.select(np.flatnonzero(keep))
            self.source += f" (labels {list(config.keep_labels)} kept)"
            if len(self.dataset) == 0:
                raise UserError(f"{self.source}: no rows left")
        self.n_rows = len(self.dataset)
        self.label_words = config.label_words
        self.labelled = "label" in self.dataset.column_names
        self._raw_labels = np.asarray(self.dataset["label"]) if self.labelled else None

    def labels(self, rows: np.ndarray) -> np.ndarray | None:
        """Class ids of `rows`, or None for an unlabelled split."""
        if not self.labelled:
            return None
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

    def choices(self, rows: np.ndarray) -> list[list[str]] | None:
        """Each row's options (multiple choice), or None for a sentence task."""
        if self.choices_column is None:
            return None
        rows = np.asarray(rows, np.int64)
        options = [list(c) for c in self.dataset.select(rows)[self.choices_column]] if len(rows) else []
        for row, c in zip(rows, options):
            if len(c) > len(self.label_words):
                raise UserError(f"{self.source} row {row}: {len(c)} choices, but only {len(self.label_words)} "
                                f"label words {list(self.label_words)}")
        return options

    def groups(self, rows: np.ndarray) -> list[str] | None:
        if self.group_column is None:
            return None
        rows = np.asarray(rows, np.int64)
        return [str(g) for g in self.dataset.select(rows)[self.group_column]] if len(rows) else []


def _check_subsets_record(record: dict, path: Path) -> None:
    """A hand-edited subsets file fails here with one line, not later with a traceback."""
    try:
        n_rows = int(record["n_rows"])
        sizes = {k: int(record["sizes"][k]) for k in DEFAULT_SIZES}
        rows = {k: subset_rows(record, k) for k in SUBSET_ROLES}
        str(record["rows_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--subsets {path}: missing or malformed entry ({e})") from None
    icl_rows = record.get("icl_n_rows")
    same_split = [k for k in SUBSET_ROLES if icl_rows is None or k != "icl_candidates"]
    for names, limit in ((same_split, n_rows), ([] if icl_rows is None else ["icl_candidates"], icl_rows)):
        every = np.concatenate([rows[k] for k in names]) if names else np.zeros(0, np.int64)
        if every.size and (every.min() < 0 or every.max() >= int(limit)):
            raise UserError(f"--subsets {path}: a row index is outside 0..{int(limit) - 1}")
        if len(np.unique(every)) != every.size:
            raise UserError(f"--subsets {path}: pool, test and ICL candidates overlap or repeat a row")
    for key, name in (("pool_size", "pool"), ("test_size", "test"), ("icl_candidates", "icl_candidates")):
        if sizes[key] != len(rows[name]):
            raise UserError(f"--subsets {path}: sizes.{key} is {sizes[key]} but it lists {len(rows[name])} rows")


def _draw_icl_rows(n_rows: int, icl_candidates: int, seed: int, source: str) -> np.ndarray:
    """ICL candidates from a split of their own (Subj: test; MMLU: dev), in ascending row order."""
    if icl_candidates > n_rows:
        raise UserError(f"--icl-candidates {icl_candidates} is more than the {n_rows} rows of {source}")
    return np.sort(np.random.default_rng([seed, 0x1C1]).permutation(n_rows)[:icl_candidates])


def _own_icl_split(config: EvaluateConfig) -> bool:
    """Whether ICL candidates come from a split of their own; a one-file dataset has one split only,
    so its candidates are rows of that file apart from pool and test."""
    from jaxprobe.data import is_single_file

    return config.icl_split not in (None, config.split) and not is_single_file(config.dataset)


def make_or_load_subsets(config: EvaluateConfig, split: LabelledSplit,
                         icl_split: LabelledSplit | None = None) -> dict:
    """The subsets record: drawn from `--seed`, or read from `--subsets` and checked against the data.
    With `icl_split`, the ICL candidates are rows of that split instead."""
    icl_split = icl_split or split
    if config.subsets is None:
        sizes = {k: (DEFAULT_SIZES[k] if getattr(config, k) is None else getattr(config, k))
                 for k in DEFAULT_SIZES}
        own = icl_split is not split
        drawn = draw_subsets(split.n_rows, **{**sizes, "icl_candidates": 0 if own else sizes["icl_candidates"]})
        if own:
            drawn["icl_candidates"] = _draw_icl_rows(icl_split.n_rows, sizes["icl_candidates"], sizes["seed"],
                                                     icl_split.source)
        record = {"format": SUBSETS_FORMAT, "dataset": config.dataset, "split": config.split,
                  "n_rows": split.n_rows, "sizes": sizes, "rows": {k: v.tolist() for k, v in drawn.items()}}
        if own:
            record.update(icl_split=config.icl_split, icl_n_rows=icl_split.n_rows)
    else:
        path = Path(config.subsets)
        if path.is_dir():
            path = path / "subsets.json"
        if not path.is_file():
            raise UserError(f"--subsets {config.subsets}: no such file (give a subsets.json or the "
                            f"folder of an earlier evaluate)")
        record = load_json_object(path)
        if record.get("format") != SUBSETS_FORMAT:
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
        if record.get("icl_split") != (config.icl_split if _own_icl_split(config) else None):
            raise UserError(f"--subsets {path} drew its ICL candidates from split {record.get('icl_split')!r}, "
                            f"this run from {config.icl_split!r}")
    rows = np.concatenate([subset_rows(record, k) for k in ("pool", "test")])
    icl = subset_rows(record, "icl_candidates")
    labelled = split.labelled and icl_split.labelled
    digest = rows_digest(split.texts(rows) + icl_split.texts(icl),
                         np.concatenate([split.labels(rows), icl_split.labels(icl)]) if labelled else None)
    if config.subsets is not None and digest != record["rows_sha256"]:
        raise UserError(f"--subsets {config.subsets}: its rows hold different texts or labels in "
                        f"{split.source} (was it made from another dataset or split?)")
    record["rows_sha256"] = digest
    record["subsets_id"] = subsets_id(record)
    return record


def _settings(config: EvaluateConfig, subsets: dict, lm, label_token_ids: list[int],
              icl_rows: np.ndarray) -> dict:
    """What decides the numbers in an evaluate folder; a rerun must agree on all of it."""
    return {"model_fingerprint": lm.fingerprint, "dataset": config.dataset, "split": config.split,
            "text_column": config.text_column, "label_column": config.label_column,
            "subsets_id": subsets["subsets_id"], "label_words": list(config.label_words),
            "label_token_ids": label_token_ids, "answer_word": config.answer_word,
            "instruction": config.resolved_instruction, "icl": config.icl,
            "icl_selection": config.icl_selection, "icl_seed": config.icl_seed,
            "icl_rows": icl_rows.tolist(), "dtype": config.dtype, "shard_size": config.shard_size,
            "batch_size": config.batch_size,  # a batch's padding moves logits by ~1e-5
            **{k: (list(v) if isinstance(v, tuple) else v) for k, d in TASK_FIELD_DEFAULTS.items()
               if (v := getattr(config, k)) != d}}


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
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    from jaxprobe.runner import resolve_dtype

    check_query_format(config.query_format, "query format")
    if ("{choices}" in config.query_format) != (config.choices_column is not None):
        raise UserError("a query format with {choices} needs a choices column, and the other way round")
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype))  # recorded concrete
    split = LabelledSplit(config)
    if not split.labelled:
        if config.icl:
            raise UserError(f"--icl {config.icl} needs labelled in-context examples, but {split.source} is "
                            "evaluated without labels (--no-labels or no label column)")
        # nothing to hold out or to pick examples from: the whole draw goes to the pool
        config = dataclasses.replace(config, **{k: 0 for k in ("test_size", "icl_candidates")
                                                if getattr(config, k) is None and config.subsets is None})
        log(f"{split.source}: evaluating without labels (logits only)")
    if config.activations is not None and (config.icl or config.activations < 0):
        raise UserError(f"--activations {config.activations} needs --icl 0 (with examples in the prompt, a probe "
                        "example's own label would be in its context) and N >= 0")
    if config.activations and not split.labelled:
        raise UserError(f"--activations {config.activations} picks labelled probe examples, but {split.source} "
                        "has no labels; use --activations 0")
    if config.activations and _own_icl_split(config):
        raise UserError(f"--activations {config.activations} picks probe examples from the pool's own split, but "
                        f"this task draws in-context examples from split {config.icl_split!r}; use --activations 0")
    icl_split = LabelledSplit(config, config.icl_split) if _own_icl_split(config) else split
    subsets = make_or_load_subsets(config, split, icl_split)
    k = len(config.label_words)
    candidate_rows = subset_rows(subsets, "icl_candidates")
    icl_positions = select_icl_examples(icl_split.labels(candidate_rows), config.icl, n_classes=k,
                                        seed=config.icl_seed, selection=config.icl_selection) \
        if icl_split.labelled else np.zeros(0, np.int64)
    icl_rows = candidate_rows[icl_positions]
    icl_choices = icl_split.choices(icl_rows) or [None] * len(icl_rows)
    icl_examples = [(text, config.label_words[label], *([c] if c is not None else []))
                    for text, label, c in zip(icl_split.texts(icl_rows), icl_split.labels(icl_rows), icl_choices)] \
        if icl_split.labelled else []

    if lm is None:
        from jaxprobe.runner import load_model

        lm = load_model(config.model, dtype=config.dtype, mesh_shape=config.mesh)
    rows = {name: subset_rows(subsets, name) for name in SUBSET_NAMES if len(subsets["rows"][name])}
    if config.activations:  # the examples an N-shot evaluation with the same subsets puts in its prompt
        rows["examples"] = candidate_rows[select_icl_examples(
            split.labels(candidate_rows), config.activations, n_classes=k, seed=config.icl_seed,
            selection=config.icl_selection)]
    prompts = {name: build_prompts(split.texts(r), instruction=config.resolved_instruction,
                                   answer_word=config.answer_word, examples=icl_examples,
                                   fmt=config.prompt_format, choices=split.choices(r))
               for name, r in rows.items()}
    decode = getattr(lm.tokenizer, "decode", None)
    label_token_ids = resolve_label_tokens(lm.tokenize, prompts["pool"][0], config.label_words,
                                           multi_token=config.multi_token_labels, decode=decode)
    settings = _settings(config, subsets, lm, label_token_ids, icl_rows)
    if not split.labelled:
        settings["labelled"] = False  # only then: labelled folders keep their settings
    if config.activations is not None:
        settings["activations"] = config.activations
    claim = lambda: claim_folder(out, "meta.json", settings, what="an evaluation", format=EVALUATION_FORMAT)  # noqa: E731
    if processes.decided(claim) is None:
        save_json(out / "meta.json", {  # first: it names the folder's settings
            "format": EVALUATION_FORMAT, "model": {"name": lm.name, "source": str(config.model),
                                                   "fingerprint": lm.fingerprint},
            "dataset": config.dataset, "split": config.split, "subsets_id": subsets["subsets_id"],
            "sizes": subsets["sizes"],
            "prompt_format": _describe_format(config),
            "instruction": config.resolved_instruction, "answer_word": config.answer_word,
            "label_words": list(config.label_words), "label_token_ids": label_token_ids,
            "label_tokens": [decode([t]) if decode else None for t in label_token_ids],
            "icl": {"n": config.icl, "selection": config.icl_selection, "seed": config.icl_seed,
                    "rows": icl_rows.tolist(), "labels": [e[1] for e in icl_examples],
                    **({"split": config.icl_split} if config.icl_split is not None else {})},
            "example_prompt": prompts["pool"][0], "settings": settings,
            **({} if split.labelled else {"labelled": False})})
    if not (out / "subsets.json").is_file():
        save_json(out / "subsets.json", {k_: v for k_, v in subsets.items() if k_ != "subsets_id"})

    todo = processes.decided(lambda: [name for name in rows if not (out / name / "metrics.json").is_file()])
    if todo:
        # One shared prefix for every prompt of this run, from whole-prompt tokenisations (the
        # "\n\n" before a query merges differently when the ICL text is tokenised on its own).
        ids = {name: lm.tokenize(prompts[name]) for name in todo}  # once: the prefix and the shards reuse them
        prefix = readable_prefix([row for name in todo for row in ids[name]])
        _evaluate_shards(lm, ids, out, config=config, label_token_ids=label_token_ids, prefix=prefix, rows=rows)
        for name in todo:
            _finish_subset(out / name, rows[name], split.labels(rows[name]), k, config.shard_size,
                           extra={"prefix_tokens_cached": len(prefix)}, groups=split.groups(rows[name]),
                           activations=_activation_shape(lm) if config.activations is not None else None)
    metrics = processes.decided(lambda: {name: _finished_subset(out, name, rows[name], split.labels(rows[name]), k)
                                         for name in rows})
    for name, m in metrics.items():
        log(f"{lm.name} {config.icl}-shot {name}: n={m['n']} " + (
            f"accuracy={m['accuracy']:.4f} cross-entropy={m['cross_entropy']:.4f}" if split.labelled
            else "(no labels: logits only)"))
    return out


def _finished_subset(out: Path, name: str, rows: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """A finished subset's metrics, after checking its arrays are still what this run wrote."""
    from jaxprobe.active.inputs import load_evaluation

    ev = load_evaluation(out, name, flag="--out", need_labels=labels is not None)
    if ev.logits.shape != (len(rows), n_classes) or not np.array_equal(ev.indices, rows) \
            or (labels is not None and not np.array_equal(ev.labels, labels)):
        raise UserError(f"{out / name}: damaged (its arrays are not what this evaluation wrote); "
                        "delete the folder and evaluate again")
    for key in ("n", "accuracy", "cross_entropy") if labels is not None else ("n",):
        if not isinstance(ev.metrics.get(key), (int, float)):
            raise UserError(f"{out / name / 'metrics.json'}: {key} is not a number; delete the folder "
                            "and evaluate again")
    return ev.metrics


def _evaluate_shards(lm, prompts: dict[str, list[list[int]]], out: Path, *, config: EvaluateConfig,
                     label_token_ids: list[int], prefix: list[int], rows: dict) -> None:
    from tqdm.auto import tqdm

    writers = {name: ShardedArrayWriter(out / name, len(texts), (len(label_token_ids),), config.shard_size)
               for name, texts in prompts.items()}
    act_writers = {name: ShardedArrayWriter(out / name / ACTIVATION_SHARDS, len(texts), _activation_shape(lm),
                                            config.shard_size)
                   for name, texts in prompts.items()} if config.activations is not None else {}
    # a shard is done when both its logits and (with --activations) its activations are on disk: a
    # run killed between the two merges of a subset recomputes the shards of the merged one
    work = sorted({(name, index) for group in (writers, act_writers) for name, writer in group.items()
                   for index in writer.pending()})
    total = sum(len(t) for t in prompts.values())
    done_rows = total - sum(writers[name].slices[index].stop - writers[name].slices[index].start
                            for name, index in work)
    if done_rows:
        print(f"resuming {out}: {done_rows} of {total} prompts already done", file=sys.stderr)
    bar = tqdm(total=total, initial=done_rows, desc=f"evaluate {Path(config.out).name}", unit="prompt",
               disable=not config.progress, dynamic_ncols=True)
    for name, index in work:
        part = writers[name].slices[index]
        # one forward pass for the logits and, with --activations, every hook point's activation
        found = lm.run(prompts[name][part], activations=bool(act_writers), token_ids=label_token_ids,
                       prefix_tokens=prefix, batch_size=config.batch_size)
        logits = found["logits"]
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if bad.size:
            raise UserError(f"{config.model} gave a NaN or infinite logit for {name} row "
                            f"{rows[name][part.start + bad[0]]} of {config.dataset}; try --dtype float32")
        writers[name].write(index, logits)
        if act_writers:
            act_writers[name].write(index, found["activations"])
        bar.update(part.stop - part.start)
    bar.close()


ACTIVATION_SHARDS = "activation_shards"


def _activation_shape(lm) -> tuple[int, int]:
    return (lm.n_hook_points, lm.config.d_model)


def _finish_subset(subset_dir: Path, rows: np.ndarray, labels: np.ndarray, n_classes: int, shard_size: int,
                   extra: dict, groups: list[str] | None = None,
                   activations: tuple[int, int] | None = None) -> None:
    if not processes.is_writer():
        return
    ShardedArrayWriter(subset_dir, len(rows), (n_classes,), shard_size).merge(subset_dir / "logits.npy")
    if activations is not None:
        acts = ShardedArrayWriter(subset_dir / ACTIVATION_SHARDS, len(rows), activations, shard_size)
        acts.merge(subset_dir / "activations.npy")
        shutil.rmtree(subset_dir / ACTIVATION_SHARDS, ignore_errors=True)
    logits = load_npy(subset_dir / "logits.npy")
    if labels is not None:
        save_npy(subset_dir / "labels.npy", labels)
    save_npy(subset_dir / "indices.npy", rows)
    found = label_metrics(logits, labels) if labels is not None else {"n": len(rows), "labelled": False}
    by_group = {}
    if groups is not None and labels is not None:  # e.g. MMLU per subject: n, accuracy, cross-entropy
        groups = np.asarray(groups)
        for g in sorted(set(groups.tolist())):
            m = label_metrics(logits[groups == g], labels[groups == g])
            by_group[g] = {key: m[key] for key in ("n", "accuracy", "cross_entropy")}
    save_json(subset_dir / "metrics.json", {**found, **extra, **({"by_group": by_group} if by_group else {})})


def _describe_format(config: EvaluateConfig) -> str:
    """The prompt's shape for meta.json, e.g. "{instruction}Sentence: '{s}' \\n{answer_word}:"."""
    query = config.query_format.replace("{text}", "{s}").replace("\n", "\\n")
    return "{instruction}" + (query + " {label}\\n\\n") * bool(config.icl) + query
