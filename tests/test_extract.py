"""`jaxprobe extract` on a tiny random model: a killed run resumes to the bit-identical store, the
prefix cache changes nothing, and bad inputs end in one line naming the file or row."""

import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jaxprobe
from jaxprobe.cli import main

WORDS = "the movie was wonderful and the plot was dull but the acting was great film review".split()
N_ROWS = 24


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
    """Texts whose length grows with their position in shuffle(seed=42), so each shard meets a
    new padded length (a fresh compile): a run takes long enough to be killed mid-way."""
    order = np.random.default_rng(42).permutation(N_ROWS)
    texts = [""] * N_ROWS
    for position, row in enumerate(order):
        texts[row] = " ".join(WORDS[(row + j) % len(WORDS)] for j in range(2 + 4 * position))
    rows = [(t, i % 2) for i, t in enumerate(texts)]
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", rows)


@pytest.fixture(scope="module")
def short_csv(tmp_path_factory):
    rows = [(" ".join(WORDS[i:i + 3 + i % 4]), i % 2) for i in range(16)]
    return write_csv(tmp_path_factory.mktemp("short") / "short.csv", rows)


def extract_args(model, data, out, *extra):
    return ["extract", "--model", str(model), "--dataset", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--n", str(N_ROWS), "--shard-size", "8",
            "--batch-size", "8", "--no-progress", "--out", str(out), *extra]


def test_killed_extract_resumes_bit_identical(tiny_ckpt, reviews_csv, tmp_path, capsys):
    # A cold XLA cache for the subprocess, so every shard (a new padded length) compiles and the
    # run lasts long enough to be killed mid-way. It inherits this process's XLA flags.
    env = {**os.environ, "JAXPROBE_HOME": str(tmp_path / "cache")}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaxprobe.cli", *extract_args(tiny_ckpt, reviews_csv, killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_shard = killed / "shards" / "part-00000.npy"
    deadline = time.monotonic() + 120
    while not first_shard.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert first_shard.exists(), err.decode()[-2000:]
    assert not (killed / "activations.npy").exists(), "the run finished before it could be killed"
    n_done = len(list((killed / "shards").iterdir()))
    assert 1 <= n_done < N_ROWS // 8

    capsys.readouterr()
    assert main(extract_args(tiny_ckpt, reviews_csv, killed)) == 0  # the rerun: same command
    assert "resuming an unfinished store" in capsys.readouterr().out
    whole = tmp_path / "whole"  # an uninterrupted run
    assert main(extract_args(tiny_ckpt, reviews_csv, whole)) == 0
    assert (killed / "activations.npy").read_bytes() == (whole / "activations.npy").read_bytes()
    for name in ("labels.npy", "sample_indices.npy", "prompts.jsonl"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes()
    acts, labels, manifest = jaxprobe.open_activations(killed)
    assert acts.shape == (N_ROWS, 3, 64) and manifest["complete"] and not (killed / "shards").exists()
    assert np.abs(acts).max() > 0


def test_prefix_cache_gives_the_uncached_numbers(tiny_ckpt, short_csv, tmp_path):
    stores = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        code = main(extract_args(tiny_ckpt, short_csv, out, "--n", "10", "--template",
                                 "vector-5shot-untruncated", "--demonstrations-from", "10:15",
                                 "--prefix-cache", mode))
        assert code == 0
        stores[mode] = jaxprobe.open_activations(out)
    assert stores["on"].manifest["settings"]["prefix_tokens"] > 20
    assert stores["off"].manifest["settings"]["prefix_tokens"] == 0
    assert stores["on"].prompts() == stores["off"].prompts()
    assert stores["on"].prompts()[0].startswith("Classify the sentiment of the text.\nText: ")
    assert stores["on"].manifest["template"]["leaked_sample_items"] == []
    np.testing.assert_allclose(stores["on"].activations, stores["off"].activations, atol=1e-5, rtol=0)


def test_other_settings_into_an_existing_store_are_refused(tiny_ckpt, short_csv, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(extract_args(tiny_ckpt, short_csv, out, "--n", "4")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(extract_args(tiny_ckpt, short_csv, out, "--n", "4", "--positions", "mean")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "other settings (positions: stored 'last', asked 'mean')" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(extract_args(tiny_ckpt, short_csv, out, "--n", "4")) == 0  # same: nothing to do
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("rows, flags, message", [
    ([("fine text", 0), ("   ", 1)], [], r"reviews.csv split 'train' row 1 \(sample item \d\): empty"),
    ([("fine text", 0), ("other", 2)], [], r"row 1 \(sample item \d\): label 2 is not 0 or 1"),
    ([("fine text", 0), ("other", 1)], ["--text-column", "body"], r"no column 'body' \(--text-column\)"),
    ([("fine text", 0), ("other", 1)], ["--n", "5"], r"asked for 5 rows but the split has only 2"),
    ([("fine text", 0), ("other", 1)], ["--template", "{review}"], r"unsupported field \{review\}"),
    ([("fine text", 0), ("other", 1)], ["--template", "vector-5shot", "--demonstrations-from", "0:2"],
     r"gives 2 demonstrations; template 'vector-5shot' needs 5"),
])
def test_bad_input_is_one_line(tmp_path, capsys, rows, flags, message):
    data = write_csv(tmp_path / "reviews.csv", rows)
    args = extract_args("no-model-needed", data, tmp_path / "out", "--n", "2", *flags)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxprobe extract: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tmp_path, capsys):
    assert main(extract_args("m", tmp_path / "nope.csv", tmp_path / "out")) == 2
    assert "data file not found: " in capsys.readouterr().err
