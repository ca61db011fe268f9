"""Data sampling and prompt templates against the probing reference (spec probing.md 1.1, 1.4,
1.5 and Appendix A): the exact strings, not just their shape."""

import numpy as np
import pytest

from jaxprobe import prompts
from jaxprobe.data import check_binary_examples, load_split, reference_sample, reference_sample_rows
from jaxprobe.errors import UserError

# Spec Appendix A, verbatim: the demonstration block the reference notebook printed.
APPENDIX_A_BLOCK = (
    'Classify the sentiment of the text.\n'
    'Text: like to compare, to judge, to evaluate. How about just enjoying? Funny thing too, '
    'people writing Fortier looks American but, on the other hand, arguing they prefer '
    "American series (!!!). Maybe it's the language, or the spirit, but I think this series "
    'is more English than American. By the way, the actors are really good and funny. The '
    'acting is not superficial at all...\n'
    'Sentiment: positive\n'
    'Text: favorite song is sung by the King, Hank (bing Crosby) and Sir "Saggy" Sagamore. '
    'OVerall a great family movie or even a great Date movie. This is a movie you can watch '
    'over and over again. The princess played by Rhonda Fleming is gorgeous. I love this '
    'movie!! If you liked Danny Kaye in the Court Jester then you will definitely like this '
    'movie.\n'
    'Sentiment: positive\n'
    'Text: comprehensible reason for the engagement in South Asia. And for that matter also '
    'the reason for every single US-American soldier that was there. Instead, Rambo gets to '
    'take revenge for the wounds of a whole nation. It would have been better to work on how '
    'to deal with the memories, rather than suppressing them. "Do we get to win this time?" '
    'Yes, you do.\n'
    'Sentiment: negative\n'
    "Text: employ a political spoils system. There's nothing noble in that. The Missourians "
    'could have easily traveled east and joined the Confederate Army.<br /><br />It seems to '
    'me that the story has nothing to do with ambiguity. When Jake leaves the Bushwhackers, '
    "it's not because he saw error in his way, he certainly doesn't give himself over to the "
    'virtue of the cause of abolition.\n'
    'Sentiment: positive\n'
    "Text: this finally drives home the film's other big flaw: lack of originality. In this "
    "review, I realize it's been far too easy to reference many other films. Granted, this "
    'film is an improvement on most of them, but still. *The Secret Lives of Dentists* is '
    "worth seeing, but don't get too excited about it. (Not that you were all that excited, "
    'anyway. I guess.)\n'
    'Sentiment: negative\n'
)


@pytest.fixture(scope="module")
def imdb_train():
    return load_split("imdb", "train")


@pytest.fixture(scope="module")
def train_sample(imdb_train):
    return reference_sample(imdb_train, 100, seed=42)


def test_reference_sample_label_order(train_sample):
    labels = train_sample["label"]
    assert labels[:10] == [1, 1, 0, 1, 0, 1, 1, 0, 0, 1]
    assert sum(labels) == 47 and len(labels) == 100


def test_test_sample_is_balanced():
    test_sample = reference_sample(load_split("imdb", "test"), 300, seed=42)
    assert sum(test_sample["label"]) == 150


def test_sample_rows_are_the_numpy_permutation(imdb_train, train_sample):
    sample, rows = reference_sample_rows(imdb_train, 100, seed=42)
    # datasets' shuffle(seed) is numpy's default_rng(seed).permutation (spec 1.1)
    np.testing.assert_array_equal(rows, np.random.default_rng(42).permutation(len(imdb_train))[:100])
    assert sample["text"] == train_sample["text"]
    assert [imdb_train[int(r)]["text"] for r in rows[:3]] == train_sample["text"][:3]


def test_demonstration_block_is_appendix_a(train_sample):
    demos = train_sample.select(range(5))
    block = prompts.demonstration_block(demos["text"], demos["label"])
    assert block == APPENDIX_A_BLOCK
    assert len(block.split(" ")) == 331  # spec 1.5


def test_vector_5shot_prompts_for_train_item_0(train_sample):
    block = prompts.demonstration_block(train_sample["text"][:5], train_sample["label"][:5])
    text0 = train_sample["text"][0]
    untruncated = prompts.vector_5shot_untruncated_prompt(text0, block)
    assert untruncated.startswith(APPENDIX_A_BLOCK + "Text: There is no relation at all between "
                                  "Fortier and Profiler but the fact that both are police series "
                                  "about violent crimes.")
    assert untruncated.endswith(" The acting is not superficial at all... The sentiment is")
    assert len(untruncated.split(" ")) == 459  # spec 1.5
    faithful = prompts.vector_5shot_prompt(text0, block)
    assert faithful.startswith("political spoils system. There's nothing noble in that.")
    assert len(faithful.split(" ")) == 256
    assert untruncated.endswith(faithful)
    assert prompts.TEMPLATES["vector-5shot"].prompts([text0], block) == [faithful]


def test_raw_keeps_last_256_single_space_pieces():
    words = [f"w{i}" for i in range(300)]
    text = " ".join(words[:10]) + "  " + " ".join(words[10:])  # a double space is an empty piece
    out = prompts.raw_prompt(text)
    assert out == " ".join(words[-256:])
    short = "a  b\nc"
    assert prompts.raw_prompt(short) == short
    assert prompts.truncate_words("a b c d", 2) == "c d"


def test_format_template():
    t = prompts.get_template("Review: {text}\nAnswer:")
    assert not t.uses_demonstrations
    assert t.prompts(["good {film}"]) == ["Review: good {film}\nAnswer:"]
    t2 = prompts.get_template("{demonstrations}Q: {text} {{A}}:")
    assert t2.uses_demonstrations and t2.n_shots is None
    assert t2.render("x", "D\n") == "D\nQ: x {A}:"


@pytest.mark.parametrize("bad", ["{txt}", "no field", "{text!r}", "{text:>5}", "{text"])
def test_bad_templates_are_one_line_errors(bad):
    with pytest.raises(UserError, match="--template"):
        prompts.get_template(bad)


def test_row_slice():
    assert prompts.parse_row_slice("100:105") == range(100, 105)
    for bad in ("5", "a:b", "5:5", "-1:3"):
        with pytest.raises(UserError, match="--demonstrations-from"):
            prompts.parse_row_slice(bad)


def test_check_binary_examples_names_the_row():
    check_binary_examples(["a", "b"], [0, 1], [10, 11], "data.csv")
    with pytest.raises(UserError, match=r"data.csv row 11 \(sample item 1\): empty"):
        check_binary_examples(["a", " \n"], [0, 1], [10, 11], "data.csv")
    with pytest.raises(UserError, match=r"row 7 .*label 2 is not 0 or 1"):
        check_binary_examples(["a"], [2], [7], "data.csv")
