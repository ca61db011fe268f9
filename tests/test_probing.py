"""`jaxprobe probe` on small synthetic stores (no model): outputs, layer bookkeeping, resume,
and one-line refusals for mismatched or bad stores."""

import csv
import json

import numpy as np
import pytest

from jaxprobe import store
from jaxprobe.cli import main

D = 8


def make_store(path, n, *, seed, fingerprint="fp-a", template="raw", n_points=3, labels=None,
               poison=None):
    """Hook point 0 is noise, 1 weakly and 2 perfectly separable by the label (feature 0)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2 if labels is None else np.asarray(labels)
    acts = rng.standard_normal((n, n_points, D)).astype(np.float32)
    sign = 2.0 * labels - 1.0
    acts[:, 1, 0] += 0.5 * sign
    acts[:, 2, 0] = 3.0 * sign + 0.1 * acts[:, 2, 0]
    if poison is not None:
        acts[poison] = np.nan
    prompts = [f"text {seed} {i}" for i in range(n)]
    # fake activations in input order (a NaN row goes in through open_activations' file, below)
    lookup = dict(zip(prompts, np.nan_to_num(acts)))
    store.write_store(path, prompts=prompts, labels=labels, sample_indices=range(n),
                      settings={"fake": seed}, n_hook_points=n_points, d_model=D,
                      compute=lambda texts: np.stack([lookup[t] for t in texts]),
                      describe={"model": {"name": "fake", "fingerprint": fingerprint},
                                "template": {"name": template}},
                      progress=False, log=lambda _: None)
    if poison is not None:
        np.save(path / "activations.npy", acts)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {
        "raw-train": make_store(root / "raw-train", 40, seed=1),
        "raw-test": make_store(root / "raw-test", 30, seed=2),
        "p-train": make_store(root / "p-train", 40, seed=3, template="vector-5shot"),
        "p-test": make_store(root / "p-test", 24, seed=4, template="vector-5shot"),
    }


def probe_args(stores, out, *extra):
    return ["probe", "--train", f"raw={stores['raw-train']}", "--test", f"raw={stores['raw-test']}",
            "--train", f"prompted={stores['p-train']}", "--test", f"prompted={stores['p-test']}",
            "--seeds", "3", "--no-progress", "--out", str(out), *extra]


def test_probe_writes_results_and_resumes(stores, tmp_path, capsys):
    out = tmp_path / "probes"
    assert main(probe_args(stores, out)) == 0
    printed = capsys.readouterr().out
    assert "best layer per variant and recipe" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {(r["variant"], r["recipe"], r["layer"]): r for r in results["results"]}
    assert len(rows) == 2 * 2 * 3 and results["hook_points"] == [0, 1, 2]
    for variant in ("raw", "prompted"):
        separable = rows[(variant, "logreg", 2)]["test_accuracy"]
        assert separable["seeds"] == [1.0, 1.0, 1.0] and separable["ci95"] == [1.0, 1.0]
        assert rows[(variant, "logreg", 0)]["test_accuracy"]["mean"] < 0.9  # noise layer
        mlp = rows[(variant, "vector-mlp", 2)]
        assert len(mlp["final_train_loss"]["seeds"]) == 3
        lo, hi = mlp["test_accuracy"]["ci95"]
        assert lo <= mlp["test_accuracy"]["mean"] <= hi
    best = {(b["variant"], b["recipe"]): b["layer"] for b in results["best"]}
    assert best[("raw", "logreg")] == 2 and best[("prompted", "logreg")] == 2
    assert results["variants"]["prompted"]["n_test"] == 24
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and float(table[0]["test_accuracy_mean"]) == rows[
        (table[0]["variant"], table[0]["recipe"], int(table[0]["layer"]))]["test_accuracy"]["mean"]
    png = (out / "accuracy_by_layer.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    before = (out / "results.json").read_bytes()
    assert main(probe_args(stores, out)) == 0  # same command again: read back, same numbers
    assert "done before" in capsys.readouterr().out
    assert (out / "results.json").read_bytes() == before
    assert main(probe_args(stores, out, "--seeds", "2")) == 2  # other settings: refused
    assert "holds probe results made with other settings (seeds: stored 3, asked 2)" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_unnamed_paths_and_layer_choice(stores, tmp_path):
    out = tmp_path / "probes"
    assert main(["probe", "--train", str(stores["p-train"]), "--test", str(stores["p-test"]),
                 "--recipe", "logreg", "--layers", "1-2", "--seeds", "2", "--no-progress",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["variant"], r["layer"]) for r in results["results"]} == {
        ("vector-5shot", 1), ("vector-5shot", 2)}


@pytest.fixture(scope="module")
def bad_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {
        "one-class": make_store(root / "one-class", 10, seed=5, labels=[1] * 10),
        "other-model": make_store(root / "other-model", 10, seed=6, fingerprint="fp-b"),
        "four-points": make_store(root / "four-points", 10, seed=7, n_points=4),
        "nan": make_store(root / "nan", 12, seed=8, poison=7),
        "unfinished": unfinished_store(root / "unfinished"),
    }


def unfinished_store(path):
    def stop_after_one_shard(texts, calls=[]):  # noqa: B006 - counts calls across the run
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return np.zeros((len(texts), 3, D), np.float32)

    with pytest.raises(KeyboardInterrupt):
        store.write_store(path, prompts=["a", "b", "c"], labels=[0, 1, 0], sample_indices=[0, 1, 2],
                          settings={}, n_hook_points=3, d_model=D, compute=stop_after_one_shard,
                          shard_size=2, progress=False, log=lambda _: None)
    return path


@pytest.mark.parametrize("train, test, extra, message", [
    ("raw-train", "one-class", [], r"one-class: test label set \[1\] differs from the train set \[0, 1\]"),
    ("one-class", "raw-test", [], r"one-class: labels are \[1\]; a probe needs both 0 and 1"),
    ("raw-train", "other-model", [], r"other-model comes from model fake \(fingerprint fp-b"),
    ("raw-train", "four-points", [], r"train stores have hook points \[0, 1, 2\], test stores \[0, 1, 2, 3\]"),
    ("raw-train", "nan", [], r"nan/activations.npy: NaN or inf in the activations of row 7"),
    ("raw-train", "missing", [], r"missing: no such file or folder"),
    ("raw-train", "raw-test", ["--layers", "5"], r"--layers 5: the stores have hook points 0..2"),
    ("raw-train", "raw-test", ["--layers", "1,0-1"], r"--layers 1,0,1 repeats a hook point"),
    ("raw-train", "unfinished", [], r"unfinished: unfinished store \(1 of 2 shards\); rerun"),
])
def test_bad_stores_are_one_line_errors(stores, bad_stores, tmp_path, capsys, train, test, extra, message):
    paths = {**stores, **bad_stores, "missing": tmp_path / "missing"}
    args = ["probe", "--train", f"v={paths[train]}", "--test", f"v={paths[test]}",
            "--seeds", "2", "--no-progress", "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxprobe probe: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_unmatched_variant_names(stores, tmp_path, capsys):
    assert main(["probe", "--train", f"a={stores['raw-train']}", "--test", f"b={stores['raw-test']}",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--train a=... has no matching --test a=..." in capsys.readouterr().err


def test_probe_experiment_on_a_tiny_model(tiny_ckpt, tmp_path, capsys):
    """The whole experiment wiring on IMDB with a tiny random model (so accuracies are chance)."""
    out = tmp_path / "experiment"
    args = ["probe-experiment", "--model", str(tiny_ckpt), "--n-train", "12", "--n-test", "10",
            "--templates", "raw;vector-5shot", "--recipe", "logreg", "--seeds", "2",
            "--shard-size", "8", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[5/5] probe: logreg" in printed
    report = (out / "report.md").read_text()
    assert "| vector-5shot | logreg | " in report and "Does prompting help?" in report
    results = json.loads((out / "probes" / "results.json").read_text())
    assert results["variants"]["vector-5shot"]["n_test"] == 10
    assert {r["layer"] for r in results["results"]} == {0, 1, 2}
    stored = json.loads((out / "stores" / "vector-5shot-test" / "manifest.json").read_text())
    assert stored["template"]["leaked_sample_items"] == []  # test items are not demonstrations
    assert json.loads((out / "stores" / "vector-5shot-train" / "manifest.json").read_text())[
        "template"]["leaked_sample_items"] == [0, 1, 2, 3, 4]
    assert main(args) == 0  # the rerun finds everything done
    again = capsys.readouterr().out
    assert again.count("already complete") == 4 and "done before" in again
    assert main([*args[:-1], str(tmp_path / "other"), "--dataset", "reviews.csv"]) == 2
    assert "is one file, so its train and test samples" in capsys.readouterr().err


def test_reference_pickles_as_one_layer_stores(tmp_path, capsys):
    """The reference's per-layer pickles (written here with torch) open as one-layer stores at
    hook point L+1, and repeating a variant name joins their layers for one sweep."""
    import pickle

    import jaxprobe

    torch = pytest.importorskip("torch")
    paths = {}
    for split, n, seed in (("train", 30, 11), ("test", 20, 12)):
        for layer in (10, 20):
            acts = make_store(tmp_path / f"src-{split}-{layer}", n, seed=seed + layer)
            vectors = np.load(acts / "activations.npy")[:, 2 if layer == 20 else 0]
            path = tmp_path / f"{split}_activations_demo_{layer}.pkl"
            with open(path, "wb") as f:  # what the reference notebook wrote
                pickle.dump({"activations": [torch.from_numpy(v.copy()) for v in vectors],
                             "labels": (np.arange(n) % 2).tolist()}, f,
                            protocol=pickle.HIGHEST_PROTOCOL)
            paths[split, layer] = path
    opened = jaxprobe.open_activations(paths["train", 20])
    assert opened.hook_points == (21,) and opened.activations.shape == (30, 1, D)
    assert opened.manifest["reference_layer"] == 20 and opened.manifest["template"] == "raw"
    out = tmp_path / "probes"
    assert main(["probe", "--train", str(paths["train", 10]), "--train", str(paths["train", 20]),
                 "--test", str(paths["test", 10]), "--test", str(paths["test", 20]),
                 "--recipe", "logreg", "--seeds", "2", "--no-progress", "--out", str(out)]) == 0
    rows = {r["layer"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(rows) == {11, 21} and rows[21]["reference_layer"] == 20
    assert rows[21]["variant"] == "raw" and rows[21]["test_accuracy"]["mean"] == 1.0
    assert rows[11]["test_accuracy"]["mean"] < 0.9  # hook point 0 of the source stores: noise


@pytest.mark.parametrize("task, k, splits", [("fpb", 3, ("train", "test")), ("mmlu", 4, ("test", "validation"))])
def test_probe_experiment_with_a_k_class_task(tiny_ckpt, tmp_path, capsys, task, k, splits):
    """extract -> probe -> report for FPB (K=3; one split, so the test sample follows the train one)
    and MMLU (K=4, multiple-choice prompts) with the task's raw and 1-shot prompts."""
    out = tmp_path / task
    args = ["probe-experiment", "--task", task, "--model", str(tiny_ckpt), "--n-train", "40", "--n-test", "30",
            "--demonstrations-from", "100:101", "--recipe", "logreg", "--seeds", "2", "--no-progress",
            "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "probes" / "results.json").read_text())
    assert results["n_classes"] == k and set(results["variants"]) == {"raw", f"{task}-1shot"}
    prompt = json.loads((out / "stores" / f"{task}-1shot-{splits[0]}" / "prompts.jsonl").read_text().splitlines()[0])
    if task == "fpb":
        assert '"negative", "neutral" or "positive"' in prompt and prompt.count("' \nAnswer:") == 2
        rows = {role: set(np.load(out / "stores" / f"raw-{role}" / "sample_indices.npy").tolist())
                for role in ("train", "test")}
        assert len(rows["train"]) == 40 and len(rows["test"]) == 30 and not rows["train"] & rows["test"]
    else:
        assert prompt.count("Question: ") == 2 and prompt.count("\nD. ") == 2 and prompt.endswith("\nAnswer:")
    assert f"| {task}-1shot | logreg |" in (out / "report.md").read_text()
