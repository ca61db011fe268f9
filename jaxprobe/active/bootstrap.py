"""The single-run bootstrap estimate of an active-testing estimate's error, and how often its
interval covers the truth, over many runs (spec section 3)."""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxprobe.active.sweep import LANE_BLOCK, SweepConfig, json_floats

BOOTSTRAP_VARIANCES = {"paper": 1, "reference": 0}  # ddof: the paper's 1/(B-1), the code's np.var


@functools.cache  # one jitted function per process (its compilations are cached on it)
def _bootstrap_fn():
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnames=("length", "resamples"))
    def variance(base_key, losses, q, budget, pool_size, ddof, estimator, *, length, resamples):
        # per run: the estimator's weights at `budget` labels, B resamples of that many points
        # with replacement, the variance of the resampled weighted means (spec §3)
        m = jnp.arange(1, length + 1)
        use = m <= budget
        c = 1.0 / ((pool_size - m + 1) * q) - 1.0
        lure = jnp.where(budget == pool_size, 1.0, 1.0 + (pool_size - budget) / jnp.maximum(pool_size - m, 1) * c)
        v = jnp.select([estimator == 0, estimator == 1], [lure, 1.0 / (q * pool_size)], jnp.ones_like(q))
        x = jnp.where(use, losses * v, 0.0)
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base_key, budget), r))(
            jnp.arange(losses.shape[0]))

        def one(key, x_run):
            if resamples == 0:  # the B -> infinity limit: population variance of x over K
                mu = jnp.sum(x_run) / budget
                return jnp.sum(jnp.where(use, (x_run - mu) ** 2, 0.0)) / budget / budget
            j = jnp.floor(jax.random.uniform(key, (resamples, length), jnp.float64) * budget)
            j = jnp.minimum(j.astype(jnp.int32), budget - 1)
            means = jnp.sum(jnp.where(use, x_run[j], 0.0), axis=1) / budget
            return jnp.sum((means - means.mean()) ** 2) / (resamples - ddof)

        return jax.vmap(one)(keys, x)

    return variance


def bootstrap_study(pool, config: SweepConfig, *, runs: int = 100, resamples: int = 1000,
                    variance: str = "paper", budgets=None, true_risk: float, progress: bool = True) -> dict:
    """The single-run bootstrap error estimate (spec §3) on the first `runs` runs of the sweep.

    Per budget K and run t: R_K,t (the run's estimate), Var_boot (B resamples of the K acquired
    points with their estimator weights; `variance` "paper" divides by B-1, "reference" by B as
    the reference's np.var; B = 0 gives the exact B -> infinity value). Reports, per budget,
    coverage = fraction of runs with |R_K,t - R| <= 2 sqrt(Var_boot) (against the true risk and
    the pool risk), the median of (Var_boot - (R_K,t - R)^2)^2, and mean Var_boot next to the
    actual mean squared error over the runs.
    """
    import jax
    from tqdm.auto import tqdm

    from jaxprobe.active.sampler import SAMPLED_ESTIMATORS, stream_key, sweep_chunk

    size, n = config.size, pool.size
    budgets = sorted({b for b in (budgets or [*range(25, size + 1, 25), size]) if 1 <= b <= size})
    width = LANE_BLOCK * math.ceil(runs / LANE_BLOCK)  # the sweep's chunk widths: the same bits
    est, rows, q = (a[:runs] for a in sweep_chunk(
        pool, stream_key(config.seed, config.acquisition), np.arange(width), size=size,
        clip=config.resolved_clip, estimator=config.estimator, record=True))
    losses = pool.sorted_losses[np.argsort(pool.order)][rows]  # pool row -> its loss
    fn = _bootstrap_fn()
    pool_risk = float(pool.sorted_losses.mean())
    var_boot = np.zeros((len(budgets), runs))
    base = stream_key(config.seed, "bootstrap/" + config.acquisition)
    estimator = SAMPLED_ESTIMATORS.index(config.estimator)
    with jax.enable_x64(True):
        for i, b in enumerate(tqdm(budgets, desc="bootstrap", unit="budget", disable=not progress)):
            length = min(size, 1 << max(0, b - 1).bit_length())  # padded length: few compiled shapes
            var_boot[i] = np.asarray(fn(base, losses[:, :length], q[:, :length], b, n,
                                        BOOTSTRAP_VARIANCES[variance], estimator, length=length,
                                        resamples=resamples))
    at_budget = est[:, np.asarray(budgets) - 1].T  # [budgets, runs]
    err2 = (at_budget - true_risk) ** 2
    half_width = 2 * np.sqrt(var_boot)
    return {
        "runs": runs, "resamples": resamples, "variance": variance, "ddof": BOOTSTRAP_VARIANCES[variance],
        "budgets": budgets,
        "coverage": json_floats(np.mean(np.abs(at_budget - true_risk) <= half_width, axis=1)),
        "coverage_of_pool_risk": json_floats(np.mean(np.abs(at_budget - pool_risk) <= half_width, axis=1)),
        "median_mse_estimation_error": json_floats(np.median((var_boot - err2) ** 2, axis=1)),
        "mean_bootstrap_variance": json_floats(var_boot.mean(axis=1)),
        "mean_squared_error_over_runs": json_floats(err2.mean(axis=1)),
        "arrays": {"variance": var_boot, "estimates": at_budget},
    }
