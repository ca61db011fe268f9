"""The vectorised sampler and `run_sweep` against the plain NumPy reference: exact proposal
probabilities, LURE by the cumulative-sum identity vs the direct float64 formula, a chi-square test
of the draws, chunk/thread independence, the identities of uniform and full-pool sampling, and the
bootstrap arithmetic."""

import numpy as np
import pytest
from scipy import stats

from jaxprobe.active import estimators as E
from jaxprobe.active.bootstrap import bootstrap_study
from jaxprobe.active.sweep import SweepConfig, prepare_pool, relative_error, run_sweep, summarise_sweep
from jaxprobe.active.sampler import PreparedPool, stream_key, sweep_chunk, sweep_with_uniforms
from jaxprobe.errors import UserError

N_POOL, SIZE, RUNS = 40, 12, 24  # one compiled shape shared by most tests here


@pytest.fixture(scope="module")
def pool_arrays():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(N_POOL, 3)) * 2
    surrogate = target + rng.normal(size=(N_POOL, 3))
    labels = rng.integers(0, 3, N_POOL)
    return target, surrogate, labels


def _replay(scores, rows, clip):
    """The reference's pmf at every step of one recorded run: q of the drawn point."""
    remaining = list(range(len(scores)))
    out = []
    for i in rows:
        out.append(E.proposal_pmf(scores[remaining], clip)[remaining.index(i)])
        remaining.remove(i)
    return np.array(out)


@pytest.mark.parametrize("clip", [0.0, 0.1, 0.5])
def test_recorded_draws_have_the_reference_probabilities_and_lure_matches_the_formula(clip):
    rng = np.random.default_rng(1)
    scores = rng.gamma(0.4, size=N_POOL)
    scores[:5] = 0.0  # zero scores: never drawn without a clip, floored with one
    losses = rng.gamma(1.0, size=N_POOL)
    pool = PreparedPool(scores, losses)
    for name in ("lure", "is", "mean"):
        est, rows, q = sweep_chunk(pool, stream_key(3, "test"), np.arange(RUNS), size=SIZE, clip=clip,
                                   estimator=name, record=True)
        for r in range(RUNS):
            assert len(set(rows[r].tolist())) == SIZE
            np.testing.assert_allclose(q[r], _replay(scores, rows[r], clip), rtol=1e-12, atol=0)
            direct = E.estimate_from_draws(name, losses[rows[r]], q[r], N_POOL)
            np.testing.assert_allclose(est[r], direct, rtol=1e-12, atol=1e-13)
        if clip == 0.0:
            assert not np.isin(rows, np.arange(5)).any()


def test_no_positive_score_left_falls_back_to_uniform():
    # true-loss style: 2 positive scores, clip 0; after both are drawn the rest is uniform
    scores = np.array([0.0, 0.0, 3.0, 0.0, 1.0, 0.0])
    pool = PreparedPool(scores, np.arange(6.0))
    _, rows, q = sweep_chunk(pool, stream_key(0, "test"), np.arange(8), size=6, clip=0.0, record=True)
    for r in range(8):
        assert sorted(rows[r][:2].tolist()) == [2, 4] and sorted(rows[r].tolist()) == list(range(6))
        np.testing.assert_allclose(q[r], _replay(scores, rows[r], 0.0), rtol=1e-12)
        np.testing.assert_allclose(q[r][2:], [1 / 4, 1 / 3, 1 / 2, 1.0], rtol=1e-12)


@pytest.mark.parametrize("clip", [0.0, 0.1])
def test_extreme_uniforms_draw_the_ends_of_the_cdf_and_never_a_drawn_point(clip):
    # u = 0, the largest double below 1, and 1 itself (never drawn, but where rounding can land)
    # put the draw on CDF boundaries next to empty gaps between drawn points; the sampler must
    # still return a remaining point with positive probability
    scores = np.array([0.0, 0.0, 0.5, 0.5, 1.0, 2.0, 2.0, 7.0])
    pool = PreparedPool(scores, np.ones(8))
    top = np.nextafter(1.0, 0.0)
    _, rows, q = sweep_with_uniforms(pool, np.array([[0.0] * 8, [top] * 8, [1.0] * 8]), clip=clip)
    np.testing.assert_array_equal(rows[2], rows[1])
    for r in range(3):
        assert sorted(rows[r].tolist()) == list(range(8))
        np.testing.assert_allclose(q[r], _replay(scores, rows[r], clip), rtol=1e-12)
    ascending = pool.order if clip else np.r_[pool.order[2:], pool.order[:2]]  # zero scores last
    np.testing.assert_array_equal(rows[0], ascending)
    np.testing.assert_array_equal(rows[1][: 6 if not clip else 8], pool.order[::-1][: 6 if not clip else 8])


def _pair_probabilities(scores, clip, floor_per_step=True):
    n = len(scores)
    first = E.proposal_pmf(scores, clip)
    table = np.zeros((n, n))
    for i in range(n):
        rest = [j for j in range(n) if j != i]
        # the reference recomputes the floor over the n-1 points left; "fixed weights" keeps the
        # first step's probabilities (what Gumbel-top-k would sample)
        second = E.proposal_pmf(scores[rest], clip) if floor_per_step else first[rest] / first[rest].sum()
        table[i, rest] = first[i] * second
    return table


def test_first_two_draws_pass_a_chi_square_test_and_fixed_weights_fail_it():
    scores = np.array([0.0, 0.0, 0.05, 0.3, 1.0, 6.0])
    clip, runs = 0.6, 60_000
    pool = PreparedPool(scores, np.zeros(6))
    _, rows, _ = sweep_chunk(pool, stream_key(11, "chi-square"), np.arange(runs), size=2, clip=clip, record=True)
    observed = np.zeros((6, 6))
    np.add.at(observed, (rows[:, 0], rows[:, 1]), 1)
    cells = ~np.eye(6, dtype=bool)
    exact = _pair_probabilities(scores, clip)[cells] * runs
    p_exact = stats.chisquare(observed[cells], exact).pvalue
    assert p_exact > 1e-3, p_exact
    # the test has power: sampling with the first step's weights kept fixed is rejected
    fixed = _pair_probabilities(scores, clip, floor_per_step=False)[cells] * runs
    assert stats.chisquare(observed[cells], fixed).pvalue < 1e-6
    # and the naive reference sampler agrees with the same exact table
    rng = np.random.default_rng(5)
    ref = np.array([E.reference_draws(scores, 2, clip, rng)[0] for _ in range(6000)])
    ref_counts = np.zeros((6, 6))
    np.add.at(ref_counts, (ref[:, 0], ref[:, 1]), 1)
    assert stats.chisquare(ref_counts[cells], exact / runs * 6000).pvalue > 1e-3


def test_results_do_not_depend_on_chunks_or_threads(pool_arrays):
    target, surrogate, labels = pool_arrays
    kw = dict(acquisition="cross-entropy", runs=120, size=SIZE, seed=7, progress=False)
    a = run_sweep(target, surrogate, labels, chunk_runs=120, threads=1, **kw)  # one chunk of 128 lanes
    b = run_sweep(target, surrogate, labels, chunk_runs=40, threads=2, **kw)  # two chunks of 64
    assert a.shape == (SIZE, 120) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    c = run_sweep(target, surrogate, labels, chunk_runs=120, threads=1, **{**kw, "seed": 8})
    assert not np.array_equal(a, c)


def test_uniform_proposal_gives_the_sample_mean(pool_arrays):
    target, surrogate, labels = pool_arrays
    kw = dict(acquisition="iid", runs=RUNS, size=SIZE, seed=2, progress=False, chunk_runs=RUNS)
    lure = run_sweep(target, None, labels, estimator="lure", **kw)
    mean = run_sweep(target, None, labels, estimator="mean", **kw)
    np.testing.assert_allclose(lure, mean, rtol=0, atol=1e-12)
    # the same draws: the naive mean of each run equals the mean of its first m losses
    pool = prepare_pool(target, None, labels, SweepConfig("iid", "mean", RUNS, SIZE, 2))
    _, rows, q = sweep_chunk(pool, stream_key(2, "iid"), np.arange(RUNS), size=SIZE, clip=0.0, record=True)
    losses = E.per_example_loss(target, labels)
    np.testing.assert_allclose(mean.T, np.cumsum(losses[rows], axis=1) / np.arange(1, SIZE + 1), rtol=1e-13)
    np.testing.assert_allclose(q, np.broadcast_to(1.0 / (N_POOL - np.arange(SIZE)), q.shape), rtol=1e-14)


def test_m_equal_n_gives_the_exact_pool_mean(pool_arrays):
    target, surrogate, labels = pool_arrays
    est = run_sweep(target[:SIZE], surrogate[:SIZE], labels[:SIZE], acquisition="cross-entropy",
                    runs=RUNS, size=SIZE, clip=0.1, progress=False, chunk_runs=RUNS)
    pool_mean = E.per_example_loss(target[:SIZE], labels[:SIZE]).mean()
    np.testing.assert_allclose(est[-1], pool_mean, rtol=0, atol=1e-12)
    assert np.ptp(est[0]) > 0  # earlier steps do vary between runs


def test_ase_is_constant_and_bad_arrays_are_refused(pool_arrays):
    target, surrogate, labels = pool_arrays
    est = run_sweep(target, surrogate, labels, estimator="ase", runs=3, size=5, progress=False)
    assert est.shape == (5, 3) and np.all(est == E.ase_estimate(target, surrogate))
    bad = target.copy()
    bad[7, 1] = np.nan
    with pytest.raises(UserError, match="row 7 has a NaN"):
        run_sweep(bad, surrogate, labels, runs=2, size=3, progress=False)
    with pytest.raises(UserError, match="label 3, outside 0..2"):
        run_sweep(target, surrogate, np.where(np.arange(N_POOL) == 4, 3, labels), runs=2, size=3, progress=False)
    with pytest.raises(UserError, match="larger than the pool"):
        run_sweep(target, surrogate, labels, runs=2, size=N_POOL + 1, progress=False)
    with pytest.raises(UserError, match="clip"):
        run_sweep(target, surrogate, labels, runs=2, size=3, clip=1.0, progress=False)
    with pytest.raises(UserError, match="differs"):
        run_sweep(target, surrogate[:, :2], labels, runs=2, size=3, progress=False)


def test_summary_and_relative_error_by_hand():
    est = np.array([[1.0, 3.0, 2.0], [2.0, 2.5, 1.5]])
    iid = np.array([[0.0, 4.0, 2.0], [1.0, 3.0, 2.0], [2.0, 1.5, 2.5]])
    s = summarise_sweep(est, 2.0, iid, budgets=(1,))
    assert s["median_squared_error"] == [1.0, 0.25] and s["mean_squared_error"] == [2 / 3, 0.5 / 3]
    assert s["relative_error"] == [1.0 / 4.0, 0.25 / 1.0]  # iid median SE: 4, 1, 0.25
    shifted = summarise_sweep(est, 2.0, iid, offset=1)
    assert shifted["relative_error"] == [1.0 / 1.0, 0.25 / 0.25]  # k active vs 1 + k uniform
    assert list(relative_error(np.ones(3), np.ones(2), offset=1)) == [1.0]
    assert s["table"] == [{"labels": 1, "median_squared_error_x1e4": 1e4, "relative_error": 0.25},
                          {"labels": 2, "median_squared_error_x1e4": 2500.0, "relative_error": 0.25}]


def test_bootstrap_variance_by_hand(pool_arrays):
    target, surrogate, labels = pool_arrays
    config = SweepConfig("cross-entropy", "lure", RUNS, SIZE, 4, 0.1)
    pool = prepare_pool(target, surrogate, labels, config)
    kw = dict(runs=6, budgets=(8,), true_risk=1.0, progress=False)
    exact = bootstrap_study(pool, config, resamples=0, **kw)
    _, rows, q = sweep_chunk(pool, stream_key(4, "cross-entropy"), np.arange(6), size=SIZE, clip=0.1, record=True)
    losses = E.per_example_loss(target, labels)[rows]
    for i, k in enumerate((8,)):
        x = np.array([E.lure_weights(q[r, :k], N_POOL) * losses[r, :k] for r in range(6)])
        np.testing.assert_allclose(exact["arrays"]["variance"][i], x.var(axis=1) / k, rtol=1e-12)
    paper = bootstrap_study(pool, config, resamples=400, variance="paper", **kw)
    reference = bootstrap_study(pool, config, resamples=400, variance="reference", **kw)
    np.testing.assert_allclose(reference["arrays"]["variance"], paper["arrays"]["variance"] * 399 / 400, rtol=1e-12)
    # Monte Carlo with 400 resamples is within its own noise (~sqrt(2/399) = 7%) of the exact value
    ratio = paper["arrays"]["variance"] / exact["arrays"]["variance"]
    assert np.all(np.abs(ratio - 1) < 0.35) and abs(np.mean(ratio) - 1) < 0.1
    assert len(paper["coverage"]) == 1 and all(0 <= c <= 1 for c in paper["coverage"])
