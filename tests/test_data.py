"""Labelled data files a user brings: anything unreadable is one line naming the file."""

from __future__ import annotations

import pandas as pd
import pytest

from jaxprobe.data import check_binary_examples, load_split
from jaxprobe.errors import UserError

BROKEN_FILES = {
    "empty.csv": (b"", r"empty.csv: (holds no rows|not a readable csv file)"),
    "header.csv": (b"text,label\n", r"header.csv: holds no rows"),
    "latin1.csv": (b"text,label\n\xe9t\xe9 chaud,1\nok,0\n", r"latin1.csv: not a readable csv file: UnicodeDecodeError"),
    "fake.parquet": (b"not parquet at all", r"fake.parquet: not a readable parquet file"),
    "empty.jsonl": (b"", r"empty.jsonl: holds no rows"),
    "broken.jsonl": (b'{"text": "a", "label": 1}\n{oops\n', r"broken.jsonl: not a readable json file"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_unreadable_files_are_one_line_errors(tmp_path, name):
    content, message = BROKEN_FILES[name]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_split(str(tmp_path / name), "train")
    assert "\n" not in str(e.value)


def test_a_missing_column_names_the_flag(tmp_path):
    pd.DataFrame({"sentence": ["a b"], "label": [1]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(UserError, match=r"no column 'text' \(--text-column\); columns are \['sentence', 'label'\]"):
        load_split(str(tmp_path / "d.csv"), "train")
    ds = load_split(str(tmp_path / "d.csv"), "train", text_column="sentence")
    assert ds.column_names == ["text", "label"] and ds[0] == {"text": "a b", "label": 1}


@pytest.mark.parametrize("label, shown", [(0.5, "0.5"), (1.5, "1.5"), (2, "2"), ("pos", "'pos'"), (True, "True")])
def test_labels_other_than_0_or_1_are_refused_by_row(label, shown):
    with pytest.raises(UserError, match=rf"data.csv row 7 \(sample item 1\): label {shown} is not 0 or 1"):
        check_binary_examples(["fine", "also fine"], [1, label], [3, 7], "data.csv")
    with pytest.raises(UserError, match=r"row 3 \(sample item 0\): empty or whitespace-only text"):
        check_binary_examples(["  ", "x"], [0, 1], [3, 7], "data.csv")


# Rows and label counts as data/README.md states them (label id -> rows).
SHIPPED = {
    ("imdb", "train"): {0: 12_500, 1: 12_500}, ("imdb", "test"): {0: 12_500, 1: 12_500},
    ("sst2", "train"): {0: 29_780, 1: 37_569}, ("sst2", "validation"): {0: 428, 1: 444},
    ("subj", "train"): {0: 3_967, 1: 4_033}, ("subj", "test"): {0: 1_033, 1: 967},
    ("fpb", "train"): {0: 303, 1: 1_391, 2: 570},
    ("hs18", "train"): {0: 9_507, 1: 1_196, 2: 73, 3: 168},
    ("mmlu", "test"): {0: 3_222, 1: 3_462, 2: 3_582, 3: 3_776},
    ("mmlu", "validation"): {0: 381, 1: 379, 2: 387, 3: 384},
    ("mmlu", "dev"): {0: 67, 1: 69, 2: 71, 3: 78},
}


@pytest.mark.parametrize("source, split", sorted(SHIPPED))
def test_each_shipped_file_has_the_rows_and_labels_its_readme_states(source, split):
    mmlu = source == "mmlu"
    ds = load_split(source, split, text_column="question" if mmlu else "text",
                    label_column="answer" if mmlu else "label",
                    extra_columns=("choices", "subject") if mmlu else ())
    labels = pd.Series(ds["label"]).value_counts().to_dict()
    assert labels == SHIPPED[(source, split)]
    assert len(ds) == sum(SHIPPED[(source, split)].values())
    if mmlu:
        assert ds.column_names == ["text", "label", "choices", "subject"]
        assert {len(c) for c in ds["choices"]} == {4} and len(set(ds["subject"])) == 57
