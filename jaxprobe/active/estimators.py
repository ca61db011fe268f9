"""The pure math of active testing, in NumPy float64: acquisition scores, the clipped proposal,
the risk estimators (LURE, IS, naive mean, zero-shot ASE), and the reference's one-run-at-a-time
sampling loop.

These functions are the readable definition that the fast JAX sampler (`jaxprobe.active.sampler`)
is tested against, and the "plain alternative" the benchmark times. Every formula cites the spec
(`shared/specs/active_testing.md`, "spec §x"); where the reference code has a quirk, the faithful
form is the default and the fixed form has its own name.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-15  # the reference's clamp for acquisition scores (spec §1.5); never used in the risk loss

# Acquisition functions (spec §2.1). Which logits each one reads:
ACQUISITIONS = ("iid", "cross-entropy", "entropy", "nll", "nll-exact", "true-loss", "self-entropy")
NEEDS_SURROGATE = frozenset({"cross-entropy", "entropy", "nll", "nll-exact"})
ESTIMATORS = ("lure", "is", "mean", "ase")

# The reference's clip for each acquisition when the user gives none (spec §1.2): the surrogate
# acquisitions use 0.1 (the paper's alpha), uniform and the oracle 0, self-entropy 0.01.
REFERENCE_CLIP = {"iid": 0.0, "cross-entropy": 0.1, "entropy": 0.1, "nll": 0.1, "nll-exact": 0.1,
                  "true-loss": 0.0, "self-entropy": 0.01}


def softmax_clamp(logits: np.ndarray, temperature: float | None = None, eps: float = EPS) -> np.ndarray:
    """The reference's `metrics.softmax_clamp` (spec §1.5), copied on purpose: exp WITHOUT max
    subtraction, clipped to [eps, 1/eps], so logits above ln(1/eps) ~ 34.5 saturate. Only
    acquisition scores use it; the loss uses `log_softmax`."""
    logits = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if temperature is None:
            e = np.clip(np.exp(logits), eps, 1 / eps)
            return e / e.sum(axis=1, keepdims=True)
        e = np.clip(np.exp(logits / temperature), eps, 1 / eps)
        e[np.isnan(e)] = 1 / eps
        p = np.clip(e / e.sum(axis=1, keepdims=True), eps, 1 / eps)
        p[np.isnan(p)] = 1 / eps
        return p


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """l_i = -log softmax(z_i)[y_i] over the K label-token logits (spec §1.1, §2.3)."""
    labels = np.asarray(labels, dtype=np.int64)
    return -np.take_along_axis(log_softmax(logits), labels[:, None], axis=1)[:, 0]


def mean_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """The risk of a model on a labelled subset: its mean log loss (the "true risk" on `test`)."""
    return float(per_example_loss(logits, labels).mean())


def _entropy_loss(predictions, surrogate_predictions=None, any_temperature=False):
    # The tail of the reference's `metrics.entropy_loss`: -sum(surrogate * log(predictions)), and
    # when a temperature was given, NaN scores become the largest finite score.
    if surrogate_predictions is None:
        surrogate_predictions = predictions
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = -(surrogate_predictions * np.log(predictions)).sum(axis=1)
    if any_temperature and np.isnan(scores).any():
        scores[np.isnan(scores)] = np.max(scores[~np.isnan(scores)])
    return scores


def acquisition_scores(acquisition: str, target_logits: np.ndarray | None,
                       surrogate_logits: np.ndarray | None, labels: np.ndarray, *,
                       temperature: float | None = None, eps: float = EPS) -> np.ndarray:
    """Raw acquisition scores w_i >= 0 for every pool row (spec §2.1), float64 [N].

    `temperature` divides the surrogate's logits only (for `self-entropy`, where the target is its
    own surrogate, the target's). `nll` is the reference's label-smoothed form: the target
    distribution is softmax(one_hot(y)), i.e. e/(e+K-1) on y; `nll-exact` is -log pi(y).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    tempered = temperature is not None
    if acquisition == "iid":
        return np.ones(n)
    if acquisition == "cross-entropy":
        return _entropy_loss(softmax_clamp(target_logits, None, eps),
                             softmax_clamp(surrogate_logits, temperature, eps), tempered)
    if acquisition == "entropy":
        return _entropy_loss(softmax_clamp(surrogate_logits, temperature, eps), None, tempered)
    if acquisition in ("nll", "nll-exact"):
        k = np.asarray(surrogate_logits).shape[1]
        one_hot = np.eye(k)[labels]
        target = softmax_clamp(one_hot, None, eps) if acquisition == "nll" else one_hot
        return _entropy_loss(softmax_clamp(surrogate_logits, temperature, eps), target, tempered)
    if acquisition == "true-loss":
        # the reference's oracle: a stable softmax, then the clamp, then -log p(y)
        p = np.clip(np.exp(log_softmax(target_logits)), eps, 1 / eps)
        return -np.log(p[np.arange(n), labels])
    if acquisition == "self-entropy":
        return _entropy_loss(softmax_clamp(target_logits, temperature, eps), None, tempered)
    raise ValueError(f"unknown acquisition {acquisition!r}; expected one of {ACQUISITIONS}")


def nonnegative(scores: np.ndarray) -> np.ndarray:
    """Shift scores so the smallest is 0 if any is negative. The reference writes `+= min` (a sign
    bug, spec §9 #3); its scores are never negative, so the fixed form changes no result."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores - scores.min() if (scores < 0).any() else scores


def proposal_pmf(remaining_scores: np.ndarray, clip: float) -> np.ndarray:
    """The proposal over the remaining pool (spec §1.2, the reference's `get_pmf_distr`):
    p = w / sum(w); q = max(p, clip / n_remaining); q /= sum(q).

    When every remaining score is 0 and clip is 0 the reference divides by zero; here the draw is
    uniform over the remaining points instead.
    """
    w = nonnegative(remaining_scores)
    total = w.sum()
    if total == 0 and clip == 0:
        return np.full(len(w), 1.0 / len(w))
    if total != 0:
        w = w / total
    w = np.maximum(clip / len(w), w)
    return w / w.sum()


def lure_weights(q: np.ndarray, pool_size: int) -> np.ndarray:
    """LURE weights v_m for M acquired points drawn with probabilities q_1..q_M (spec §1.1):
    v_m = 1 + (N-M)/(N-m) * (1/((N-m+1) q_m) - 1), and v = 1 when M = N."""
    q = np.asarray(q, dtype=np.float64)
    big_m, n = len(q), pool_size
    if big_m == n:
        return np.ones(big_m)
    m = np.arange(1, big_m + 1)
    return 1 + (n - big_m) / (n - m) * (1 / ((n - m + 1) * q) - 1)


def lure_estimate(losses: np.ndarray, q: np.ndarray, pool_size: int) -> float:
    """R_LURE = mean_m v_m l_m, the direct O(M) formula (the reference recomputes it every step)."""
    return float(np.mean(lure_weights(q, pool_size) * np.asarray(losses, dtype=np.float64)))


def importance_estimate(losses: np.ndarray, q: np.ndarray, pool_size: int) -> float:
    """The reference's `ISEstimator`: mean_m l_m / (N q_m), no without-replacement correction."""
    return float(np.mean(np.asarray(losses, np.float64) / (pool_size * np.asarray(q, np.float64))))


def ase_estimate(target_logits: np.ndarray, surrogate_logits: np.ndarray,
                 temperature: float | None = None) -> float:
    """Zero-shot ASE (spec §5): mean over the pool of E_{pi(y|x)}[-log p_target(y|x)], with stable
    softmaxes (the reference uses torch softmax here, no clamp). Needs no labels."""
    z_s = np.asarray(surrogate_logits, np.float64)
    pi = np.exp(log_softmax(z_s if temperature is None else z_s / temperature))
    return float(-(pi * log_softmax(target_logits)).sum(axis=1).mean())


def estimate_from_draws(estimator: str, losses: np.ndarray, q: np.ndarray, pool_size: int) -> np.ndarray:
    """Per-step estimates [M] of one run from its drawn losses and probabilities, each step by the
    direct formula (O(M^2) in all, as the reference)."""
    fn = {"lure": lure_estimate, "is": importance_estimate,
          "mean": lambda loss, q_, n: float(np.mean(loss))}[estimator]
    return np.array([fn(losses[:m], q[:m], pool_size) for m in range(1, len(q) + 1)])


def reference_draws(scores: np.ndarray, size: int, clip: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One acquisition run exactly as the reference loop (spec §1.3): at each step the proposal over
    the remaining pool, one categorical draw, removal. Returns (pool indices [size], q [size])."""
    n = len(scores)
    remaining = np.ones(n, dtype=bool)
    indices = np.empty(size, dtype=np.int64)
    q = np.empty(size)
    for m in range(size):
        remaining_idx = np.flatnonzero(remaining)
        pmf = proposal_pmf(scores[remaining_idx], clip)
        j = rng.multinomial(1, pmf).argmax()
        indices[m] = remaining_idx[j]
        q[m] = pmf[j]
        remaining[indices[m]] = False
    return indices, q


def reference_sweep(scores: np.ndarray, losses: np.ndarray, *, runs: int, size: int, clip: float,
                    estimator: str = "lure", seed: int = 0) -> np.ndarray:
    """The reference's whole sweep, one run at a time: estimates [size, runs] (slow; for checks and
    as the benchmark's plain alternative)."""
    rng = np.random.default_rng(seed)
    out = np.empty((size, runs))
    for r in range(runs):
        idx, q = reference_draws(scores, size, clip, rng)
        out[:, r] = estimate_from_draws(estimator, losses[idx], q, len(scores))
    return out


def label_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and mean cross-entropy over the K label logits (spec 2.3), computed in float64."""
    z = np.asarray(logits, np.float64)
    log_probs = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    losses = -log_probs[np.arange(len(labels)), labels]
    predicted = np.argmax(z, axis=1)
    k = z.shape[1]
    return {"n": int(len(labels)), "accuracy": float(np.mean(predicted == labels)),
            "cross_entropy": float(np.mean(losses)),
            "label_counts": np.bincount(labels, minlength=k).tolist(),
            "predicted_counts": np.bincount(predicted, minlength=k).tolist()}
