"""Predictions from any model: .npy / .csv / .parquet files of logits or probabilities, read as
checked log-probabilities, aligned by item id, and taken by `acquire` like an evaluate folder."""

import json

import numpy as np
import pandas as pd
import pytest

from jaxprobe.active import predictions as P
from jaxprobe.active.sweep import run_sweep
from jaxprobe.cli import main
from jaxprobe.errors import UserError
from jaxprobe.testing import synthetic_pool


def test_logits_and_probabilities_give_the_same_log_probs(tmp_path):
    t = synthetic_pool(30, 3, seed=0)[0]
    probs = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    np.save(tmp_path / "logits.npy", t)
    np.save(tmp_path / "probs.npy", probs)
    a, b = P.load_predictions_file(tmp_path / "logits.npy"), P.load_predictions_file(tmp_path / "probs.npy")
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-6)
    assert a.ids == [str(i) for i in range(30)] and a.labels is None


def test_table_columns_ids_labels_and_alignment(tmp_path):
    t, s, y = synthetic_pool(20, 2, seed=1)
    ids = [f"x{i}" for i in range(20)]
    pd.DataFrame({"id": ids, "neg": t[:, 0], "pos": t[:, 1], "label": np.array(["neg", "pos"])[y]}).to_csv(
        tmp_path / "t.csv", index=False)
    order = np.random.default_rng(0).permutation(20)  # the surrogate's rows in another order
    pd.DataFrame({"id": np.array(ids)[order], "a": s[order, 0], "b": s[order, 1]}).to_parquet(tmp_path / "s.parquet")
    target = P.load_pool(tmp_path / "t.csv", need_labels=True)
    surrogate = P.aligned(target, P.load_pool(tmp_path / "s.parquet", flag="--surrogate"))
    np.testing.assert_array_equal(target.labels, y)
    np.testing.assert_allclose(surrogate.logits, s, rtol=1e-6)
    assert target.label_words == ["neg", "pos"]


@pytest.mark.parametrize("content, match", [
    ({"id": [1, 1], "a": [0.0, 1.0], "b": [1.0, 0.0]}, "more than once"),
    ({"a": [0.0], "b": [1.0]}, "no `id` column"),
    ({"id": [1], "a": ["x"], "b": [1.0]}, "not numeric"),
    ({"id": [1], "a": [0.0]}, "K>=2"),
    ({"id": [1], "a": [np.nan], "b": [0.0]}, "NaN"),
    ({"id": [1, 2], "a": [0.0, 1.0], "b": [1.0, 0.0], "label": [0, 2]}, "outside 0..1"),
])
def test_bad_files_are_one_line(tmp_path, content, match):
    pd.DataFrame(content).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(UserError, match=match):
        P.load_pool(tmp_path / "p.csv")


def test_aligned_refuses_another_pool(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((5, 2)))
    np.save(tmp_path / "b.npy", np.zeros((6, 2)))
    np.save(tmp_path / "c.npy", np.zeros((5, 3)))
    a = P.load_pool(tmp_path / "a.npy")
    with pytest.raises(UserError, match="not the same pool"):
        P.aligned(a, P.load_pool(tmp_path / "b.npy"))
    with pytest.raises(UserError, match="K=3"):
        P.aligned(a, P.load_pool(tmp_path / "c.npy"))


def test_acquire_takes_prediction_files(tmp_path, capsys):
    t, s, y = synthetic_pool(40, 2, seed=2)
    pd.DataFrame({"id": np.arange(40) * 7, "c0": t[:, 0], "c1": t[:, 1], "label": y}).to_parquet(tmp_path / "t.parquet")
    np.save(tmp_path / "s.npy", s)
    args = ["acquire", "--target", str(tmp_path / "t.parquet"), "--surrogate", str(tmp_path / "s.npy"),
            "--runs", "8", "--size", "5", "--iid", "none", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # no test subset in a file
    assert "--true-risk pool" in capsys.readouterr().err
    assert main([*args, "--true-risk", "pool", "--out", str(tmp_path / "a")]) == 0
    expected = run_sweep(t, s, y, runs=8, size=5, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "estimates.npy"), expected)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["pool_size"] == 40
    np.save(tmp_path / "unlabelled.npy", t)
    assert main(["acquire", "--target", str(tmp_path / "unlabelled.npy"), "--acquisition", "iid", "--true-risk",
                 "pool", "--out", str(tmp_path / "b")]) == 2
    assert "no `label` column" in capsys.readouterr().err and not (tmp_path / "b").exists()
