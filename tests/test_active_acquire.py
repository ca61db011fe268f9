"""`jaxprobe acquire` end to end: synthetic evaluation folders, the iid baseline and relative error,
the bootstrap, one-line refusals that leave files alone, a subprocess killed mid-sweep and resumed
to the same bits, and evaluate -> acquire on a tiny random model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxprobe.active import estimators as E
from jaxprobe.active.sweep import run_sweep, summarise_sweep
from jaxprobe.cli import main

REPO = Path(__file__).resolve().parent.parent
N_POOL, SIZE, RUNS = 40, 12, 24  # the shapes of test_acquire.py: compiled once per session


def write_evaluation(folder: Path, logits, labels, indices, *, icl=0, test=None, label_words=("neg", "pos")):
    """A folder laid out as `jaxprobe evaluate` writes it (see jaxprobe/active/evaluate.py)."""
    subsets = {"pool": (logits, labels, indices)}
    if test is not None:
        subsets["test"] = test
    for name, (lg, lb, ix) in subsets.items():
        (folder / name).mkdir(parents=True)
        np.save(folder / name / "logits.npy", np.asarray(lg, np.float32))
        np.save(folder / name / "labels.npy", np.asarray(lb, np.int64))
        np.save(folder / name / "indices.npy", np.asarray(ix, np.int64))
        (folder / name / "metrics.json").write_text(json.dumps({"n": len(lb)}))
    (folder / "meta.json").write_text(json.dumps({
        "format": "jaxprobe.evaluation/1", "label_words": list(label_words), "icl": {"n": icl},
        "model": {"name": "synthetic"}, "sizes": {"test_size": 0 if test is None else len(test[1])}}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("acquire")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, N_POOL)
    target = rng.normal(size=(N_POOL, 2)) * 2
    surrogate = target + rng.normal(size=(N_POOL, 2))
    test = (rng.normal(size=(30, 2)) * 2, rng.integers(0, 2, 30), np.arange(100, 130))
    rows = np.arange(N_POOL) * 3
    return {"root": root, "target_arrays": (target, surrogate, labels), "test": test,
            "target": write_evaluation(root / "target", target, labels, rows, test=test),
            "surrogate": write_evaluation(root / "surrogate", surrogate, labels, rows, icl=50, test=test)}


def _acquire(folders, out, *extra):
    return main(["acquire", "--target", str(folders["target"]), "--surrogate", str(folders["surrogate"]),
                 "--out", str(out), "--runs", str(RUNS), "--size", str(SIZE), "--no-progress", *extra])


@pytest.fixture(scope="module")
def iid_run(folders):
    out = folders["root"] / "iid"
    assert _acquire(folders, out, "--acquisition", "iid") == 0
    return out


def test_end_to_end_with_iid_baseline_and_relative_error(folders, iid_run, capsys):
    target, surrogate, labels = folders["target_arrays"]
    out = folders["root"] / "ce"
    assert _acquire(folders, out, "--iid", str(iid_run), "--seed", "3") == 0
    estimates = np.load(out / "estimates.npy")
    expected = run_sweep(target.astype(np.float32), surrogate.astype(np.float32), labels, runs=RUNS, size=SIZE,
                         seed=3, progress=False)
    np.testing.assert_array_equal(estimates, expected)
    summary = json.loads((out / "summary.json").read_text())
    test_risk = E.mean_loss(folders["test"][0].astype(np.float32), folders["test"][1])
    assert summary["true_risk"] == pytest.approx(test_risk, rel=1e-12) and summary["true_risk_source"] == "test"
    by_hand = summarise_sweep(estimates, test_risk, np.load(iid_run / "estimates.npy"))
    assert summary["relative_error"] == pytest.approx(by_hand["relative_error"], rel=1e-12)
    assert summary["median_squared_error"] == pytest.approx(by_hand["median_squared_error"], rel=1e-12)
    assert summary["config"]["sweep"]["clip"] == 0.1 and summary["iid_source"].endswith("estimates.npy")
    assert not (out / "checkpoint").exists()
    assert "labels: median squared error" in capsys.readouterr().out


def test_auto_baseline_offset_pool_truth_and_bootstrap(folders, iid_run):
    out = folders["root"] / "entropy"
    assert _acquire(folders, out, "--acquisition", "entropy", "--true-risk", "pool", "--budget-offset", "4",
                    "--bootstrap", "8", "--bootstrap-resamples", "50", "--bootstrap-budgets", "5,8") == 0
    summary = json.loads((out / "summary.json").read_text())
    iid = np.load(out / "iid_estimates.npy")  # the naive mean over uniform draws, SIZE + 4 steps
    assert iid.shape == (SIZE + 4, RUNS)
    np.testing.assert_allclose(iid[:SIZE], np.load(iid_run / "estimates.npy"), atol=1e-12)  # LURE = mean
    pool_risk = E.mean_loss(*(folders["target_arrays"][i] for i in (0, 2)))
    assert summary["true_risk"] == pytest.approx(pool_risk, rel=1e-6) and summary["iid_offset"] == 4
    assert len(summary["relative_error"]) == SIZE
    boot = summary["bootstrap"]
    assert boot["budgets"] == [5, 8] and boot["ddof"] == 1 and len(boot["coverage"]) == 2
    assert np.load(out / "bootstrap_variance.npy").shape == (2, 8)


DAMAGED_META = [  # (name, edit of the parsed meta.json or None for raw bytes, message)
    ("not-json", b"{oops", "meta.json: corrupt JSON"),
    ("not-utf8", b"\xff\xfe{}", "meta.json: not UTF-8 text"),
    ("a-list", b"[1, 2]", "meta.json: expected a JSON object, found list"),
    ("no-format", lambda m: m.pop("format"), "format None, expected 'jaxprobe.evaluation/1'"),
    ("words-a-string", lambda m: m.update(label_words="neg,pos"), "label_words must be a list of two or more words"),
    ("sizes-a-list", lambda m: m.update(sizes=[1]), "sizes must be an object"),
    ("icl-a-string", lambda m: m.update(icl="50"), "icl must be an object with an integer n"),
]


def _damaged_meta(source: Path, folder: Path, edit) -> Path:
    import shutil

    shutil.copytree(source, folder)
    if isinstance(edit, bytes):
        (folder / "meta.json").write_bytes(edit)
    else:
        meta = json.loads((folder / "meta.json").read_text())
        edit(meta)
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxprobe acquire: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors_that_overwrite_nothing(folders, iid_run, tmp_path, capsys):
    target, surrogate, labels = folders["target_arrays"]
    rows = np.arange(N_POOL) * 3
    other_rows = write_evaluation(tmp_path / "rows", surrogate, labels, rows[::-1])
    other_pool = write_evaluation(tmp_path / "pool", surrogate, labels, rows + 1)
    three = write_evaluation(tmp_path / "k3", np.zeros((N_POOL, 3)), labels, rows, label_words=("a", "b", "c"))
    nan = surrogate.copy()
    nan[5, 0] = np.inf
    nan_dir = write_evaluation(tmp_path / "nan", nan, labels, rows)
    bad_labels = write_evaluation(tmp_path / "labels", target, np.where(rows == 9, 2, labels), rows)
    out = tmp_path / "out"
    cases = [
        (["--surrogate", str(other_rows)], "different order"),
        (["--surrogate", str(other_pool)], "different pool rows"),
        (["--surrogate", str(three)], "different numbers of classes"),
        (["--surrogate", str(nan_dir)], "row 5 has a NaN or infinite logit"),
        (["--target", str(bad_labels)], "row 3 has label 2, outside 0..1"),
        (["--size", str(N_POOL + 1)], "larger than the pool"),
        (["--clip", "1.0"], "--clip must be in [0, 1)"),
        (["--clip", "-0.1"], "--clip must be in [0, 1)"),
        (["--temperature", "0"], "--temperature must be a positive number"),
        (["--iid", str(folders["target"])], "not a finished jaxprobe acquire run"),
        (["--bootstrap", "2", "--bootstrap-resamples", "1"], "--bootstrap-resamples must be at least 2, not 1"),
        *[(["--surrogate", str(_damaged_meta(folders["surrogate"], tmp_path / name, edit))], message)
          for name, edit, message in DAMAGED_META],
        (["--acquisition", "entropy", "--surrogate-none"], None),
    ]
    for extra, message in cases[:-1]:
        args = ["acquire", "--target", str(folders["target"]), "--surrogate", str(folders["surrogate"]),
                "--out", str(out), "--runs", "4", "--size", "5", "--no-progress"]
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        err = _one_line_error(capsys, main(args))
        assert message in err, (extra, err)
    no_surrogate = ["acquire", "--target", str(folders["target"]), "--out", str(out), "--no-progress"]
    assert "needs --surrogate" in _one_line_error(capsys, main(no_surrogate))
    assert not out.exists() or not any(out.iterdir())
    # a finished run and a folder of other files are refused and left as they were
    before = {p: p.read_bytes() for p in iid_run.iterdir() if p.is_file()}
    assert "already holds a finished acquire run" in _one_line_error(
        capsys, _acquire(folders, iid_run, "--acquisition", "iid"))
    assert before == {p: p.read_bytes() for p in iid_run.iterdir() if p.is_file()}
    assert "is not empty and holds no acquire.json" in _one_line_error(capsys, _acquire(folders, folders["target"]))
    assert "--iid" in _one_line_error(capsys, _acquire(folders, tmp_path / "x", "--iid", str(
        folders["root"] / "ce")))  # exists only if that test ran; either way a one-line refusal


def test_killed_subprocess_resumes_bit_identical(folders, tmp_path, capsys):
    out = tmp_path / "killed"
    args = ["acquire", "--target", str(folders["target"]), "--surrogate", str(folders["surrogate"]),
            "--out", str(out), "--runs", "1280", "--size", str(SIZE), "--chunk-runs", "64", "--threads", "1",
            "--checkpoint-every", "0", "--iid", "none", "--seed", "5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jaxprobe.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            steps = [p for p in (out / "checkpoint").glob("*") if p.name.isdigit()]
            if steps:
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "summary.json").exists(), "the sweep finished before it could be killed"
    done = max(int(p.name) for p in (out / "checkpoint").glob("*") if p.name.isdigit())
    assert 0 < done < 1280 and not (out / "estimates.npy").exists()
    capsys.readouterr()
    assert main(args) == 0
    assert f"resuming after run {done} of 1280" in capsys.readouterr().out
    target, surrogate, labels = folders["target_arrays"]
    uninterrupted = run_sweep(target.astype(np.float32), surrogate.astype(np.float32), labels, runs=1280,
                              size=SIZE, seed=5, chunk_runs=1280, progress=False)  # one chunk of 1280
    np.testing.assert_array_equal(np.load(out / "estimates.npy"), uninterrupted)
