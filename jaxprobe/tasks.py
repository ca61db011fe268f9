"""Task presets as data: which file, split and columns a classification task reads, its label words,
instruction, answer word and prompt format, where its in-context examples come from, and its
subset sizes (the experiment's and the paper's). The presets live in `tasks.toml` beside this file
(`sst2`, `subj`, `fpb`, `hs`, `mmlu`, `imdb`); a user's own task is a TOML or JSON file of one
table with the same keys (`--task FILE`).

    task = load_task("fpb")              # or a path to a .toml / .json file
    task.evaluate_fields(paper_scale=False)   # EvaluateConfig fields for this task
    task.prompt(text, examples=[(text, label id), ...])   # one prompt, as evaluate builds it
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxprobe import prompts
from jaxprobe.errors import UserError

PRESETS_FILE = Path(__file__).resolve().parent / "tasks.toml"


TRUTHS = ("test", "pool")


@dataclass(frozen=True)
class Sizes:
    """Rows of the seeded subsets: pool (acquired from), test (true risk), ICL candidates."""

    pool_size: int
    test_size: int
    icl_candidates: int


@dataclass(frozen=True)
class Task:
    """One classification task; the fields are the keys of a table in tasks.toml."""

    name: str
    description: str
    dataset: str                      # built-in source (data.BUILTIN), a local file, or a datasets name
    split: str                        # pool and test rows come from here
    label_words: tuple[str, ...]      # one per class id 0..K-1
    answer_word: str
    instruction: str
    sizes: Sizes                      # the experiment's default subsets
    paper_sizes: Sizes                # --paper-scale (spec 4, tab:set_sizes)
    text_column: str = "text"
    label_column: str = "label"
    choices_column: str | None = None  # multiple choice: the options listed under the question
    group_column: str | None = None    # results per group as well (MMLU: subject)
    keep_labels: tuple[int, ...] | None = None  # rows with other labels are dropped (HS: 0, 1)
    query_format: str = prompts.SENTENCE_QUERY
    choice_format: str = prompts.CHOICE_LINE
    icl: int = 50                     # in-context examples of the few-shot prompts (paper; MMLU 5)
    icl_split: str | None = None      # None: ICL candidates are rows of `split`, apart from pool/test
    multi_token_labels: str = "error"
    truth: str = "test"               # which subset's loss is the true risk (FPB: pool)
    probe_splits: tuple[str, str] = ("train", "test")  # probe-experiment's train / test splits

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    @property
    def prompt_format(self) -> prompts.PromptFormat:
        return prompts.PromptFormat(self.query_format, self.choice_format, self.label_words)

    def evaluate_fields(self, paper_scale: bool = False) -> dict:
        """The `EvaluateConfig` fields this task sets (sizes: the paper's with `paper_scale`)."""
        sizes = self.paper_sizes if paper_scale else self.sizes
        return {"dataset": self.dataset, "split": self.split, "text_column": self.text_column,
                "label_column": self.label_column, "label_words": self.label_words,
                "answer_word": self.answer_word, "instruction": self.instruction,
                "multi_token_labels": self.multi_token_labels, "query_format": self.query_format,
                "choice_format": self.choice_format, "choices_column": self.choices_column,
                "group_column": self.group_column, "keep_labels": self.keep_labels,
                "icl_split": self.icl_split, **dataclasses.asdict(sizes)}

    def prompt(self, text: str, examples: Sequence[tuple] = (), choices: Sequence[str] | None = None) -> str:
        """The prompt for one row: instruction, one block per example (text, label id[, choices]),
        then the query (the zero-shot prompt when `examples` is empty)."""
        words = [(e[0], self.label_words[e[1]], *e[2:]) for e in examples]
        return prompts.build_prompts([text], instruction=self.instruction, answer_word=self.answer_word,
                                     examples=words, fmt=self.prompt_format,
                                     choices=None if choices is None else [choices])[0]


_REQUIRED = ("description", "dataset", "split", "label_words", "answer_word", "instruction", "sizes",
             "paper_sizes")


def task_from_dict(name: str, table: dict, where: str) -> Task:
    """A Task from one table of keys; anything missing, unknown or of the wrong type is one line."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: task {name!r} must be a table of keys, not {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(Task)}
    unknown = sorted(set(table) - set(fields) - {"name"})
    if unknown:
        raise UserError(f"{where}: task {name!r} has unknown key(s) {unknown}; known: {sorted(fields)}")
    missing = [k for k in _REQUIRED if k not in table]
    if missing:
        raise UserError(f"{where}: task {name!r} lacks {missing}")
    values = dict(table)
    values["name"] = str(values.get("name", name))
    try:
        for key in ("sizes", "paper_sizes"):
            values[key] = Sizes(**{k: int(v) for k, v in values[key].items()})
        values["label_words"] = tuple(str(w) for w in values["label_words"])
        values["probe_splits"] = tuple(str(s) for s in values.get("probe_splits", ("train", "test")))
        if values.get("keep_labels") is not None:
            values["keep_labels"] = tuple(int(x) for x in values["keep_labels"])
        values["icl"] = int(values.get("icl", 50))
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}: task {name!r}: malformed value ({e})") from None
    for key in ("description", "dataset", "split", "answer_word", "instruction", "text_column",
                "label_column", "query_format", "choice_format", "multi_token_labels", "truth"):
        if key in values and not isinstance(values[key], str):
            raise UserError(f"{where}: task {name!r}: {key} must be a string, not {values[key]!r}")
    task = Task(**values)
    _check_task(task, where)
    return task


def _check_task(task: Task, where: str) -> None:
    w = f"{where}: task {task.name!r}"
    if task.n_classes < 2 or len(set(task.label_words)) != task.n_classes:
        raise UserError(f"{w}: label_words must be two or more different words, not {list(task.label_words)}")
    if task.truth not in TRUTHS:
        raise UserError(f"{w}: truth must be one of {', '.join(TRUTHS)}, not {task.truth!r}")
    if task.multi_token_labels not in prompts.MULTI_TOKEN_POLICIES:
        raise UserError(f"{w}: multi_token_labels must be one of {', '.join(prompts.MULTI_TOKEN_POLICIES)}")
    if len(task.probe_splits) != 2:
        raise UserError(f"{w}: probe_splits must name a train and a test split")
    prompts.check_query_format(task.query_format, f"{w}: query_format")
    if ("{choices}" in task.query_format) != (task.choices_column is not None):
        raise UserError(f"{w}: a query_format with {{choices}} needs choices_column, and the other way round")
    for sizes in (task.sizes, task.paper_sizes):
        if sizes.pool_size < 1 or sizes.test_size < 0 or sizes.icl_candidates < 0:
            raise UserError(f"{w}: sizes must have pool_size >= 1 and no negative size, not {sizes}")
        if sizes.test_size == 0 and task.truth == "test":
            raise UserError(f"{w}: test_size 0 needs truth = \"pool\" (there is no test subset)")
    if task.keep_labels is not None and any(not 0 <= k < task.n_classes for k in task.keep_labels):
        raise UserError(f"{w}: keep_labels {list(task.keep_labels)} must be class ids 0..{task.n_classes - 1}")


@functools.cache
def presets() -> dict[str, Task]:
    """The shipped presets, by name, in file order."""
    with open(PRESETS_FILE, "rb") as f:
        tables = tomllib.load(f)
    return {name: task_from_dict(name, table, str(PRESETS_FILE)) for name, table in tables.items()}


def load_task(spec: str) -> Task:
    """A preset by name, or a user's task from a .toml / .json file of one table (a TOML file may
    also hold one table per task under its name, if it holds exactly one)."""
    if spec in presets():
        return presets()[spec]
    path = Path(spec)
    if path.suffix.lower() not in (".toml", ".json"):
        raise UserError(f"--task {spec!r} is neither a preset ({', '.join(presets())}) nor a .toml/.json file")
    if not path.is_file():
        raise UserError(f"--task {spec}: no such file")
    try:
        if path.suffix.lower() == ".toml":
            with open(path, "rb") as f:
                table = tomllib.load(f)
        else:
            table = json.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--task {spec}: not a readable {path.suffix[1:]} file ({e})") from None
    if isinstance(table, dict) and len(table) == 1 and isinstance(next(iter(table.values())), dict) \
            and "dataset" not in table:
        name, table = next(iter(table.items()))
    else:
        name = path.stem
    return task_from_dict(name, table, f"--task {spec}")


def resolve_tasks(spec: str) -> list[Task]:
    """`all` = every preset; otherwise one task (`load_task`)."""
    return list(presets().values()) if spec == "all" else [load_task(spec)]
