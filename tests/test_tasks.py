"""Task presets: every preset's zero-shot and few-shot prompt for a fixed row equals the paper's
format byte for byte (expected strings written by hand from spec section 4), and a user's task file
or a bad preset is one line."""

from __future__ import annotations

import json

import pytest

from jaxprobe import tasks
from jaxprobe.data import load_split
from jaxprobe.errors import UserError

SST2 = ('Classify the sentiment of the following sentence as "positive" or "negative". '
        'Respond with "positive" or "negative".\n')


def _row(task, split, i):
    extra = (task.choices_column,) if task.choices_column else ()
    ds = load_split(task.dataset, split, text_column=task.text_column, label_column=task.label_column,
                    extra_columns=extra)
    r = ds[i]
    return r["text"], r["label"], (list(r[task.choices_column]) if extra else None)


EXPECTED = {  # task -> (zero-shot, one-shot with the in-context source's row 1 as its example)
    "sst2": (SST2 + "Sentence: 'hide new secretions from the parental units' \nLabel:",
             SST2 + "Sentence: 'contains no wit , only labored gags' \nLabel: negative\n\n"
             "Sentence: 'hide new secretions from the parental units' \nLabel:"),
    "subj": (("Is the following sentence `objective` or `subjective`. Respond with `objective` or `subjective`.\n"
             "Sentence: 'the tucks have a secret , they 're immortal . they' \nAnswer:"),
             ("Is the following sentence `objective` or `subjective`. Respond with `objective` or `subjective`.\n"
             "Sentence: 'my 5-year-old niece emily was so thrilled by the first 20 minutes , she announced , "
             "`` i 'm gon na try to stay awake through the whole movie ! `` , which she then proceeded to do .' "
             "\nAnswer: subjective\n\n"
             "Sentence: 'the tucks have a secret , they 're immortal . they' \nAnswer:")),
    "fpb": (('Classify the sentiment of the following sentence as "negative", "neutral" or "positive". '
            'Respond with "negative", "neutral" or "positive".\n'
            "Sentence: 'According to Gran , the company has no plans to move all production to Russia , "
            "although that is where the company is growing .' \nAnswer:"),
            ('Classify the sentiment of the following sentence as "negative", "neutral" or "positive". '
            'Respond with "negative", "neutral" or "positive".\n'
            "Sentence: 'For the last quarter of 2010 , Componenta 's net sales doubled to EUR131m from EUR76m "
            "for the same period a year earlier , while it moved to a zero pre-tax profit from a pre-tax loss "
            "of EUR7m .' \nAnswer: positive\n\n"
            "Sentence: 'According to Gran , the company has no plans to move all production to Russia , "
            "although that is where the company is growing .' \nAnswer:")),
    "hs": (('Does the sentence contain hate speech? Respond with "yes" or "no".\n'
           "Sentence: 'As of March 13th , 2014 , the booklet had been downloaded over 18,300 times and "
           "counting .' \nAnswer:"),
           ('Does the sentence contain hate speech? Respond with "yes" or "no".\n'
           "Sentence: 'In order to help increase the booklets downloads , it would be great if all "
           "Stormfronters who had YouTube accounts , could display the following text in the description "
           "boxes of their uploaded YouTube videos .' \nAnswer: no\n\n"
           "Sentence: 'As of March 13th , 2014 , the booklet had been downloaded over 18,300 times and "
           "counting .' \nAnswer:")),
    "mmlu": (("Answer the question with the correct letter. Respond with only 'A', 'B', 'C' or 'D'.\n"
             "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q. \n"
             "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"),
             ("Answer the question with the correct letter. Respond with only 'A', 'B', 'C' or 'D'.\n"
             "Question: Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. "
             "Statement 2 | If H and K are subgroups of G then HK is a subgroup of G. \n"
             "A. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: B\n\n"
             "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q. \n"
             "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_prompts_equal_the_papers_format_byte_for_byte(name):
    task = tasks.load_task(name)
    text, _, choices = _row(task, task.split, 0)
    example_text, example_label, example_choices = _row(task, task.icl_split or task.split, 1)
    example = (example_text, example_label) + ((example_choices,) if example_choices else ())
    zero, few = EXPECTED[name]
    assert task.prompt(text, choices=choices) == zero
    assert task.prompt(text, [example], choices=choices) == few


def test_imdb_uses_sst2s_prompt_and_every_preset_loads():
    assert list(tasks.presets()) == ["sst2", "subj", "fpb", "hs", "mmlu", "imdb"]
    task = tasks.load_task("imdb")
    assert task.prompt(" Great film. ") == SST2 + "Sentence: 'Great film.' \nLabel:"
    assert [t.n_classes for t in tasks.resolve_tasks("all")] == [2, 2, 3, 2, 4, 2]
    hs, subj, mmlu, fpb = (tasks.load_task(n) for n in ("hs", "subj", "mmlu", "fpb"))
    assert hs.keep_labels == (0, 1) and subj.icl_split == "test" and subj.multi_token_labels == "first"
    assert (mmlu.icl, mmlu.icl_split, mmlu.group_column) == (5, "dev", "subject")
    assert fpb.truth == "pool" and fpb.paper_sizes.test_size == 0
    assert tasks.load_task("sst2").evaluate_fields(paper_scale=True)["pool_size"] == 10_000


def test_a_users_task_file_toml_or_json(tmp_path):
    table = {"description": "mine", "dataset": "fpb", "split": "train", "label_words": ["bad", "meh", "good"],
             "answer_word": "Mood", "instruction": "How is it?\n", "truth": "pool",
             "sizes": {"pool_size": 10, "test_size": 0, "icl_candidates": 5},
             "paper_sizes": {"pool_size": 10, "test_size": 0, "icl_candidates": 5}}
    (tmp_path / "mine.json").write_text(json.dumps(table))
    task = tasks.load_task(str(tmp_path / "mine.json"))
    assert task.name == "mine" and task.prompt("It went up.") == "How is it?\nSentence: 'It went up.' \nMood:"
    (tmp_path / "t.toml").write_text('[fancy]\ndescription = "x"\ndataset = "sst2"\nsplit = "train"\n'
                                     'label_words = ["no", "yes"]\nanswer_word = "A"\ninstruction = ""\n'
                                     'sizes = { pool_size = 5, test_size = 5, icl_candidates = 5 }\n'
                                     'paper_sizes = { pool_size = 5, test_size = 5, icl_candidates = 5 }\n')
    assert tasks.load_task(str(tmp_path / "t.toml")).name == "fancy"


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"label_words": ["a"]}, "two or more different words"),
    ({"query_format": "Q: {question}"}, "must use {text}"),
    ({"truth": "test"}, "test_size 0 needs truth"),
    ({"keep_labels": [0, 5]}, "keep_labels"),
    ({"sizes": {"pool_size": "many"}}, "malformed value"),
])
def test_bad_task_files_are_one_line(tmp_path, change, message):
    table = {"description": "x", "dataset": "fpb", "split": "train", "label_words": ["a", "b", "c"],
             "answer_word": "A", "instruction": "", "truth": "pool",
             "sizes": {"pool_size": 10, "test_size": 0, "icl_candidates": 5},
             "paper_sizes": {"pool_size": 10, "test_size": 0, "icl_candidates": 5}, **change}
    (tmp_path / "bad.json").write_text(json.dumps(table))
    with pytest.raises(UserError, match=message) as e:
        tasks.load_task(str(tmp_path / "bad.json"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="neither a preset"):
        tasks.load_task("nope")
