"""The one-run interval: LURE as a mix of Raj's estimators (exact), the variance estimators, the
labels needed for a half-width, and the coverage measured by simulation (>= 1,000 runs)."""

import numpy as np
import pytest

from jaxprobe.active import estimators as E
from jaxprobe.active import interval as I
from jaxprobe.errors import UserError
from jaxprobe.testing import synthetic_pool


def _one_run(n=50, m=20, seed=0, clip=0.1):
    rng = np.random.default_rng(seed)
    scores, losses = rng.gamma(1.0, size=n), rng.gamma(0.7, size=n)
    rows, q = E.reference_draws(scores, m, clip, rng)
    return losses, rows, q


@pytest.mark.parametrize("m", [1, 2, 7, 49, 50])
def test_lure_is_a_fixed_weight_mix_of_raj_estimators(m):
    losses, rows, q = _one_run(m=m)
    _, w = I.lure_terms(losses[rows], q, 50)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert I.lure(losses[rows], q, 50) == pytest.approx(E.lure_estimate(losses[rows], q, 50), abs=1e-12)
    if m == 50:
        assert I.lure(losses[rows], q, 50) == pytest.approx(losses.mean(), abs=1e-12)


def test_raj_estimators_are_conditionally_unbiased():
    """Z_1 = l / (N q) over the first step's proposal has mean the pool mean, exactly."""
    rng = np.random.default_rng(1)
    scores, losses = rng.gamma(1.0, size=6), rng.gamma(1.0, size=6)
    q = E.proposal_pmf(scores, 0.1)
    z = np.array([I.lure_terms(losses[[i]], q[[i]], 6)[0][0] for i in range(6)])
    assert np.sum(q * z) == pytest.approx(losses.mean(), abs=1e-12)


def test_variances_and_interval():
    losses, rows, q = _one_run(m=30)
    v_mart = I.lure_variance(losses[rows], q, 50, method="martingale")
    v_boot = I.lure_variance(losses[rows], q, 50, method="bootstrap")
    v_hyb = I.lure_variance(losses[rows], q, 50, method="hybrid", sigma2=1e6)
    assert v_mart > 0 and v_boot > 0 and v_hyb > v_mart  # a huge sigma2 takes over
    assert I.lure_variance(losses[rows], q, 50, method="hybrid", sigma2=0.0) == v_mart
    # B resamples approach the exact B -> infinity bootstrap variance (ddof 1 of the resampled means)
    v_b = I.lure_variance(losses[rows], q, 50, method="bootstrap", resamples=20000, seed=3)
    assert v_b == pytest.approx(v_boot, rel=0.05)
    ci = I.interval(losses[rows], q, 50, method="martingale", level=0.95, metric="other")
    assert ci.low < ci.estimate < ci.high and ci.half_width == pytest.approx(1.959964 * np.sqrt(v_mart), rel=1e-6)
    assert I.lure_variance(losses, np.full(50, 1 / 50), 50) == 0.0  # the whole pool: no uncertainty
    few = I.interval(np.array([1.0, 0.0, 1.0]), q[:3], 50, metric="accuracy", method="martingale")
    assert 0.0 <= few.low and few.high <= 1.0 and few.high - few.low < 2 * few.half_width  # clipped to [0, 1]
    with pytest.raises(UserError, match="hybrid"):
        I.lure_variance(losses[rows], q, 50, method="hybrid")


def test_labels_for_half_width():
    n = 10_000
    need = I.labels_for_half_width(0.0004, 100, n, 0.02)  # half-width now 1.96 * 0.02 = 0.039
    # that many labels bring the extrapolated variance's half-width to at most 0.02
    per_label = 0.0004 / (1 / 100 - 1 / n)
    assert 1.959964 * np.sqrt(per_label * (1 / need - 1 / n)) <= 0.02 + 1e-12
    assert 1.959964 * np.sqrt(per_label * (1 / (need - 1) - 1 / n)) > 0.02
    assert 300 < need < 400
    assert I.labels_for_half_width(0.0004, 100, n, 0.1) == 100  # already narrow enough
    assert I.labels_for_half_width(1.0, 100, n, 1e-4) == n      # never more than the pool
    with pytest.raises(UserError, match="half-width"):
        I.labels_for_half_width(0.1, 10, n, 0.0)


def test_per_example_metrics_from_logits_or_probabilities():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    a, b = I.per_example_metrics(logits, [0, 2]), I.per_example_metrics(np.log(probs), [0, 2])
    np.testing.assert_allclose(a["loss"], E.per_example_loss(logits, np.array([0, 2])), atol=1e-12)
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-12)
    np.testing.assert_array_equal(a["accuracy"], [1.0, 0.0])


@pytest.mark.parametrize("k", [2, 3])
def test_coverage_of_the_default_interval(k):
    """The measured band (docs/active-testing.md): 1,000 runs of cross-entropy acquisition on a
    synthetic pool, the default 95% interval covers the pool value in 90-99% of runs at 100 and
    400 labels, for loss and accuracy."""
    t, s, y = synthetic_pool(2000, k, seed=k)
    study = I.coverage_study(t, s, y, runs=1000, size=400, budgets=(100, 400), methods=(I.DEFAULT_METHOD,))
    for metric in I.METRICS:
        for budget in (100, 400):
            cov = study[I.DEFAULT_METHOD][metric][budget]["coverage"]
            assert 0.90 <= cov <= 0.99, (metric, budget, cov)
