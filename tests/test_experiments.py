"""`jaxprobe active-experiment`: the paper's table arithmetic, and the whole command (evaluate ->
sweeps -> table, plots) on a tiny random model, resumed and refused like every other stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxprobe.active.sweep import relative_error
from jaxprobe.report import active_table, table_rows, verdicts


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
    rel = relative_error(curves["cross-entropy"], curve, 50)
    per_target = {"0shot": {"offset": 50, "median_se": {"test": curves},
                            "relative_error": {"test": {"cross-entropy": rel}}}}
    text = active_table(per_target, "test", runs=7)
    assert "| 0shot | Unif | 50.0000 |" in text and "|  | CE (LURE) | — | 25.0000 |" in text
    (line,) = verdicts(per_target, "test")
    assert line.startswith("0shot: CE (LURE) beats iid") and "350 label budgets" in line


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_ckpt):
    from jaxprobe.testing import tiny_job

    return tiny_job(tmp_path_factory.mktemp("experiment"), tiny_ckpt, 100, seed=1)


def _argv(setup, out, *extra):
    return ["active-experiment", "--model", setup["model"], "--dataset", setup["data"],
            "--label-words", "a,positive", "--pool-size", "40", "--test-size", "20", "--icl-candidates", "20",
            "--icl", "3", "--runs", "64", "--size", "30", "--batch-size", "8", "--no-progress",
            "--out", str(out), *extra]


def _outputs(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def test_experiment_end_to_end_resumes_and_refuses(tiny_setup, capsys):
    from jaxprobe import cli

    out = tiny_setup["root"] / "exp"
    assert cli.main(_argv(tiny_setup, out)) == 0
    printed = capsys.readouterr().out
    for name in ("table.md", "results.json", "squared_error.png", "relative_error.png", "experiment.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["targets"]) == {"0shot", "3shot"}
    for target in ("0shot", "3shot"):
        for method in ("iid", "cross-entropy", "entropy", "nll"):
            est = np.load(out / "sweeps" / target / method / "estimates.npy")
            assert est.shape == (30, 64) and np.isfinite(est).all()
            assert not (out / "sweeps" / target / method / "checkpoint").exists()
        info = results["targets"][target]
        assert info["budget_offset"] == (3 if target == "0shot" else 0)
        assert len(info["relative_error"]["test"]["cross-entropy"]) == 30 - info["budget_offset"]
        # the median squared error is recomputed here from the saved estimates and test logits
        test = np.load(out / "evaluations" / f"target-{target}" / "test" / "logits.npy")
        labels = np.load(out / "evaluations" / f"target-{target}" / "test" / "labels.npy")
        z = test - np.logaddexp.reduce(test.astype(np.float64), axis=1, keepdims=True)
        risk = -z[np.arange(len(labels)), labels].mean()
        est = np.load(out / "sweeps" / target / "cross-entropy" / "estimates.npy")
        np.testing.assert_allclose(info["median_se"]["test"]["cross-entropy"],
                                   np.median((est - risk) ** 2, axis=1), rtol=1e-10)
    # The table at 30 x (50, 100, 200, 300, 400) / 400 labels; a zero-shot target's active rows
    # at B labels show B - 3 acquired labels (the 3-shot surrogate used 3).
    table = (out / "table.md").read_text()
    assert "B - 3 acquired labels" in table and "| Target | Method | 4 | 8 | 15 | 22 | 30 |" in table
    curves = results["targets"]["0shot"]["median_se"]["test"]
    assert (f"| 0shot | Unif | {curves['iid'][3] * 1e4:.4f} | {curves['iid'][7] * 1e4:.4f} |" in table)
    assert (f"|  | CE (LURE) | {curves['cross-entropy'][0] * 1e4:.4f} | {curves['cross-entropy'][4] * 1e4:.4f} |"
            in table)
    assert "beats iid" in printed or "does not beat iid" in printed
    assert len(results["verdicts"]["test"]) == 2 * 7  # 2 targets x (3 acquisitions x 2 surrogates + ASE)
    # beside the in-context surrogate, the probe on the zero-shot target's activations of the same 3 examples
    zero_meta = json.loads((out / "evaluations" / "target-0shot" / "meta.json").read_text())
    few_meta = json.loads((out / "evaluations" / "target-3shot" / "meta.json").read_text())
    examples = np.load(out / "evaluations" / "target-0shot" / "examples" / "indices.npy")
    assert zero_meta["settings"]["activations"] == 3 and examples.tolist() == few_meta["icl"]["rows"]
    assert "CE (probe surrogate) (LURE)" in table
    for target in ("0shot", "3shot"):
        assert np.isfinite(np.load(out / "sweeps" / target / "probe-cross-entropy" / "estimates.npy")).all()

    # A rerun reuses every stage; a lost sweep is recomputed to the same bits.
    before = _outputs(out)
    lost = out / "sweeps" / "0shot" / "entropy" / "estimates.npy"
    lost_bytes = lost.read_bytes()
    lost.unlink()
    assert cli.main(_argv(tiny_setup, out)) == 0
    assert "continuing the experiment" in capsys.readouterr().out
    after = _outputs(out)
    assert lost.read_bytes() == lost_bytes
    unchanged = [k for k in before if k.startswith(("evaluations", "sweeps")) and "entropy" not in k]
    assert unchanged and all(after[k] == before[k] for k in unchanged)

    # Other settings in the same folder: one line, nothing touched.
    assert cli.main(_argv(tiny_setup, out, "--runs", "32")) == 2
    assert "other settings (runs: stored 64, asked 32)" in capsys.readouterr().err
    assert _outputs(out) == after


def test_experiment_bad_flags_write_nothing(tiny_setup, capsys):
    from jaxprobe import cli

    for extra, message in ((("--size", "41"), "--size 41 is larger than the pool"),
                           (("--clip", "1.0"), "--clip must be in [0, 1)"),
                           (("--acquisitions", "cross-entropy,magic"), "unknown acquisition 'magic'"),
                           (("--test-size", "0"), "needs a test subset"),
                           # checked by evaluate, after the experiment has claimed its folder
                           (("--label-words", "a,zzqx"), "label word 'zzqx' is"),
                           (("--pool-size", "100000"), "but the split has only")):
        out = tiny_setup["root"] / "bad"
        assert cli.main(_argv(tiny_setup, out, *extra)) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_cli_evaluate_then_acquire(tiny_setup, capsys):
    """The two commands by hand, as a user would chain them, and a surrogate on other rows refused."""
    from jaxprobe import cli

    root = tiny_setup["root"]
    common = ["--model", tiny_setup["model"], "--dataset", tiny_setup["data"], "--label-words", "a,positive",
              "--no-progress"]
    sizes = ["--pool-size", "40", "--test-size", "20", "--icl-candidates", "20"]
    assert cli.main(["evaluate", *common, *sizes, "--out", str(root / "zero")]) == 0
    assert cli.main(["evaluate", *common, "--icl", "3", "--subsets", str(root / "zero"),
                     "--out", str(root / "icl")]) == 0
    assert cli.main(["evaluate", *common, *sizes, "--seed", "9", "--icl", "3", "--out", str(root / "other")]) == 0
    acquire = ["acquire", "--target", str(root / "zero"), "--runs", "32", "--size", "20", "--no-progress"]
    assert cli.main([*acquire, "--surrogate", str(root / "icl"), "--budget-offset", "auto",
                     "--out", str(root / "ce")]) == 0
    summary = json.loads((root / "ce" / "summary.json").read_text())
    assert np.load(root / "ce" / "estimates.npy").shape == (20, 32)
    assert summary["iid_offset"] == 3 and len(summary["relative_error"]) == 20  # iid ran 3 + 20 labels
    capsys.readouterr()
    assert cli.main([*acquire, "--surrogate", str(root / "other"), "--out", str(root / "ce2")]) == 2
    assert "different pool rows" in capsys.readouterr().err


# ---------------------------------------------------------------- K classes through task presets

def test_k3_fpb_task_evaluate_acquire_and_experiment(tiny_setup, capsys):
    """FPB's preset (three classes, prompt, truth = pool loss, no test subset) on three-class tiny data:
    evaluate -> acquire -> report by hand, then the whole experiment with --task fpb."""
    from jaxprobe import cli
    from jaxprobe.testing import TINY_LABEL_WORDS, write_tiny_dataset

    root = tiny_setup["root"] / "k3"
    root.mkdir()
    data = write_tiny_dataset(root / "three.parquet", 90, seed=4, n_classes=3)
    common = ["--task", "fpb", "--model", tiny_setup["model"], "--dataset", str(data),
              "--label-words", ",".join(TINY_LABEL_WORDS[:3]), "--no-progress"]
    sizes = ["--pool-size", "40", "--icl-candidates", "20"]
    assert cli.main(["evaluate", *common, *sizes, "--out", str(root / "zero")]) == 0
    assert cli.main(["evaluate", *common, "--icl", "3", "--subsets", str(root / "zero"),
                     "--out", str(root / "icl")]) == 0
    meta = json.loads((root / "icl" / "meta.json").read_text())
    assert meta["example_prompt"].startswith('Classify the sentiment of the following sentence as "negative", '
                                             '"neutral" or "positive".')
    assert meta["example_prompt"].count("\nAnswer: ") == 3 and meta["example_prompt"].endswith("' \nAnswer:")
    assert np.load(root / "zero" / "pool" / "logits.npy").shape == (40, 3)
    assert not (root / "zero" / "test").exists()  # FPB: the pool loss is the truth
    assert cli.main(["acquire", "--target", str(root / "zero"), "--surrogate", str(root / "icl"), "--runs", "32",
                     "--size", "20", "--true-risk", "pool", "--no-progress", "--out", str(root / "ce")]) == 0
    summary = json.loads((root / "ce" / "summary.json").read_text())
    assert summary["n_classes"] == 3 and np.load(root / "ce" / "estimates.npy").shape == (20, 32)

    out = root / "exp"
    assert cli.main(["active-experiment", *common, *sizes, "--icl", "3", "--runs", "32", "--size", "20",
                     "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["truth"] == "pool" and results["settings"]["task"] == "fpb"
    for target, info in results["targets"].items():
        assert set(info["median_se"]) == {"pool"} and -1 <= info["pearson_ce_loss"] <= 1
        pool = np.load(out / "evaluations" / f"target-{target}" / "pool" / "logits.npy")
        assert pool.shape == (40, 3)
    assert "Pearson correlation" in (out / "table.md").read_text()


def test_k4_mmlu_task_with_per_subject_results_and_the_tasks_report(tiny_setup, capsys):
    """MMLU's preset (multiple choice, four letters, 5-shot) on a tiny question file, per-subject
    results, and two tasks side by side in one report as `--task all` writes it."""
    import dataclasses

    from jaxprobe import tasks
    from jaxprobe.evaluate import EvaluateConfig
    from jaxprobe.experiments import ActiveExperimentConfig, active_experiment_tasks
    from jaxprobe.testing import (
        TINY_LABEL_WORDS,
        write_tiny_choices,
        write_tiny_dataset,
    )

    root = tiny_setup["root"] / "k4"
    root.mkdir()
    mmlu = dataclasses.replace(tasks.load_task("mmlu"), label_words=TINY_LABEL_WORDS, icl=2,
                               dataset=str(write_tiny_choices(root / "mc.parquet", 80, seed=2)))
    fpb = dataclasses.replace(tasks.load_task("fpb"), label_words=TINY_LABEL_WORDS[:3], icl=2,
                              dataset=str(write_tiny_dataset(root / "three.parquet", 80, seed=5, n_classes=3)))
    config = ActiveExperimentConfig(
        out=str(root / "all"), model=tiny_setup["model"], runs=32, size=20, progress=False,
        evaluate=EvaluateConfig(out="", pool_size=40, test_size=20, icl_candidates=15, batch_size=8))
    results = active_experiment_tasks(config, [fpb, mmlu], log=lambda *_: None)
    assert set(results) == {"fpb", "mmlu"}
    meta = json.loads((root / "all" / "mmlu" / "evaluations" / "target-2shot" / "meta.json").read_text())
    prompt = meta["example_prompt"]
    assert prompt.startswith("Answer the question with the correct letter. Respond with only 'A', 'B', 'C' or 'D'.\n"
                             "Question: ")
    assert prompt.count("\npositive. ") == 3 and prompt.count("\nthe. ") == 3 and prompt.endswith("\nAnswer:")
    logits = np.load(root / "all" / "mmlu" / "evaluations" / "target-0shot" / "test" / "logits.npy")
    assert logits.shape == (20, 4)
    by_subject = results["mmlu"]["targets"]["0shot"]["by_group"]["pool"]
    assert sum(m["n"] for m in by_subject.values()) == 40 and set(by_subject) <= {f"subject_{i}" for i in range(3)}
    assert "## Per group (pool)" in (root / "all" / "mmlu" / "table.md").read_text()
    report = (root / "all" / "report.md").read_text()
    assert "| fpb | 0shot | Unif |" in report and "| mmlu | 0shot | Unif |" in report
    rel = results["mmlu"]["targets"]["2shot"]["median_relative_error"]["test"]["cross-entropy"]
    assert f"| mmlu | 2shot | {rel:.3f} |" in report
    pearson = results["fpb"]["targets"]["0shot"]["pearson_ce_loss"]
    assert f"| fpb | {pearson:.3f} |" in report


def test_probe_experiment_task_all_writes_one_report(tiny_setup, monkeypatch, capsys):
    """`probe-experiment --task all` over (here) two presets pointed at tiny data: one folder each and
    one report holding both."""
    import dataclasses

    from jaxprobe import cli, tasks
    from jaxprobe.testing import (
        TINY_LABEL_WORDS,
        write_tiny_choices,
        write_tiny_dataset,
    )

    root = tiny_setup["root"] / "probe-all"
    root.mkdir()
    fpb = dataclasses.replace(tasks.load_task("fpb"), label_words=TINY_LABEL_WORDS[:3],
                              dataset=str(write_tiny_dataset(root / "three.parquet", 80, seed=6, n_classes=3)))
    mmlu = dataclasses.replace(tasks.load_task("mmlu"), probe_splits=("train", "train"),
                               dataset=str(write_tiny_choices(root / "mc.parquet", 80, seed=7)))
    monkeypatch.setattr(tasks, "presets", lambda: {"fpb": fpb, "mmlu": mmlu})
    out = root / "out"
    assert cli.main(["probe-experiment", "--task", "all", "--model", tiny_setup["model"], "--n-train", "24",
                     "--n-test", "16", "--demonstrations-from", "60:61", "--recipe", "logreg", "--seeds", "1",
                     "--no-progress", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# probe-experiment across tasks") and "## fpb" in report and "## mmlu" in report
    assert "| fpb-1shot | logreg |" in report and "| mmlu-1shot | logreg |" in report
    for name, k in (("fpb", 3), ("mmlu", 4)):
        assert json.loads((out / name / "probes" / "results.json").read_text())["n_classes"] == k


def test_label_demo_proposes_labels_from_truth_and_estimates(tiny_setup, capsys):
    from jaxprobe import cli
    from jaxprobe.active.interval import per_example_metrics
    from jaxprobe.experiments import label_demo

    out = tiny_setup["root"] / "exp"
    assert cli.main(_argv(tiny_setup, out)) == 0  # reused when the test above made it
    result = label_demo(out, size=12)
    printed = capsys.readouterr().out
    pool = np.load(out / "evaluations" / "target-0shot" / "pool" / "logits.npy")
    labels = np.load(out / "evaluations" / "target-0shot" / "pool" / "labels.npy")
    truth = per_example_metrics(pool, labels)
    assert result["labels_used"] == 12 and json.loads((out / "estimate.json").read_text())["labels_used"] == 12
    for metric in ("loss", "accuracy"):
        assert result["pool_truth"][metric] == pytest.approx(truth[metric].mean())
        assert f"true pool value {truth[metric].mean():.4f}" in printed
    assert "probe surrogate" in printed
