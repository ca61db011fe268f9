"""The probe surrogate: layer choice by cross-validation finds the informative layer, and with
refits inside a run LURE stays unbiased (exact enumeration on a tiny pool), with the vmapped
sweep drawing with exactly the enumerated proposals."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprobe.active import estimators as E
from jaxprobe.active import probe_surrogate as S


def test_cross_validation_picks_the_informative_layer():
    rng = np.random.default_rng(0)
    n, k = 60, 3
    y = np.arange(n) % k
    feats = rng.normal(size=(n, 4, 8)).astype(np.float32)
    feats[:, 2, :3] += 3.0 * np.eye(k)[y]  # only layer 2 knows the class
    layer, l2, losses = S.choose_layer(feats, y, k, steps=200)
    best = losses.min(axis=1)
    assert layer == 2 and best[2] < 0.5 * min(np.delete(best, 2)) and l2 in S.L2_GRID
    logits = S.probe_logits(feats[:, 2], y, feats[:, 2], k, steps=200)
    assert np.mean(np.argmax(logits, 1) == y) > 0.9


def _tiny(seed=0, n=5, k=2, d=3, n_examples=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, k)) * 2, rng.integers(0, k, n), rng.normal(size=(n, d)),
            rng.normal(size=(n_examples, d)), np.arange(n_examples) % k)


@pytest.mark.parametrize("refit_every", [1, 3])
def test_lure_with_refits_is_unbiased_by_exact_enumeration(refit_every):
    target, labels, pool_x, ex_x, ex_y = _tiny()
    n, size, clip = 5, 3, 0.1
    losses = E.per_example_loss(target, labels)
    log_p = target - np.logaddexp.reduce(target, axis=1, keepdims=True)
    with jax.enable_x64(True):
        rescore = jax.jit(lambda acquired: S.refit_scores(
            acquired, jnp.asarray(pool_x), jnp.asarray(labels), jnp.asarray(ex_x), jnp.asarray(ex_y),
            jnp.asarray(log_p), k=2, l2=S.DEFAULT_L2, steps=50))

        def path_q(path):
            # the proposal of each draw: scores refitted at each segment start on the items drawn
            # before it, the clipped proposal over the items left
            qs, scores = [], None
            for m, item in enumerate(path):
                acquired = np.zeros(n, bool)
                acquired[list(path[:m])] = True
                if m % refit_every == 0:
                    scores = rescore(jnp.asarray(acquired))
                qs.append(float(S.proposal(scores, jnp.asarray(~acquired), clip)[item]))
            return np.array(qs)

        paths = {path: path_q(path) for path in itertools.permutations(range(n), size)}
        total = sum(np.prod(q) for q in paths.values())
    assert total == pytest.approx(1.0, abs=1e-12)
    # E[LURE after m labels] over the first m draws' marginal: sum over full paths of P(path) * LURE_m
    for m in range(1, size + 1):
        marginal = sum(np.prod(q) * E.lure_estimate(losses[list(p[:m])], q[:m], n) for p, q in paths.items())
        assert marginal == pytest.approx(losses.mean(), abs=1e-12), m
    # the vmapped sweep draws with exactly these proposals and reports the same LURE
    est, rows, q = S.adaptive_sweep(target, labels, pool_x, ex_x, ex_y, runs=16, size=size,
                                    refit_every=refit_every, clip=clip, steps=50)
    for r in range(16):
        path = tuple(int(i) for i in rows[r])
        assert len(set(path)) == size
        np.testing.assert_allclose(q[r], paths[path], rtol=1e-9)
        np.testing.assert_allclose(est[r], E.estimate_from_draws("lure", losses[list(path)], q[r], n), rtol=1e-9)


def test_evaluate_activations_and_acquire_with_the_probe_surrogate(tmp_path, tiny_ckpt, capsys):
    """One forward pass gives logits and activations; the examples are those --icl N would pick;
    `acquire --surrogate probe` equals a sweep with the probe's logits as the surrogate."""
    import json

    import jaxprobe
    from jaxprobe.active.inputs import load_evaluation
    from jaxprobe.active.sweep import run_sweep
    from jaxprobe.cli import main
    from jaxprobe.errors import UserError
    from jaxprobe.evaluate import EvaluateConfig, run_evaluate
    from jaxprobe.testing import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data.parquet", 100, seed=3)
    lm = jaxprobe.load_model(tiny_ckpt)
    base = {"model": str(tiny_ckpt), "dataset": str(data), "label_words": ("a", "positive"), "pool_size": 30,
            "test_size": 10, "icl_candidates": 20, "shard_size": 8, "batch_size": 8, "progress": False}
    quiet = {"lm": lm, "log": lambda *_: None}
    out = run_evaluate(EvaluateConfig(out=str(tmp_path / "zero"), activations=6, **base), **quiet)
    plain = run_evaluate(EvaluateConfig(out=str(tmp_path / "plain"), **base), **quiet)
    acts = np.load(out / "pool" / "activations.npy")
    assert acts.shape == (30, lm.n_hook_points, lm.config.d_model) and not (out / "pool" / "activation_shards").exists()
    np.testing.assert_allclose(load_evaluation(out).logits, load_evaluation(plain).logits, atol=1e-5)
    np.testing.assert_allclose(acts, lm.activations(lm.tokenize(_prompts(out)), batch_size=8), atol=1e-4)
    few = run_evaluate(EvaluateConfig(out=str(tmp_path / "icl6"), icl=6, subsets=str(out), **{
        **base, "pool_size": None, "test_size": None, "icl_candidates": None}), **quiet)
    meta_few = json.loads((few / "meta.json").read_text())
    assert load_evaluation(out, "examples").indices.tolist() == meta_few["icl"]["rows"]
    with pytest.raises(UserError, match="needs --icl 0"):
        run_evaluate(EvaluateConfig(out=str(tmp_path / "bad"), activations=6, icl=2, **base), **quiet)
    assert main(["acquire", "--target", str(out), "--surrogate", "probe", "--runs", "8", "--size", "6",
                 "--iid", "none", "--no-progress", "--out", str(tmp_path / "acq")]) == 0
    target = load_evaluation(out)
    surrogate, info = S.probe_surrogate(target)
    assert 0 <= info["layer"] < lm.n_hook_points and info["examples"] == 6
    expected = run_sweep(target.logits, surrogate.logits, target.labels, runs=8, size=6, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "acq" / "estimates.npy"), expected)
    # --refit-every: the probe refitted inside each run, the same draws as adaptive_sweep
    assert main(["acquire", "--target", str(out), "--surrogate", "probe", "--refit-every", "3", "--runs", "8",
                 "--size", "6", "--iid", "none", "--no-progress", "--out", str(tmp_path / "refit")]) == 0
    pool_acts, ex_acts, ex_y = S.load_probe_data(out)
    layer = info["layer"]
    est, _, _ = S.adaptive_sweep(target.logits, target.labels, pool_acts[:, layer], ex_acts[:, layer], ex_y,
                                 runs=8, size=6, refit_every=3, l2=info["l2"])
    np.testing.assert_allclose(np.load(tmp_path / "refit" / "estimates.npy"), est.T, rtol=1e-12)
    capsys.readouterr()
    assert main(["acquire", "--target", str(plain), "--surrogate", "probe", "--out", str(tmp_path / "acq2")]) == 2
    assert "--activations" in capsys.readouterr().err
    assert main(["acquire", "--target", str(out), "--surrogate", str(plain), "--refit-every", "3",
                 "--out", str(tmp_path / "acq3")]) == 2
    assert "--refit-every needs --surrogate probe" in capsys.readouterr().err


def _prompts(folder):
    import json

    import pandas as pd

    from jaxprobe.active.inputs import load_evaluation
    from jaxprobe.prompts import build_prompts

    meta = json.loads((folder / "meta.json").read_text())
    texts = pd.read_parquet(meta["dataset"])["text"]
    rows = load_evaluation(folder).indices
    return build_prompts([texts[int(r)] for r in rows], instruction=meta["instruction"],
                         answer_word=meta["answer_word"], examples=[])
