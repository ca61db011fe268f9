"""The command line's one error path: a bad flag, or a folder jaxprobe wrote and that was damaged
since, is one line naming the flag or file (exit 2), never a traceback, and changes nothing."""

from __future__ import annotations


import numpy as np
import pytest

from jaxprobe.cli import main
from jaxprobe.testing import write_tiny_dataset


def _error(capsys, argv) -> str:
    """Run the CLI in-process; return its one error line (argparse's usage line aside)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: usage, then one error line
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["extract", "--out", "x", "--seed", "-1"], "argument --seed: a seed is a non-negative integer, not '-1'"),
    (["evaluate", "--out", "x", "--icl-seed", "-4"], "argument --icl-seed: a seed is a non-negative integer"),
    (["evaluate", "--out", "x", "--seed", "x1"], "argument --seed: a seed is a non-negative integer, not 'x1'"),
    (["acquire", "--target", "t", "--out", "x", "--seed", "-2"], "argument --seed: a seed is a non-negative"),
    (["active-experiment", "--sweep-seed", "-3"], "argument --sweep-seed: a seed is a non-negative"),
    (["probe", "--train", "a", "--test", "b", "--out", "x", "--layers", "3-1"], "the range 3-1 runs backwards"),
    (["probe", "--train", "a", "--test", "b", "--out", "x", "--layers", "one"], "give 'all' or hook points"),
])
def test_bad_flags_are_one_line(capsys, tmp_path, argv, message):
    assert message in _error(capsys, argv)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_ckpt):
    """A finished store pair, probe run and evaluate folder of a tiny model, to damage copies of."""
    root = tmp_path_factory.mktemp("written")
    dataset = write_tiny_dataset(root / "data.parquet", 40, seed=3)
    common = ["--model", str(tiny_ckpt), "--dataset", str(dataset), "--no-progress"]
    commands = {
        "store": ["extract", *common, "--n", "12"],
        "store2": ["extract", *common, "--n", "12", "--seed", "1"],
        "evaluation": ["evaluate", *common, "--label-words", "a,positive", "--pool-size", "12",
                       "--test-size", "6", "--icl-candidates", "4"],
        "probe": ["probe", "--train", str(root / "store"), "--test", str(root / "store2"), "--seeds", "2",
                  "--recipe", "logreg", "--no-progress"],
    }
    for name, argv in commands.items():
        assert main([*argv, "--out", str(root / name)]) == 0
    return root, commands


def test_max_length_over_the_context_is_refused(written, capsys):
    root, commands = written
    err = _error(capsys, [*commands["store"], "--max-length", "100000", "--out", root / "long"])
    assert err.endswith("--max-length 100000 is over the model's context of 512 tokens")
    assert not (root / "long").exists()


def _damage_copy(root, name, relative, damage):
    import shutil

    copy = root / f"{name}-{relative.replace('/', '_')}-{damage.__name__}"
    shutil.copytree(root / name, copy)
    damage(copy / relative)
    return copy


def truncated(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def shuffled(path):
    array = np.load(path)
    np.save(path, array[::-1].copy())


def floats(path):
    np.save(path, np.load(path) + 0.5)


@pytest.mark.parametrize("name, relative, damage, message", [
    ("store", "labels.npy", shuffled, "labels.npy: damaged"),
    ("store", "labels.npy", floats, "labels.npy: damaged (holds float64"),
    ("store", "activations.npy", truncated, "activations.npy: truncated or corrupt .npy file"),
    ("store", "manifest.json", truncated, "manifest.json: corrupt JSON"),
    ("evaluation", "pool/logits.npy", truncated, "logits.npy: truncated or corrupt .npy file"),
    ("evaluation", "pool/indices.npy", shuffled, "pool: damaged"),
    ("evaluation", "test/metrics.json", truncated, "metrics.json: corrupt JSON"),
    ("evaluation", "meta.json", truncated, "meta.json: corrupt JSON"),
    ("probe", "sweeps/logreg/test_accuracy.npy", truncated, "test_accuracy.npy: truncated or corrupt .npy file"),
    ("probe", "sweeps/logreg/final_train_loss.npy", floats, None),  # values are not checked, only shape
])
def test_a_damaged_folder_is_named_on_rerun_and_left_as_it_is(written, capsys, monkeypatch, name, relative,
                                                              damage, message):
    root, commands = written
    copy = _damage_copy(root, name, relative, damage)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and not p.name.startswith(".")}
    argv = [*commands[name], "--out", copy]
    if message is None:
        assert main([str(a) for a in argv]) == 0
        return
    assert message in _error(capsys, argv)
    assert before == {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_a_damaged_sweep_array_of_the_wrong_shape_is_named(written, capsys):
    root, commands = written
    copy = _damage_copy(root, "probe", "sweeps/logreg/test_accuracy.npy", lambda p: np.save(p, np.load(p)[:, :1]))
    err = _error(capsys, [*commands["probe"], "--out", copy])
    assert "test_accuracy.npy: holds float64" in err and "delete it and rerun" in err
