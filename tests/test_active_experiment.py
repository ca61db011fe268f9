"""`jaxprobe active-experiment`: the paper's table arithmetic, and the whole command (evaluate ->
sweeps -> table, plots) on a tiny random model, resumed and refused like every other stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxprobe.active.experiment import (
    ExperimentConfig, format_table, median_se, relative_error, run_experiment, table_rows, verdicts)
from jaxprobe.errors import UserError


def test_median_se_and_relative_error_by_hand():
    estimates = np.array([[0.5, 0.7, 0.9], [0.6, 0.8, 0.7]])  # [size=2, runs=3]
    np.testing.assert_allclose(median_se(estimates, 0.7), [0.04, 0.01], rtol=1e-12)
    active = np.array([1.0, 2.0, 3.0, 4.0])
    iid = np.array([2.0, 4.0, 4.0, 8.0])
    np.testing.assert_allclose(relative_error(active, iid), [0.5, 0.5, 0.75, 0.5])
    # offset 2: k active labels against 2 + k uniform ones
    np.testing.assert_allclose(relative_error(active, iid, offset=2), [0.25, 0.25])
    assert relative_error(active, iid, offset=4).size == 0


def test_table_rows_follow_the_papers_budget_rule():
    curve = np.arange(1, 401) * 1e-4  # MedSE after k labels = k x 1e-4
    curves = {"iid": curve, "cross-entropy": curve / 2, "ase": np.full(400, 3e-4)}
    few = table_rows(curves, offset=0)
    assert few[0] == ["Unif", "50.0000", "100.0000", "200.0000", "300.0000", "400.0000"]
    assert few[1] == ["CE (LURE)", "25.0000", "50.0000", "100.0000", "150.0000", "200.0000"]
    assert few[2] == ["ASE", "3.0000", "3.0000", "3.0000", "3.0000", "3.0000"]
    zero = table_rows(curves, offset=50)
    assert zero[0] == few[0]  # uniform: B labels
    assert zero[1] == ["CE (LURE)", "—", "25.0000", "75.0000", "125.0000", "175.0000"]  # B - 50 active labels
    per_target = {"0shot": {"offset": 50, "median_se": {"test": curves},
                            "relative_error": {"test": {"cross-entropy": relative_error(curves["cross-entropy"], curve, 50)}}}}
    text = format_table(per_target, "test", runs=7)
    assert "| 0shot | Unif | 50.0000 |" in text and "|  | CE (LURE) | — | 25.0000 |" in text
    (line,) = verdicts(per_target, "test")
    assert line.startswith("0shot: CE (LURE) beats iid") and "350 label budgets" in line


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_ckpt):
    from test_evaluate import write_tiny_dataset

    root = tmp_path_factory.mktemp("experiment")
    data = write_tiny_dataset(root / "data.parquet", 100, seed=1)
    return {"root": root, "model": str(tiny_ckpt), "data": str(data)}


def _argv(setup, out, *extra):
    return ["active-experiment", "--model", setup["model"], "--dataset", setup["data"],
            "--label-words", "a,positive", "--pool-size", "40", "--test-size", "20", "--icl-candidates", "20",
            "--icl", "3", "--runs", "64", "--size", "30", "--batch-size", "8", "--no-progress",
            "--out", str(out), *extra]
