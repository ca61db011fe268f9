"""`jaxprobe extract`: the residual stream of every hook point at each prompt's last token (or the
mean over its tokens), for a labelled sample of a data set, into a resumable activation store.

Layer numbering everywhere is the hook-point index: 0 = token embeddings, i = residual stream after
block i-1 (HF `hidden_states[i]` without the final norm). The reference's "layer N" (its
`layers.N` module) is hook point N+1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxprobe import data, prompts
from jaxprobe.batching import readable_prefix
from jaxprobe.errors import UserError
from jaxprobe.sources import DEFAULT_MODEL
from jaxprobe.store import write_store

PREFIX_CACHE_MODES = ("auto", "on", "off")


TASK_TEMPLATE = "task"  # with --task: the task's own prompt (instruction, demonstrations, query)


MIN_AUTO_PREFIX_TOKENS = 32  # below this a shared prefix is not worth a separate pass


@dataclass(frozen=True)
class ExtractConfig:
    """Everything `jaxprobe extract` needs; each field is one command-line flag."""

    out: str
    model: str = DEFAULT_MODEL
    dataset: str = "imdb"
    split: str = "train"
    n: int = 100
    seed: int = 42
    template: str = "raw"
    demonstrations_from: str = "0:5"
    demonstrations_split: str = "train"
    label_names: tuple[str, ...] = prompts.LABEL_NAMES  # one per class id; K = how many
    positions: str = "last"
    batch_size: int = 8
    shard_size: int = 32
    dtype: str = "auto"  # float32 on CPUs, bfloat16 on accelerators
    max_length: int | None = None
    prefix_cache: str = "auto"
    text_column: str = "text"
    label_column: str = "label"
    progress: bool = True
    mesh: tuple[int, int] | None = None  # (data, model) devices; None: load_model's default
    task: str | None = None  # a task preset or file: its columns, label filter, label words, prompt
    skip: int = 0            # sample = rows skip..skip+n-1 of the shuffle (a test sample apart from train)


@dataclass(frozen=True)
class PreparedPrompts:
    prompts: list[str]
    labels: list[int]
    rows: np.ndarray                 # each example's row in the source split
    demonstration_rows: list[int]    # rows of the demonstration split ([] if none)
    leaked_items: list[int]          # sample items that are also demonstrations


def _where(dataset: str, split: str) -> str:
    return f"{dataset} split {split!r}"


def _load(cfg: ExtractConfig, split: str, task):
    """One split, filtered to the task's labels (HS keeps label < 2) when a task is given."""
    extra = (task.choices_column,) if task is not None and task.choices_column else ()
    ds = data.load_split(cfg.dataset, split, text_column=cfg.text_column, label_column=cfg.label_column,
                         extra_columns=extra)
    if task is not None and task.keep_labels is not None:
        ds = ds.select(np.flatnonzero(np.isin(np.asarray(ds["label"]), task.keep_labels)))
    return ds


def _resolve_task(cfg: ExtractConfig):
    """(cfg with the task's columns and label words, the task or None)."""
    from jaxprobe.tasks import load_task

    if cfg.task is None:
        return cfg, None
    task = load_task(cfg.task)
    return dataclasses.replace(cfg, text_column=task.text_column, label_column=task.label_column,
                               label_names=task.label_words), task


def _template(cfg: ExtractConfig, task) -> prompts.Template:
    if cfg.template != TASK_TEMPLATE:
        return prompts.get_template(cfg.template)
    if task is None:
        raise UserError(f"--template {TASK_TEMPLATE} needs --task (the task's prompt)")
    return prompts.Template(TASK_TEMPLATE, f"the {task.name} task's prompt: instruction, demonstrations "
                            "and query in its format", lambda text, block: text, True)


def prepare_prompts(cfg: ExtractConfig) -> PreparedPrompts:
    """The sample (`shuffle(seed).select(range(skip, skip + n))`), its prompts and labels, checked row
    by row. With a task and `--template task`: instruction, demonstrations and query in the task's
    format (the active-testing prompt), label words from the task."""
    cfg, task = _resolve_task(cfg)
    template = _template(cfg, task)
    prompts.parse_row_slice(cfg.demonstrations_from)  # a malformed flag is refused even where unused
    if cfg.n < 1 or cfg.skip < 0:
        raise UserError(f"--n must be at least 1 and --skip at least 0, not {cfg.n} and {cfg.skip}")
    ds = _load(cfg, cfg.split, task)
    sample, rows = data.reference_sample_rows(ds, cfg.skip + cfg.n, cfg.seed)
    if cfg.skip:
        sample, rows = sample.select(range(cfg.skip, cfg.skip + cfg.n)), rows[cfg.skip:]
    texts, labels = sample["text"], sample["label"]
    data.check_examples(texts, labels, rows, _where(cfg.dataset, cfg.split), len(cfg.label_names))
    block, demo_rows, leaked = None, [], []
    if template.uses_demonstrations:
        shots = prompts.parse_row_slice(cfg.demonstrations_from)
        if template.n_shots is not None and len(shots) != template.n_shots:
            raise UserError(f"--demonstrations-from {cfg.demonstrations_from} gives {len(shots)} "
                            f"demonstrations; template {template.name!r} needs {template.n_shots}")
        demo_ds = ds if cfg.demonstrations_split == cfg.split else _load(cfg, cfg.demonstrations_split, task)
        demo_sample, all_demo_rows = data.reference_sample_rows(demo_ds, shots.stop, cfg.seed)
        demos = demo_sample.select(shots)
        demo_rows = [int(r) for r in all_demo_rows[shots.start:]]
        data.check_examples(demos["text"], demos["label"], demo_rows,
                            _where(cfg.dataset, cfg.demonstrations_split), len(cfg.label_names))
        if template.name == TASK_TEMPLATE:
            choices = demos[task.choices_column] if task.choices_column else [None] * len(demos)
            block = prompts.icl_context(task.instruction, [
                (t, task.label_words[y], *([list(c)] if c is not None else []))
                for t, y, c in zip(demos["text"], demos["label"], choices)], task.answer_word, task.prompt_format)
        else:
            block = prompts.demonstration_block(demos["text"], demos["label"], label_names=cfg.label_names)
        if cfg.demonstrations_split == cfg.split:
            demo_set = set(demo_rows)
            leaked = [i for i, r in enumerate(rows) if int(r) in demo_set]
    if template.name == TASK_TEMPLATE:  # block = instruction + demonstrations, then each query
        choices = [list(c) for c in sample[task.choices_column]] if task.choices_column else [None] * len(texts)
        texts_out = [block + prompts.query_block(t, task.answer_word, task.prompt_format, c)
                     for t, c in zip(texts, choices)]
    else:
        texts_out = template.prompts(texts, block)
    return PreparedPrompts(texts_out, [int(x) for x in labels], rows, demo_rows, leaked)


def extract(cfg: ExtractConfig, lm=None, log: Callable[[str], None] = print) -> Path:
    """Write (or finish) the activation store `cfg.out`; `lm` reuses an already loaded model."""
    if cfg.positions not in ("last", "mean"):
        raise UserError(f"--positions must be last or mean, not {cfg.positions!r}")
    if cfg.prefix_cache not in PREFIX_CACHE_MODES:
        raise UserError(f"--prefix-cache must be one of {', '.join(PREFIX_CACHE_MODES)}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    if cfg.max_length is not None and cfg.max_length < 1:
        raise UserError(f"--max-length must be at least 1, not {cfg.max_length}")
    from jaxprobe.runner import resolve_dtype

    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype))  # what a store records is concrete
    prepared = prepare_prompts(cfg)
    cfg, task = _resolve_task(cfg)
    if prepared.leaked_items:
        log(f"note: sample items {_ranges(prepared.leaked_items)} are also the demonstrations (the "
            "reference's leakage); --demonstrations-from a slice past --n avoids it")
    if lm is None:
        from jaxprobe.runner import load_model

        log(f"loading model {cfg.model} ({cfg.dtype})")
        lm = load_model(cfg.model, dtype=cfg.dtype, mesh_shape=cfg.mesh)
    elif np.dtype(lm.dtype).name != cfg.dtype:
        raise ValueError(f"the loaded model is {np.dtype(lm.dtype).name}, the config asks for {cfg.dtype}")
    if cfg.max_length is not None and cfg.max_length > lm.config.max_position:
        raise UserError(f"--max-length {cfg.max_length} is over the model's context of "
                        f"{lm.config.max_position} tokens")
    ids = lm.tokenize(prepared.prompts)  # once: the prefix and every shard reuse these
    ids_of = dict(zip(prepared.prompts, ids))
    limit = cfg.max_length or lm.config.max_position
    token_counts = [min(len(r), limit) for r in ids]
    prefix = _choose_prefix(ids, cfg.prefix_cache, limit, log)

    def compute(texts: list[str]) -> np.ndarray:
        # one call per shard: its batches, and so its numbers, never depend on where a run stopped
        return lm.activations([ids_of[t] for t in texts], positions=cfg.positions, batch_size=cfg.batch_size,
                              max_length=cfg.max_length, prefix_tokens=prefix or None)

    settings = {
        "model_fingerprint": lm.fingerprint, "model_dtype": cfg.dtype, "dataset": cfg.dataset,
        "split": cfg.split, "n": cfg.n, "seed": cfg.seed, "template": cfg.template,
        "demonstrations": ({"split": cfg.demonstrations_split, "from": cfg.demonstrations_from,
                            "label_names": list(cfg.label_names)}
                           if prepared.demonstration_rows else None),
        "text_column": cfg.text_column, "label_column": cfg.label_column,
        **({"task": cfg.task} if cfg.task is not None else {}), **({"skip": cfg.skip} if cfg.skip else {}),
        "positions": cfg.positions, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "prefix_tokens": len(prefix),
    }
    template = _template(cfg, task)
    describe = {
        "model": {"name": lm.name, "source": cfg.model, "fingerprint": lm.fingerprint,
                  "n_layers": lm.config.n_layers, "d_model": lm.config.d_model, "dtype": cfg.dtype},
        "dataset": {"name": cfg.dataset, "split": cfg.split, "n": cfg.n, "seed": cfg.seed,
                    "sample": "shuffle(seed).select(range(n))"},
        "template": {"name": template.name, "description": template.description,
                     "demonstration_rows": prepared.demonstration_rows,
                     "leaked_sample_items": prepared.leaked_items},
        "positions": cfg.positions, "tokens": int(sum(token_counts)),
    }
    log(f"extract: {len(ids)} prompts, {sum(token_counts):,} tokens, {lm.n_hook_points} hook "
        f"points x {lm.config.d_model} -> {cfg.out}")
    return write_store(cfg.out, prompts=prepared.prompts, labels=prepared.labels,
                       sample_indices=prepared.rows, settings=settings,
                       n_hook_points=lm.n_hook_points, d_model=lm.config.d_model, compute=compute,
                       shard_size=cfg.shard_size, token_counts=token_counts, describe=describe,
                       progress=cfg.progress, log=log)


def _choose_prefix(ids: list[list[int]], mode: str, limit: int, log: Callable[[str], None]) -> list[int]:
    """The shared token prefix of ALL prompts (computed once, passed to every shard), or []."""
    if mode == "off" or len(ids) < 2:
        return []
    if max(len(r) for r in ids) > limit:
        if mode == "on":
            raise UserError(f"--prefix-cache on: a prompt has {max(len(r) for r in ids)} tokens, "
                            f"over --max-length {limit}; cutting it would cut the shared prefix")
        return []
    prefix = readable_prefix(ids)
    if mode == "auto" and len(prefix) < MIN_AUTO_PREFIX_TOKENS:
        return []
    if prefix:
        log(f"prefix cache: all prompts share their first {len(prefix)} tokens; computed once")
    return prefix


def _ranges(items: Sequence[int]) -> str:
    items = list(items)
    if items == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}" if len(items) > 1 else str(items[0])
    return ", ".join(map(str, items))
