"""The pure active-testing math (NumPy float64): the spec's appendix vectors, exact unbiasedness of
LURE by enumeration, and the acquisition scores' reference quirks."""

import itertools

import numpy as np
import pytest

from jaxprobe.active import estimators as E

POOL_SCORES = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
POOL_LOSSES = np.array([0.3, 1.2, 0.1, 2.0, 0.7])


# ---------------------------------------------------------------- appendix vectors (spec, Appendix)

def test_pmf_appendix_vector_and_removal():
    np.testing.assert_allclose(E.proposal_pmf(POOL_SCORES, 0.1), POOL_SCORES / 20, rtol=0, atol=1e-15)
    np.testing.assert_allclose(E.proposal_pmf(POOL_SCORES[:4], 0.1), [0.1, 0.2, 0.3, 0.4], atol=1e-15)


def test_pmf_floor_is_applied_before_renormalising():
    q = E.proposal_pmf(np.array([0.0, 0.0, 0.0, 1.0]), 0.1)
    np.testing.assert_allclose(q, [0.025 / 1.075] * 3 + [1 / 1.075], rtol=1e-12)
    np.testing.assert_allclose(q, [0.02326, 0.02326, 0.02326, 0.93023], atol=5e-6)


def test_pmf_all_zero_without_clip_is_uniform():
    np.testing.assert_array_equal(E.proposal_pmf(np.zeros(4), 0.0), np.full(4, 0.25))


def test_lure_weights_appendix_vector():
    np.testing.assert_allclose(E.lure_weights([0.5], 5), [0.4], rtol=1e-15)
    np.testing.assert_allclose(E.lure_weights([0.5, 0.1], 5), [0.55, 2.5], rtol=1e-14)
    assert E.lure_estimate([1.0, 1.0], [0.5, 0.1], 5) == pytest.approx(1.525, abs=1e-14)


def test_softmax_clamp_appendix_vector():
    np.testing.assert_allclose(E.softmax_clamp(np.array([[40.0, 35.0]])), [[0.5, 0.5]], atol=1e-15)
    np.testing.assert_allclose(E.softmax_clamp(np.array([[20.0, 15.0]])), [[0.99331, 0.00669]], atol=5e-6)
    # with a temperature: the same clamp on exp(z / T)
    np.testing.assert_allclose(E.softmax_clamp(np.array([[40.0, 35.0]]), temperature=2.0),
                               [[1 / (1 + np.exp(-2.5)), 1 - 1 / (1 + np.exp(-2.5))]], rtol=1e-12)


def test_nll_acquisition_is_label_smoothed_as_the_reference():
    surrogate = np.array([[0.3, -1.0], [2.0, 0.5], [0.0, 0.0]])
    labels = np.array([0, 1, 1])
    pi = E.softmax_clamp(surrogate)
    smooth = np.array([np.e, 1.0]) / (np.e + 1)  # softmax(one_hot) for K=2: (0.7311, 0.2689)
    np.testing.assert_allclose(smooth, [0.7311, 0.2689], atol=5e-5)
    expected = [-(smooth * np.log(pi[0])).sum(), -(smooth[::-1] * np.log(pi[1])).sum(),
                -(smooth[::-1] * np.log(pi[2])).sum()]
    np.testing.assert_allclose(E.acquisition_scores("nll", None, surrogate, labels), expected, rtol=1e-12)
    np.testing.assert_allclose(E.acquisition_scores("nll-exact", None, surrogate, labels),
                               -np.log(pi[np.arange(3), labels]), rtol=1e-12)
    three = E.softmax_clamp(np.eye(3)[[0]])
    np.testing.assert_allclose(three, [[0.5761, 0.2119, 0.2119]], atol=5e-5)


def test_scores_of_each_acquisition():
    rng = np.random.default_rng(0)
    target, surrogate = rng.normal(size=(6, 3)) * 3, rng.normal(size=(6, 3))
    labels = rng.integers(0, 3, 6)
    p, pi = E.softmax_clamp(target), E.softmax_clamp(surrogate)
    ce = E.acquisition_scores("cross-entropy", target, surrogate, labels)
    np.testing.assert_allclose(ce, -(pi * np.log(p)).sum(1), rtol=1e-12)  # E_surrogate[-log p_target]
    np.testing.assert_allclose(E.acquisition_scores("entropy", target, surrogate, labels),
                               -(pi * np.log(pi)).sum(1), rtol=1e-12)
    np.testing.assert_allclose(E.acquisition_scores("self-entropy", target, surrogate, labels),
                               -(p * np.log(p)).sum(1), rtol=1e-12)
    np.testing.assert_allclose(E.acquisition_scores("true-loss", target, surrogate, labels),
                               E.per_example_loss(target, labels), rtol=1e-10)
    np.testing.assert_array_equal(E.acquisition_scores("iid", target, surrogate, labels), np.ones(6))
    # the temperature divides the surrogate only
    hot = E.acquisition_scores("cross-entropy", target, surrogate, labels, temperature=2.0)
    np.testing.assert_allclose(hot, -(E.softmax_clamp(surrogate / 2.0) * np.log(p)).sum(1), rtol=1e-12)


def test_loss_is_stable_where_the_score_clamp_saturates():
    logits = np.array([[800.0, 0.0], [0.0, 800.0]])
    np.testing.assert_allclose(E.per_example_loss(logits, np.array([1, 1])), [800.0, 0.0], atol=1e-9)


def test_ase_is_surrogate_expected_target_loss():
    rng = np.random.default_rng(1)
    target, surrogate = rng.normal(size=(7, 2)), rng.normal(size=(7, 2))
    pi = np.exp(E.log_softmax(surrogate))
    assert E.ase_estimate(target, surrogate) == pytest.approx(-(pi * E.log_softmax(target)).sum(1).mean(), rel=1e-13)


# ---------------------------------------------------------------- exact unbiasedness

def _sequences(scores, clip, m):
    """Every ordered sample of m distinct points with its probability and q's, by enumeration."""
    n = len(scores)
    for seq in itertools.permutations(range(n), m):
        prob, qs, remaining = 1.0, [], list(range(n))
        for i in seq:
            pmf = E.proposal_pmf(scores[remaining], clip)
            q = pmf[remaining.index(i)]
            prob *= q
            qs.append(q)
            remaining.remove(i)
        yield seq, prob, np.array(qs)


@pytest.mark.parametrize("clip", [0.0, 0.1])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_lure_is_exactly_unbiased_by_enumeration(clip, m):
    total_prob, expectation = 0.0, 0.0
    for seq, prob, qs in _sequences(POOL_SCORES, clip, m):
        total_prob += prob
        expectation += prob * E.lure_estimate(POOL_LOSSES[list(seq)], qs, len(POOL_SCORES))
    assert total_prob == pytest.approx(1.0, abs=1e-14)
    assert abs(expectation - POOL_LOSSES.mean()) < 1e-12
    assert POOL_LOSSES.mean() == pytest.approx(0.86)


@pytest.mark.parametrize("acquisition", ["cross-entropy", "nll"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_lure_is_exactly_unbiased_for_three_classes(acquisition, m):
    # K = 3: scores and losses come from three-way label-token logits of a target and a surrogate
    rng = np.random.default_rng(3)
    target, surrogate = rng.normal(size=(5, 3)) * 2, rng.normal(size=(5, 3)) * 2
    labels = np.array([0, 2, 1, 2, 0])
    scores = E.acquisition_scores(acquisition, target, surrogate, labels)
    losses = E.per_example_loss(target, labels)
    assert scores.shape == losses.shape == (5,) and len(set(np.round(scores, 9))) == 5
    expectation = sum(prob * E.lure_estimate(losses[list(seq)], qs, 5) for seq, prob, qs in _sequences(scores, 0.1, m))
    assert abs(expectation - losses.mean()) < 1e-12
    naive = sum(prob * losses[list(seq)].mean() for seq, prob, _ in _sequences(scores, 0.1, m))
    assert m == 1 or abs(naive - losses.mean()) > 1e-4  # and the plain mean of the draws is not


def test_naive_and_importance_estimators_are_biased_here():
    # the same enumeration shows why LURE is needed: the naive mean over an active sample is biased
    naive = sum(prob * POOL_LOSSES[list(seq)].mean() for seq, prob, _ in _sequences(POOL_SCORES, 0.1, 2))
    assert abs(naive - POOL_LOSSES.mean()) > 1e-3


def test_uniform_proposal_makes_lure_the_sample_mean_and_m_equal_n_the_pool_mean():
    n = 7
    losses = np.random.default_rng(2).random(n)
    uniform_q = 1.0 / (n - np.arange(4))
    assert E.lure_estimate(losses[:4], uniform_q, n) == pytest.approx(losses[:4].mean(), abs=1e-15)
    q = np.random.default_rng(3).random(n)  # any q: with M = N every weight is 1
    assert E.lure_estimate(losses, q, n) == pytest.approx(losses.mean(), abs=1e-15)


def test_reference_draws_are_distinct_and_record_their_pmf():
    rng = np.random.default_rng(4)
    idx, q = E.reference_draws(POOL_SCORES, 4, 0.1, rng)
    assert len(set(idx.tolist())) == 4
    remaining = list(range(5))
    for i, qi in zip(idx, q):
        assert qi == E.proposal_pmf(POOL_SCORES[remaining], 0.1)[remaining.index(i)]
        remaining.remove(i)
