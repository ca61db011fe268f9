"""`jaxprobe propose` -> labels -> `jaxprobe estimate`: the round trip on a tiny model equals the
array API, queues are reproducible and grow without changing their first items, predictions come
from files (K=2 and K=3), and every bad input is one line that changes nothing."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaxprobe.active import interval as I
from jaxprobe.active.estimators import acquisition_scores, proposal_pmf
from jaxprobe.active.inputs import load_evaluation
from jaxprobe.active.queue import draw_queue, read_queue
from jaxprobe.cli import main
from jaxprobe.evaluate import EvaluateConfig, run_evaluate
from jaxprobe.testing import synthetic_pool, write_tiny_dataset

WORDS = ("a", "positive")  # one token each after "Label:" in the tiny tokenizer


@pytest.fixture(scope="module")
def pools(tmp_path_factory, tiny_ckpt):
    """A tiny model's zero-shot target and 3-shot surrogate evaluations of one 40-row pool."""
    import jaxprobe

    root = tmp_path_factory.mktemp("queue")
    data = write_tiny_dataset(root / "data.parquet", 100, seed=1)
    lm = jaxprobe.load_model(tiny_ckpt)
    base = {"model": str(tiny_ckpt), "dataset": str(data), "label_words": WORDS, "pool_size": 40, "test_size": 0,
            "icl_candidates": 20, "shard_size": 8, "batch_size": 8, "progress": False}
    run_evaluate(EvaluateConfig(out=str(root / "zero"), icl=0, **base), lm=lm, log=lambda *_: None)
    run_evaluate(EvaluateConfig(out=str(root / "icl3"), icl=3, **{**base, "pool_size": None, "test_size": None,
                                                                   "icl_candidates": None},
                                subsets=str(root / "zero")), lm=lm, log=lambda *_: None)
    return {"root": root, "data": data, "target": root / "zero", "surrogate": root / "icl3"}


def _propose(pools, out, *extra, target=None):
    return main(["propose", "--target", str(target or pools["target"]), "--surrogate", str(pools["surrogate"]),
                 "--out", str(out), *extra])


def _labels_csv(path: Path, ids, labels) -> Path:
    pd.DataFrame({"id": list(ids), "label": list(labels)}).to_csv(path, index=False)
    return path


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != ".lock"}


def test_round_trip_equals_the_array_api(pools, tmp_path):
    out = tmp_path / "queue"
    assert _propose(pools, out, "--size", "15", "--seed", "4") == 0
    rows = read_queue(out)[1]
    target, surrogate = load_evaluation(pools["target"]), load_evaluation(pools["surrogate"])
    # the array API: the same scores, draws, per-example metrics and interval
    scores = acquisition_scores("cross-entropy", target.logits, surrogate.logits, target.labels)
    drawn, q = draw_queue(scores, 15, 0.1, 4, "cross-entropy")
    assert [r["id"] for r in rows] == [str(i) for i in target.indices[drawn]]
    np.testing.assert_array_equal([r["q"] for r in rows], q)
    truth = dict(zip(target.indices.tolist(), target.labels.tolist()))
    ids = [int(r["id"]) for r in rows]
    # the first 10 labelled, the 11th not, the 12th labelled: 10 are used
    labels = _labels_csv(tmp_path / "labels.csv", ids[:10] + ids[11:12], [truth[i] for i in ids[:10] + ids[11:12]])
    assert main(["estimate", "--queue", str(out), "--labels", str(labels), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["labels_used"] == 10 and result["next_to_label"] == str(ids[10])
    sigma2 = I.pool_sigma2(target.logits, surrogate.logits, proposal_pmf(scores, 0.1))
    values = I.per_example_metrics(target.logits[drawn[:10]], target.labels[drawn[:10]])
    for metric in I.METRICS:
        ci = I.interval(values[metric], q[:10], 40, metric=metric, sigma2=sigma2[metric])
        got = result["metrics"][metric]
        assert got["method"] == "hybrid"
        for key in ("estimate", "low", "high", "variance"):
            assert got[key] == pytest.approx(getattr(ci, key), rel=1e-9, abs=1e-12), (metric, key)
        assert got["labels_needed"] == I.labels_for_half_width(ci.variance, 10, 40, 0.02)
    # the whole queue labelled, against the pool: LURE's estimate equals the direct formula
    all_labels = _labels_csv(tmp_path / "all.csv", ids, [truth[i] for i in ids])
    assert main(["estimate", "--queue", str(out), "--labels", str(all_labels), "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["labels_used"] == 15


def test_queue_is_reproducible_and_grows_keeping_its_first_items(pools, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _propose(pools, a, "--size", "8") == 0
    assert _propose(pools, b, "--size", "8") == 0
    assert _snapshot(a) == _snapshot(b)
    first = read_queue(a)[1]
    assert _propose(pools, a, "--size", "20") == 0
    grown = read_queue(a)[1]
    assert len(grown) == 20 and grown[:8] == first
    assert _propose(pools, a, "--size", "5") == 2  # a queue only grows
    assert _propose(pools, a, "--size", "20", "--seed", "1") == 2  # other settings
    assert len(read_queue(a)[1]) == 20
    texts = pd.read_parquet(pools["data"])["text"]
    assert all(r["text"] == texts[int(r["id"])] for r in grown)  # the items' own texts, for the labeller


def test_bad_inputs_are_one_line_and_change_nothing(pools, tmp_path, capsys):
    out = tmp_path / "queue"
    assert _propose(pools, out, "--size", "6") == 0
    rows = read_queue(out)[1]
    ids = [r["id"] for r in rows]
    before = _snapshot(out)
    capsys.readouterr()

    def refused(labels_path, match, *extra):
        result = tmp_path / "never.json"
        assert main(["estimate", "--queue", str(out), "--labels", str(labels_path), "--out", str(result), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
        assert not result.exists() and _snapshot(out) == before

    refused(_labels_csv(tmp_path / "k.csv", ids[:2], [0, 2]), "outside 0..1")
    refused(_labels_csv(tmp_path / "w.csv", ids[:2], [0, "maybe"]), "not a class id")
    refused(_labels_csv(tmp_path / "x.csv", [ids[0], "99999"], [0, 1]), "not in the queue")
    refused(_labels_csv(tmp_path / "d.csv", [ids[0], ids[0]], [0, 1]), "labelled twice")
    refused(_labels_csv(tmp_path / "none.csv", ids[1:3], [0, 1]), "first item")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"id": ids[0], "label": 7}) + "\n")
    refused(jsonl, "outside 0..1")
    good = _labels_csv(tmp_path / "good.csv", ids[:3], [0, 1, 1])
    # a queue from another pool: checked against --target
    other = tmp_path / "other.csv"  # the same items, other predictions
    pool_ids = load_evaluation(pools["target"]).indices
    pd.DataFrame({"id": pool_ids, "c0": np.zeros(40), "c1": np.arange(40.0)}).to_csv(other, index=False)
    refused(good, "another pool", "--target", str(other))
    assert _propose(pools, out, "--size", "6", target=other) == 2  # nor is it extended from another pool
    assert "other settings" in capsys.readouterr().err and _snapshot(out) == before
    # an edited queue (either file), then restored by rerunning propose
    for name, edit in (("queue.csv", lambda t: t.replace(ids[1], ids[2], 1)),
                       ("queue.jsonl", lambda t: t.replace('"q": ', '"q": 1', 1))):
        path = out / name
        original = path.read_text()
        path.write_text(edit(original))
        before = _snapshot(out)
        refused(good, "edited")
        path.write_text(original)
        before = _snapshot(out)
    assert main(["estimate", "--queue", str(out), "--labels", str(good)]) == 0
    # propose's own refusals
    with pytest.raises(SystemExit):  # argparse: nll needs labels, so propose does not offer it
        _propose(pools, tmp_path / "p1", "--acquisition", "nll")
    assert main(["propose", "--target", str(pools["target"]), "--out", str(tmp_path / "p2")]) == 2
    assert "needs --surrogate" in capsys.readouterr().err
    assert _propose(pools, tmp_path / "p3", "--size", "41") == 2
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p3").exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_bring_your_own_predictions_k3(tmp_path, suffix):
    """Probabilities from any model, K=3, ids that are not row numbers, label words as labels."""
    t, s, y = synthetic_pool(60, 3, seed=5)
    ids = [f"item-{i:03d}" for i in range(60)]
    probs = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    cols = ["neg", "neu", "pos"]
    frame = pd.DataFrame({"id": ids, **{c: probs[:, j] for j, c in enumerate(cols)},
                          "text": [f"text {i}" for i in range(60)]})
    target = tmp_path / f"target{suffix}"
    (frame.to_csv(target, index=False) if suffix == ".csv" else frame.to_parquet(target))
    surrogate = tmp_path / "surrogate.npy"  # .npy: rows in the target's order
    np.save(surrogate, s)
    out = tmp_path / "queue"
    assert main(["propose", "--target", str(target), "--surrogate", str(surrogate), "--size", "20",
                 "--out", str(out)]) == 0
    rows = read_queue(out)[1]
    assert rows[0]["text"] == f"text {ids.index(rows[0]['id'])}"
    truth = {i: cols[label] for i, label in zip(ids, y)}
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": r["id"], "label": truth[r["id"]]}) + "\n" for r in rows))
    assert main(["estimate", "--queue", str(out), "--labels", str(labels), "--out", str(tmp_path / "e.json"),
                 "--target", str(target)]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    drawn = [ids.index(r["id"]) for r in rows]
    values = I.per_example_metrics(np.log(probs[drawn]), y[drawn])
    expected = I.lure(values["accuracy"], np.array([r["q"] for r in rows]), 60)
    assert result["labels_used"] == 20 and result["metrics"]["accuracy"]["estimate"] == pytest.approx(expected)
