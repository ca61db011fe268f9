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
    layer, losses = S.choose_layer(feats, y, k, steps=200)
    assert layer == 2 and losses[2] < 0.5 * min(np.delete(losses, 2))
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
