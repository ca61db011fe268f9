"""`jaxprobe evaluate`: prompts, subsets, ICL choice and label tokens against the spec, and whole
runs on a tiny random model (prefix cache, resume after a kill, refusals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxprobe.active.estimators import label_metrics
from jaxprobe.active.inputs import check_same_rows, load_evaluation
from jaxprobe.evaluate import EvaluateConfig, draw_subsets, run_evaluate
from jaxprobe.prompts import (
    SST2_INSTRUCTION, build_prompts, default_instruction, resolve_label_tokens, select_icl_examples)
from jaxprobe.errors import UserError
from jaxprobe.testing import write_tiny_dataset

REPO = Path(__file__).resolve().parent.parent
WORDS = ("a", "positive")  # one token each after "Label:" in the tiny tokenizer (" negative" is five)


# ------------------------------------------------------------------------- no model needed


def test_prompts_match_the_reference_format():
    zero = build_prompts(["  it is great  "], instruction=SST2_INSTRUCTION, answer_word="Label")[0]
    assert zero == SST2_INSTRUCTION + "Sentence: 'it is great' \nLabel:"
    icl = build_prompts(["ok "], instruction="Do it.\n", answer_word="Answer",
                        examples=[("fine film ", "positive"), ("bad", "negative")])[0]
    assert icl == ("Do it.\nSentence: 'fine film' \nAnswer: positive\n\n"
                   "Sentence: 'bad' \nAnswer: negative\n\nSentence: 'ok' \nAnswer:")


def test_default_instructions():
    assert default_instruction(("negative", "positive")) == (
        'Classify the sentiment of the following sentence as "positive" or "negative". '
        'Respond with "positive" or "negative".\n')
    assert default_instruction(("negative", "neutral", "positive")) == (
        'Classify the following sentence as "negative", "neutral" or "positive". '
        'Respond with "negative", "neutral" or "positive".\n')


def test_icl_class_proportional_counts_order_and_determinism():
    labels = np.array([0] * 70 + [1] * 30)
    chosen = select_icl_examples(labels, 10, n_classes=2, seed=3)
    assert len(set(chosen.tolist())) == 10
    assert np.bincount(labels[chosen], minlength=2).tolist() == [7, 3]
    assert np.array_equal(chosen, select_icl_examples(labels, 10, n_classes=2, seed=3))
    assert not np.array_equal(chosen, select_icl_examples(labels, 10, n_classes=2, seed=4))
    # One random order, not grouped by class.
    assert labels[chosen].tolist() != sorted(labels[chosen].tolist())
    # Largest remainder: 3 classes of 5/3/2 candidates, 5 examples -> 2.5/1.5/1.0 -> 3/1/1 (tie to the lower id).
    three = np.array([0] * 5 + [1] * 3 + [2] * 2)
    assert np.bincount(three[select_icl_examples(three, 5, n_classes=3, seed=0)], minlength=3).tolist() == [3, 1, 1]


def test_icl_random_is_a_plain_permutation_prefix():
    labels = np.array([0] * 70 + [1] * 30)
    chosen = select_icl_examples(labels, 10, n_classes=2, seed=1, selection="random")
    expected = np.random.default_rng([1, 0x1C1]).permutation(100)[:10]
    assert np.array_equal(chosen, expected)
    with pytest.raises(UserError, match="--icl 101"):
        select_icl_examples(labels, 101, n_classes=2, seed=1)


def test_subsets_are_disjoint_sorted_seeded():
    s = draw_subsets(1000, pool_size=300, test_size=200, icl_candidates=100, seed=7)
    assert [len(s[k]) for k in ("pool", "test", "icl_candidates")] == [300, 200, 100]
    every = np.concatenate(list(s.values()))
    assert len(np.unique(every)) == 600 and every.max() < 1000
    assert all(np.all(np.diff(v) > 0) for v in s.values())
    again = draw_subsets(1000, pool_size=300, test_size=200, icl_candidates=100, seed=7)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    with pytest.raises(UserError, match="only 500"):
        draw_subsets(500, pool_size=300, test_size=200, icl_candidates=100, seed=7)


def test_label_tokens_from_a_byte_level_bpe():
    from jaxprobe.testing import tiny_tokenizer

    tok = tiny_tokenizer()

    def tokenize(texts):
        return tok(list(texts))["input_ids"]

    prompt = "Sentence: 'it is fine' \nLabel:"
    one_token = [tok(" positive")["input_ids"], tok(" the")["input_ids"]]
    assert [len(ids) for ids in one_token] == [1, 1]
    assert resolve_label_tokens(tokenize, prompt, ["positive", "the"]) == [ids[0] for ids in one_token]
    with pytest.raises(UserError, match=r"'negative' is 5 tokens .*--multi-token-labels first"):
        resolve_label_tokens(tokenize, prompt, ["positive", "negative"], decode=tok.decode)
    # First-token reading (the paper's Subj rule) works while the first tokens differ...
    first = resolve_label_tokens(tokenize, prompt, ["positive", "negative"], multi_token="first")
    assert first[0] == tok(" positive")["input_ids"][0] and first[1] == tok(" negative")["input_ids"][0]
    # ...and is refused when two words start with the same token (" negative", " good" both start with " ").
    with pytest.raises(UserError, match="same token"):
        resolve_label_tokens(tokenize, prompt, ["negative", "good"], multi_token="first")
    with pytest.raises(UserError, match="repeated"):
        resolve_label_tokens(tokenize, prompt, ["the", "the"])


def test_label_metrics_by_hand():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 3.0]], np.float32)
    labels = np.array([0, 0, 1])
    m = label_metrics(logits, labels)
    expected_ce = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(1.0)), np.log(2.0)])
    assert m["accuracy"] == pytest.approx(1 / 3)  # the tie goes to class 0, as argmax does
    assert m["cross_entropy"] == pytest.approx(expected_ce, rel=1e-12)
    assert m["label_counts"] == [2, 1] and m["predicted_counts"] == [2, 1]


# ------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_ckpt):
    """The session's tiny random model (loaded once here) and a 120-row labelled parquet file."""
    import jaxprobe

    root = tmp_path_factory.mktemp("evaluate")
    data = write_tiny_dataset(root / "data.parquet", 120, seed=0)
    return {"root": root, "model": str(tiny_ckpt), "data": str(data), "lm": jaxprobe.load_model(tiny_ckpt)}


def _config(tiny, out, **kw) -> EvaluateConfig:
    base = dict(out=str(out), model=tiny["model"], dataset=tiny["data"], label_words=WORDS,
                pool_size=40, test_size=20, icl_candidates=20, icl=3, shard_size=8, batch_size=4,
                progress=False)
    return EvaluateConfig(**{**base, **kw})


def _cli_args(tiny, out, *extra) -> list[str]:
    return ["evaluate", "--model", tiny["model"], "--dataset", tiny["data"], "--label-words", ",".join(WORDS),
            "--pool-size", "40", "--test-size", "20", "--icl-candidates", "20", "--icl", "3",
            "--shard-size", "2", "--batch-size", "1", "--no-progress", "--out", str(out), *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def icl_run(tiny):
    out = tiny["root"] / "icl3"
    run_evaluate(_config(tiny, out), lm=tiny["lm"], log=lambda *_: None)
    return out


def test_outputs_layout_and_metrics(tiny, icl_run):
    meta = json.loads((icl_run / "meta.json").read_text())
    subsets = json.loads((icl_run / "subsets.json").read_text())
    assert meta["label_words"] == list(WORDS) and len(meta["label_token_ids"]) == 2
    assert meta["model"]["fingerprint"] == tiny["lm"].fingerprint
    assert len(meta["icl"]["rows"]) == 3 and set(meta["icl"]["rows"]) <= set(subsets["rows"]["icl_candidates"])
    for name, n in (("pool", 40), ("test", 20)):
        ev = load_evaluation(icl_run, name)
        assert ev.logits.shape == (n, 2) and ev.logits.dtype == np.float32
        assert ev.indices.tolist() == subsets["rows"][name]
        assert not (icl_run / name / "shards").exists()
        m = label_metrics(ev.logits, ev.labels)
        assert ev.metrics["accuracy"] == m["accuracy"] and ev.metrics["cross_entropy"] == m["cross_entropy"]
        assert ev.metrics["prefix_tokens_cached"] > 0
    import pandas as pd

    source = pd.read_parquet(tiny["data"])
    ev = load_evaluation(icl_run, "pool")
    assert np.array_equal(ev.labels, source.label.to_numpy()[ev.indices])
    # The in-context block quotes the chosen rows' own texts and label words.
    first = meta["icl"]["rows"][0]
    assert meta["example_prompt"].startswith(
        meta["instruction"] + f"Sentence: '{source.text[first].strip()}' \nLabel: {WORDS[source.label[first]]}\n\n")


def test_prefix_cache_equals_uncached_whole_prompts(tiny, icl_run):
    lm = tiny["lm"]
    meta = json.loads((icl_run / "meta.json").read_text())
    ev = load_evaluation(icl_run, "pool")
    import pandas as pd

    source = pd.read_parquet(tiny["data"])
    examples = [(source.text[r], WORDS[source.label[r]]) for r in meta["icl"]["rows"]]
    prompts = build_prompts(list(source.text[ev.indices]), instruction=meta["instruction"],
                            answer_word="Label", examples=examples)
    plain = lm.logits(prompts, token_ids=meta["label_token_ids"], batch_size=8)
    np.testing.assert_allclose(ev.logits, plain, atol=1e-5, rtol=0)
    # And the cached prefix really covers the in-context block.
    context_tokens = len(lm.tokenize([prompts[0][: prompts[0].rindex("Sentence:")]])[0])
    assert ev.metrics["prefix_tokens_cached"] >= context_tokens - 2


def test_second_model_reuses_subsets_and_rows_are_checked(tiny, icl_run):
    zero = run_evaluate(_config(tiny, tiny["root"] / "zero", icl=0, pool_size=None, test_size=None,
                                icl_candidates=None, subsets=str(icl_run)), lm=tiny["lm"], log=lambda *_: None)
    a, b = load_evaluation(icl_run), load_evaluation(zero)
    check_same_rows(a, b)
    assert json.loads((zero / "meta.json").read_text())["subsets_id"] == a.meta["subsets_id"]
    assert not np.array_equal(a.logits, b.logits)  # zero-shot prompts differ
    shuffled = b.__class__(**{**b.__dict__, "indices": b.indices[::-1].copy(), "labels": b.labels[::-1].copy()})
    with pytest.raises(UserError, match="different order"):
        check_same_rows(a, shuffled)
    other = run_evaluate(_config(tiny, tiny["root"] / "seed1", icl=0, seed=1), lm=tiny["lm"], log=lambda *_: None)
    with pytest.raises(UserError, match="different pool rows"):
        check_same_rows(a, load_evaluation(other))
    three = b.__class__(**{**b.__dict__, "logits": np.zeros((40, 3), np.float32)})
    with pytest.raises(UserError, match="K=2 vs K=3"):
        check_same_rows(a, three)
    with pytest.raises(UserError, match="--pool-size 10 disagrees"):
        run_evaluate(_config(tiny, tiny["root"] / "bad", pool_size=10, subsets=str(icl_run)), lm=tiny["lm"])


def test_rerun_is_a_no_op_and_other_settings_are_refused(tiny, icl_run):
    before = _snapshot(icl_run)
    run_evaluate(_config(tiny, icl_run), lm=tiny["lm"], log=lambda *_: None)
    with pytest.raises(UserError, match=r"other settings \(icl: stored 3, asked 2\)"):
        run_evaluate(_config(tiny, icl_run, icl=2), lm=tiny["lm"])
    with pytest.raises(UserError, match="subsets_id"):
        run_evaluate(_config(tiny, icl_run, seed=5), lm=tiny["lm"])
    assert _snapshot(icl_run) == before


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    import pandas as pd

    lm = tiny["lm"]
    source = pd.read_parquet(tiny["data"])
    source.loc[7, "label"] = 2
    bad_data = tmp_path / "bad.parquet"
    source.to_parquet(bad_data)
    with pytest.raises(UserError, match=r"row 7: label 2 is outside 0..1"):
        run_evaluate(_config(tiny, tmp_path / "o1", dataset=str(bad_data), pool_size=110, test_size=5,
                             icl_candidates=5), lm=lm)
    with pytest.raises(UserError, match="'negative' is 5 tokens"):
        run_evaluate(_config(tiny, tmp_path / "o2", label_words=("positive", "negative")), lm=lm)
    with pytest.raises(UserError, match="only 120"):
        run_evaluate(_config(tiny, tmp_path / "o3", pool_size=100), lm=lm)
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no meta.json"):
        run_evaluate(_config(tiny, tmp_path / "o4"), lm=lm)
    assert (tmp_path / "o4" / "notes.txt").read_text() == "mine"
    for name in ("o1", "o2", "o3"):
        assert not (tmp_path / name).exists()
    # Subsets made from other data are refused: same row count, one text changed.
    changed = pd.read_parquet(tiny["data"])
    changed.loc[:, "text"] = changed.text + "!"
    changed_data = tmp_path / "changed.parquet"
    changed.to_parquet(changed_data)
    run_evaluate(_config(tiny, tmp_path / "o5", icl=0), lm=lm, log=lambda *_: None)
    with pytest.raises(UserError, match="different texts or labels"):
        run_evaluate(_config(tiny, tmp_path / "o6", dataset=str(changed_data), subsets=str(tmp_path / "o5"),
                             pool_size=None, test_size=None, icl_candidates=None), lm=lm)


def test_load_evaluation_refuses_broken_arrays(tiny, icl_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(icl_run, broken)
    logits = np.load(broken / "pool" / "logits.npy")
    logits[5, 1] = np.nan
    np.save(broken / "pool" / "logits.npy", logits)
    with pytest.raises(UserError, match=r"--surrogate .*logits.npy: row 5 has a NaN"):
        load_evaluation(broken, flag="--surrogate")
    labels = np.load(broken / "test" / "labels.npy")
    labels[3] = 4
    np.save(broken / "test" / "labels.npy", labels)
    with pytest.raises(UserError, match="row 3 has label 4, outside 0..1"):
        load_evaluation(broken, "test")
    (broken / "pool" / "metrics.json").unlink()
    with pytest.raises(UserError, match="pool is not finished"):
        load_evaluation(broken, "pool")


def test_killed_cli_run_resumes_bit_identical(tiny, icl_run, capsys):
    """Kill `python -m jaxprobe.cli evaluate` after some shards, rerun the same command: the
    final arrays equal an uninterrupted run's bit for bit (each shard is the same unit of work)."""
    from jaxprobe import cli

    out = tiny["root"] / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxprobe.cli", *_cli_args(tiny, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = out / "pool" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("part-*.npy"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = len(list(shards.glob("part-*.npy")))
    assert 3 <= done < 20 and not (out / "pool" / "metrics.json").exists()

    assert cli.main(_cli_args(tiny, out)) == 0
    assert f"resuming {out}: {2 * done} of 60 prompts already done" in capsys.readouterr().err
    reference = tiny["root"] / "uninterrupted"
    assert cli.main(_cli_args(tiny, reference)) == 0
    for name in ("pool", "test"):
        for array in ("logits", "labels", "indices"):
            assert (out / name / f"{array}.npy").read_bytes() == (reference / name / f"{array}.npy").read_bytes()
    # Same prompts and model as the module's run with other shard/batch sizes: equal to fp32 rounding.
    np.testing.assert_allclose(load_evaluation(out).logits, load_evaluation(icl_run).logits, atol=1e-5)


def test_crash_between_a_subsets_two_merges_resumes(tiny, monkeypatch, capsys):
    """With --activations, a subset's logits and activations are merged one after the other; a run
    killed between the two (logits.npy written, its shards gone) recomputes that subset's shards
    on rerun and ends with the same bytes as an uninterrupted run."""
    from jaxprobe import files

    config = dict(icl=0, activations=2)
    reference = tiny["root"] / "acts-reference"
    run_evaluate(_config(tiny, reference, **config), lm=tiny["lm"], log=lambda *_: None)
    out = tiny["root"] / "acts-killed"
    real_merge = files.ShardedArrayWriter.merge

    def merge(writer, path):
        if Path(path).name == "activations.npy" and Path(path).parent.name == "test":
            raise KeyboardInterrupt  # a kill: after test/logits.npy, before test/activations.npy
        return real_merge(writer, path)

    with monkeypatch.context() as m:
        m.setattr(files.ShardedArrayWriter, "merge", merge)
        with pytest.raises(KeyboardInterrupt):
            run_evaluate(_config(tiny, out, **config), lm=tiny["lm"], log=lambda *_: None)
    assert (out / "test" / "logits.npy").is_file() and not (out / "test" / "shards").exists()
    run_evaluate(_config(tiny, out, **config), lm=tiny["lm"], log=lambda *_: None)
    assert _snapshot(out).keys() == _snapshot(reference).keys()
    for name, data in _snapshot(reference).items():
        if name.endswith(".npy"):
            assert _snapshot(out)[name] == data, name


@pytest.mark.slow
def test_smollm2_label_tokens_prefix_merge_and_cache(tmp_path):
    """The real model: SST-2 label tokens are 3524/2731, the ICL context tokenised alone is NOT a
    token prefix of the whole prompt (its trailing "\\n\\n" merges differently), and evaluate's
    cached logits equal whole-prompt logits without the cache."""
    import jaxprobe

    lm = jaxprobe.load_model("smollm2-135m")
    out = run_evaluate(EvaluateConfig(out=str(tmp_path / "sst2"), pool_size=8, test_size=0, icl_candidates=40,
                                      icl=4, shard_size=8, batch_size=8, progress=False), lm=lm, log=lambda *_: None)
    assert not (out / "test").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["label_token_ids"] == [3524, 2731] and meta["label_tokens"] == [" negative", " positive"]
    prompt = meta["example_prompt"]
    context = prompt[: prompt.rindex("Sentence: '")]
    whole, alone = lm.tokenize([prompt])[0], lm.tokenize([context])[0]
    assert whole[: len(alone)] != alone  # tokenising the prefix apart would feed the model other tokens
    ev = load_evaluation(out, "pool")
    from jaxprobe.data import load_split

    sst2 = load_split("sst2", "train")
    examples = [(sst2[r]["text"], ("negative", "positive")[sst2[r]["label"]]) for r in meta["icl"]["rows"]]
    prompts = build_prompts([sst2[int(r)]["text"] for r in ev.indices], instruction=SST2_INSTRUCTION,
                            answer_word="Label", examples=examples)
    assert prompts[0] == prompt
    np.testing.assert_allclose(ev.logits, lm.logits(prompts, token_ids=[3524, 2731], batch_size=8), atol=1e-4)
    assert ev.metrics["prefix_tokens_cached"] >= len(alone) - 2


def test_unlabelled_pool_writes_logits_only(tiny, tmp_path, capsys):
    """Data without a label column (or --no-labels): logits and row indices, no labels; what needs
    labels says so in one line; the logits equal a labelled run's on the same rows."""
    import pandas as pd

    from jaxprobe.cli import main

    data = tmp_path / "unlabelled.parquet"
    pd.read_parquet(tiny["data"]).drop(columns="label").to_parquet(data)
    quiet = {"log": lambda *_: None, "lm": tiny["lm"]}
    out = run_evaluate(_config(tiny, tmp_path / "u", dataset=str(data), icl=0, test_size=None, icl_candidates=None),
                       **quiet)
    assert not (out / "pool" / "labels.npy").exists() and not (out / "test").exists()
    assert json.loads((out / "pool" / "metrics.json").read_text())["labelled"] is False
    with pytest.raises(UserError, match="without labels"):
        load_evaluation(out)
    ev = load_evaluation(out, need_labels=False)
    assert ev.labels is None and ev.logits.shape == (40, 2)
    run_evaluate(_config(tiny, tmp_path / "u", dataset=str(data), icl=0, test_size=None, icl_candidates=None),
                 **quiet)  # a finished unlabelled folder is recognised on a rerun
    # --no-labels on labelled data: the same rows give the same logits as a labelled evaluation
    labelled = run_evaluate(_config(tiny, tmp_path / "l", icl=0, test_size=0, icl_candidates=0), **quiet)
    nolab = run_evaluate(_config(tiny, tmp_path / "n", icl=0, test_size=0, icl_candidates=0, no_labels=True), **quiet)
    np.testing.assert_array_equal(load_evaluation(nolab, need_labels=False).logits, load_evaluation(labelled).logits)
    with pytest.raises(UserError, match="needs labelled in-context examples"):
        run_evaluate(_config(tiny, tmp_path / "i", dataset=str(data), icl=2), **quiet)
    capsys.readouterr()
    assert main(["acquire", "--target", str(out), "--acquisition", "iid", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "without labels" in err and not (tmp_path / "a").exists()
    assert main(["propose", "--target", str(out), "--acquisition", "self-entropy", "--size", "5",
                 "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "queue.csv").is_file()
