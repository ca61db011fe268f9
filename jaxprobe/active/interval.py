"""A confidence interval for ONE active-testing run: the LURE estimate of any per-example metric
(loss, accuracy, ...) from the labels acquired so far, its variance, and how many labels a
requested half-width needs. NumPy float64; every function takes arrays [..., M] (M labels in
acquisition order, any leading run axes), so the coverage study runs thousands of runs at once.

Three variance estimators (`INTERVAL_METHODS`):

* `martingale`. LURE is a fixed-weight mix of Raj's per-step estimators: with S_{m-1} the
  metric summed over the points drawn before step m, and q_m the probability the m-th point had
  under the proposal over the points left then,
      Z_m = (S_{m-1} + l_m / q_m) / N,     E[Z_m | steps before m] = pool mean,
      R_LURE = sum_m w_m Z_m,   w_m = N (N - M) / (M (N - m) (N - m + 1)),   sum_m w_m = 1
  (the coefficients of l_m match LURE's v_m / M exactly; tested). The Z_m - mean are martingale
  differences, so Var(R_LURE) = sum_m w_m^2 E[(Z_m - mean)^2], estimated by
      V = sum_m w_m^2 (Z_m - R_LURE)^2 / (1 - sum_m w_m^2)
  (Raj's 1956 estimator when the weights are equal; they nearly are when M << N). Unbiased, but
  with a proposal far from uniform it is skewed: a run that has not yet drawn a rare
  low-probability, high-loss point has a low estimate AND a low variance, so it undercovers.
* `hybrid` (default when the surrogate is known): the larger of `martingale` and the variance
  the surrogate expects, which does not depend on what the run drew. With e_i, e2_i the
  surrogate's expectations of l_i and l_i^2 (over its class probabilities) and q the first
  step's proposal over the whole pool, one draw's variance is
      sigma^2 = sum_i e2_i / q_i - (sum_i e_i)^2 - sum_i (e2_i - e_i^2)
  and V_model = sigma^2 / N^2 * sum_m w_m^2 ((N - m + 1) / N)^2 (the pool left at step m).
* `bootstrap`: the paper's weighted bootstrap (spec section 3): resample the M points with their
  LURE weights, V = variance of the resampled means of v_m l_m; `resamples=0` gives its exact
  B -> infinity value, sum_m (v_m l_m - R)^2 / M^2.

The interval is R +- z V^(1/2) (z = 1.96 for 95%). Which method is the default was decided by
measured coverage (docs/active-testing.md, `scripts/interval_coverage.py`).
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np

from jaxprobe.errors import UserError

INTERVAL_METHODS = ("hybrid", "martingale", "bootstrap")
DEFAULT_METHOD = "hybrid"  # measured: docs/active-testing.md
METRICS = ("loss", "accuracy")  # per-example values of the K-way prediction the estimate reports
METRIC_RANGE = {"loss": (0.0, math.inf), "accuracy": (0.0, 1.0)}  # intervals are clipped to these


def per_example_metrics(log_probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """float64 [N] per example, from normalised or unnormalised log-probabilities (logits) [N, K]:
    `loss` = -log softmax(z)[y], `accuracy` = 1 when argmax z is y (ties: the first class)."""
    z = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels, np.int64)
    log_p = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    loss = -np.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    return {"loss": loss, "accuracy": (np.argmax(z, axis=-1) == labels).astype(np.float64)}


def per_class_metrics(log_probs: np.ndarray) -> dict[str, np.ndarray]:
    """float64 [N, K]: each metric of `per_example_metrics` if the label were class c."""
    z = np.asarray(log_probs, np.float64)
    k = z.shape[-1]
    log_p = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    return {"loss": -log_p, "accuracy": (np.argmax(z, axis=-1)[..., None] == np.arange(k)).astype(np.float64)}


def model_sigma2(metric_per_class: np.ndarray, surrogate_probs: np.ndarray, first_q: np.ndarray) -> float:
    """sigma^2 of `hybrid` (module docstring): the variance of one draw's l / q under the first
    step's proposal `first_q` [N], with each l_i's moments taken from the surrogate."""
    pi = np.asarray(surrogate_probs, np.float64)
    e = np.sum(pi * metric_per_class, axis=-1)
    e2 = np.sum(pi * metric_per_class ** 2, axis=-1)
    return float(max(0.0, np.sum(e2 / first_q) - np.sum(e) ** 2 - np.sum(e2 - e ** 2)))


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise UserError(f"confidence level must be in (0, 1), not {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def lure_terms(values: np.ndarray, q: np.ndarray, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(Z [..., M], w [M]): Raj's per-step estimators and LURE's weights on them (module docstring).
    With M = N, LURE is the plain mean of all N values (v = 1): every Z is then that mean."""
    values = np.asarray(values, np.float64)
    q = np.asarray(q, np.float64)
    big_m, n = values.shape[-1], pool_size
    m = np.arange(1, big_m + 1)
    before = np.cumsum(values, axis=-1) - values
    z = (before + values / q) / n
    if big_m == n:
        mean = values.mean(axis=-1, keepdims=True)
        return np.broadcast_to(mean, values.shape).copy(), np.full(big_m, 1.0 / big_m)
    w = n * (n - big_m) / (big_m * (n - m) * (n - m + 1.0))
    return z, w


def lure(values: np.ndarray, q: np.ndarray, pool_size: int) -> np.ndarray:
    """The LURE estimate [...] of the pool mean of `values` (spec section 1.1), as sum_m w_m Z_m."""
    z, w = lure_terms(values, q, pool_size)
    return np.sum(w * z, axis=-1)


def lure_variance(values: np.ndarray, q: np.ndarray, pool_size: int, *, method: str = DEFAULT_METHOD,
                  sigma2: float | None = None, resamples: int = 0, seed: int = 0) -> np.ndarray:
    """The estimated variance [...] of the LURE estimate after the M labels given (see module);
    `hybrid` needs `sigma2` (`model_sigma2`)."""
    values = np.asarray(values, np.float64)
    q = np.asarray(q, np.float64)
    big_m, n = values.shape[-1], pool_size
    if method not in INTERVAL_METHODS:
        raise UserError(f"interval method {method!r}: choose from {', '.join(INTERVAL_METHODS)}")
    if big_m == n:  # the whole pool is labelled: the estimate is the pool mean itself
        return np.zeros(values.shape[:-1])
    if big_m < 2:
        return np.full(values.shape[:-1], np.inf)
    z, w = lure_terms(values, q, n)
    estimate = np.sum(w * z, axis=-1, keepdims=True)
    if method in ("martingale", "hybrid"):
        found = np.sum(w ** 2 * (z - estimate) ** 2, axis=-1) / (1.0 - np.sum(w ** 2))
        if method == "martingale":
            return found
        if sigma2 is None:
            raise UserError("the hybrid interval needs the surrogate's probabilities; use --interval martingale")
        left = (n - np.arange(big_m)) / n  # the share of the pool left at each step
        return np.maximum(found, sigma2 / n ** 2 * np.sum(w ** 2 * left ** 2))
    m = np.arange(1, big_m + 1)
    v = 1 + (n - big_m) / (n - m) * (1 / ((n - m + 1) * q) - 1)  # LURE's weights (spec 1.1)
    x = v * values
    if resamples == 0:
        return np.sum((x - estimate) ** 2, axis=-1) / big_m ** 2
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, big_m, size=(resamples, big_m))
    means = np.take(x, picks, axis=-1).mean(axis=-1)  # [..., B]
    return np.var(means, axis=-1, ddof=1)  # the paper's 1/(B-1)


def labels_for_half_width(variance: float, labels: int, pool_size: int, half_width: float, *,
                          level: float = 0.95) -> int:
    """Total labels for a `level` interval of +- `half_width`, extrapolating the current variance as
    sigma^2 (1/M - 1/N) (the spread per label stays what it was; sampling without replacement
    shrinks it near the whole pool). Never more than the pool; at least the labels used."""
    if not half_width > 0:
        raise UserError(f"--half-width must be positive, not {half_width}")
    if labels >= pool_size or variance == 0:
        return labels
    if not math.isfinite(variance):
        return pool_size
    per_label = variance / (1.0 / labels - 1.0 / pool_size)
    target = (half_width / _z(level)) ** 2  # the variance that gives the half-width
    needed = 1.0 / (target / per_label + 1.0 / pool_size)
    return int(min(pool_size, max(labels, math.ceil(needed - 1e-9))))


@dataclasses.dataclass(frozen=True)
class Interval:
    """One run's estimate of one metric with its confidence interval."""

    metric: str
    estimate: float
    low: float
    high: float
    half_width: float
    variance: float
    labels: int
    level: float
    method: str

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in dataclasses.asdict(self).items()}


def interval(values: np.ndarray, q: np.ndarray, pool_size: int, *, metric: str = "loss",
             level: float = 0.95, method: str = DEFAULT_METHOD, sigma2: float | None = None,
             resamples: int = 0, seed: int = 0) -> Interval:
    """LURE estimate and `level` interval of the pool mean of `values` [M] from one run."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) < 1:
        raise UserError(f"an interval needs at least one label, got {values.shape}")
    estimate = float(lure(values, q, pool_size))
    variance = float(lure_variance(values, q, pool_size, method=method, sigma2=sigma2, resamples=resamples,
                                   seed=seed))
    half = _z(level) * math.sqrt(variance)
    low, high = METRIC_RANGE.get(metric, (-math.inf, math.inf))
    return Interval(metric, estimate, max(low, estimate - half), min(high, estimate + half), half, variance,
                    len(values), level, method)


def coverage(values_per_run: np.ndarray, q_per_run: np.ndarray, pool_size: int, truth: float, *,
             budgets, level: float = 0.95, method: str = DEFAULT_METHOD, sigma2: float | None = None) -> dict:
    """Fraction of runs whose interval after `b` labels covers `truth`, for each budget b, plus the
    mean half-width: arrays [runs, size] of the runs' drawn values and probabilities."""
    z = _z(level)
    out = {}
    for b in budgets:
        est = lure(values_per_run[:, :b], q_per_run[:, :b], pool_size)
        half = z * np.sqrt(lure_variance(values_per_run[:, :b], q_per_run[:, :b], pool_size, method=method,
                                         sigma2=sigma2))
        out[int(b)] = {"coverage": float(np.mean(np.abs(est - truth) <= half)),
                       "mean_half_width": float(np.mean(half)),
                       "rmse": float(np.sqrt(np.mean((est - truth) ** 2)))}
    return out


def pool_sigma2(target_logits: np.ndarray, surrogate_logits: np.ndarray | None, first_q: np.ndarray) -> dict:
    """`model_sigma2` of every metric for a pool (None without a surrogate)."""
    if surrogate_logits is None:
        return {metric: None for metric in METRICS}
    s = np.asarray(surrogate_logits, np.float64)
    pi = np.exp(s - np.logaddexp.reduce(s, axis=-1, keepdims=True))
    return {metric: model_sigma2(per_class, pi, first_q)
            for metric, per_class in per_class_metrics(target_logits).items()}


def coverage_study(target_logits, surrogate_logits, labels, *, acquisition: str = "cross-entropy",
                   clip: float | None = None, runs: int = 1000, size: int = 400, budgets=(100, 400),
                   level: float = 0.95, seed: int = 0, methods=INTERVAL_METHODS) -> dict:
    """Coverage of each interval method on a fully labelled pool: `runs` runs of the acquire
    sampler (`size` labels each), the interval of each metric after each budget against the pool
    value. {method: {metric: {budget: {coverage, mean_half_width, rmse}}}}."""
    from jaxprobe.active.estimators import proposal_pmf
    from jaxprobe.active.sampler import stream_key, sweep_chunk
    from jaxprobe.active.sweep import SweepConfig, prepare_pool

    config = SweepConfig(acquisition=acquisition, runs=runs, size=size, seed=seed, clip=clip)
    pool = prepare_pool(target_logits, surrogate_logits, labels, config)
    _, rows, q = sweep_chunk(pool, stream_key(seed, acquisition), np.arange(runs), size=size,
                             clip=config.resolved_clip, record=True)
    scores = np.empty(pool.size)
    scores[pool.order] = pool.sorted_scores
    sigma2 = pool_sigma2(target_logits, surrogate_logits, proposal_pmf(scores, config.resolved_clip))
    values = per_example_metrics(target_logits, labels)
    return {method: {metric: coverage(values[metric][rows], q, pool.size, float(values[metric].mean()),
                                      budgets=budgets, level=level, method=method, sigma2=sigma2[metric])
                     for metric in METRICS}
            for method in methods if method != "hybrid" or surrogate_logits is not None}
