"""The exact sequential sampler of active testing, vectorised over runs: one jitted `lax.scan` over
acquisition steps, `vmap`ped over per-run PRNG keys.

At step m (0-based) with n = N - m points left, the reference's proposal (spec §1.2) is
    q(i) = max(w_i / S, f) / Z,    f = alpha / n,  S = remaining score mass,  Z = normaliser,
so it changes between steps through the removed points AND the floor f. Gumbel-top-k is therefore
not exact, and a [runs, N] mask updated in the scan copies N values per run per step. Instead the
pool is sorted by score once, and all that is kept per run is the sorted list of drawn positions P
and the prefix sums WD of their scores (at most `size` entries each). Then:
  * the floored points are a prefix of the sorted pool: t = #{w < f S}, one binary search;
  * the remaining mass before any sorted position k, for a k with j drawn points below it, is
        R(k, j) = f (min(k, t) - min(j, jt)) + max(C[k] - WD[j] - (C[t] - WD[jt]), 0) / S
    with C the shared cumulative sum of sorted scores and jt the number of drawn points below t;
  * a draw inverts that CDF: a binary search over the gaps between drawn points, then one over the
    shared C inside the chosen gap; inserting the new point shifts P and WD (O(size), in cache).
Everything is float64 (under `jax.enable_x64` inside this module only): the CDF is a difference of
large cumulative sums, and float32 would blur the probability of a low-score point at N = 10,000.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxprobe.active.estimators import nonnegative


def stream_key(seed: int, stream: str) -> jax.Array:
    """The key of a named stream of runs: run r of it uses `fold_in(stream_key, r)`, so a run's
    draws depend only on (seed, stream, r), never on how runs are chunked or resumed."""
    with jax.enable_x64(True):
        return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stream.encode()) & 0x7FFFFFFF)


def _bits(limit: int) -> int:
    # enough halvings for a search over 0..limit
    return max(1, int(limit).bit_length())


def _last_true(pred, start, limit, n_bits):
    """Largest c in [start, limit] with pred(c), for pred true at start and monotone (true, then
    false). Branch-free, `n_bits` gathers: safe under vmap. limit < start returns start."""
    pos = start
    for b in reversed(range(n_bits)):
        c = pos + (1 << b)
        ok = c <= limit
        pos = jnp.where(ok & pred(jnp.where(ok, c, pos)), c, pos)
    return pos


class PreparedPool:
    """The pool sorted by score, with everything the scan shares across runs (NumPy, float64)."""

    def __init__(self, scores: np.ndarray, losses: np.ndarray):
        scores = nonnegative(scores)
        self.order = np.argsort(scores, kind="stable")  # sorted position -> pool row
        self.sorted_scores = scores[self.order]
        self.cumsum = np.concatenate([[0.0], np.cumsum(self.sorted_scores)])
        self.sorted_losses = np.asarray(losses, np.float64)[self.order]
        self.n_zero = int(np.sum(self.sorted_scores == 0))
        self.size = len(scores)


def _run_one(key, sorted_scores, cumsum, sorted_losses, n_zero, clip, *, size, estimator, record):
    n_pool = sorted_scores.shape[0]
    total = cumsum[n_pool]
    uniforms = jax.random.uniform(key, (size,), dtype=jnp.float64)
    slots = jnp.arange(size, dtype=jnp.int32)
    bits_pool = _bits(n_pool)

    def shift_in(a, gap, value):  # insert `value` at slot `gap`, shifting later slots right by one
        shifted = jnp.concatenate([a[:1], a[:-1]])
        return jnp.where(slots < gap, a, jnp.where(slots == gap, value, shifted))

    def step(carry, xs):
        # Per drawn slot i (sorted by position): pos[i], cum_after[i] = scores of slots 0..i,
        # c_next[i] = C[pos[i] + 1]. Unused slots hold pos = N, so "pos < x" never counts them.
        pos, cum_after, c_next, n_zero_drawn, sum_loss, sum_is, sum_lure = carry
        m, u01 = xs
        n_left = n_pool - m
        used = slots < m
        drawn_mass = jnp.max(jnp.where(used, cum_after, 0.0))
        mass = total - drawn_mass
        # no remaining point has a positive score: draw uniformly (the reference divides by 0)
        uniform = ((n_pool - n_zero) - (m - n_zero_drawn) == 0) | (mass <= 0)
        floor = jnp.where(uniform, 1.0 / n_left, clip / n_left)
        inv_mass = jnp.where(uniform, 0.0, 1.0 / jnp.where(mass > 0, mass, 1.0))
        t = jnp.where(uniform, n_pool,
                      _last_true(lambda c: sorted_scores[c - 1] < floor * mass, 0, n_pool, bits_pool))
        below_t = pos < t
        jt = jnp.sum(below_t, dtype=jnp.int32)
        base = cumsum[t] - jnp.max(jnp.where(below_t, cum_after, 0.0))

        def remaining_mass_below(k, j, cum_k, drawn_cum_j):  # R(k, j) of the module docstring
            return (floor * (jnp.minimum(k, t) - jnp.minimum(j, jt))
                    + jnp.maximum(cum_k - drawn_cum_j - base, 0.0) * inv_mass)

        norm = remaining_mass_below(n_pool, m, total, drawn_mass)
        u = u01 * norm
        # the gap after drawn slot gap-1 that holds the draw: count the gap starts at or below u
        starts = remaining_mass_below(pos + 1, slots + 1, c_next, cum_after)
        gap = jnp.sum(used & (starts <= u), dtype=jnp.int32)
        before_gap = slots < gap
        lo = jnp.max(jnp.where(before_gap, pos, -1)) + 1
        hi = jnp.min(jnp.where(before_gap, n_pool, pos))
        drawn_cum_gap = jnp.max(jnp.where(before_gap, cum_after, 0.0))
        k = _last_true(lambda c: remaining_mass_below(c, gap, cumsum[c], drawn_cum_gap) <= u,
                       lo, hi - 1, bits_pool)
        # Rounding can make an empty gap look chosen (probability ~1e-16): take the first
        # remaining point after it instead, found by its rank among the remaining points.
        rank = jnp.minimum(lo - gap, n_left - 1)
        gap_r = jnp.sum(used & (pos - slots <= rank), dtype=jnp.int32)
        empty = lo >= hi
        gap = jnp.where(empty, gap_r, gap)
        k = jnp.where(empty, rank + gap_r, k)
        drawn_cum_gap = jnp.where(empty, jnp.max(jnp.where(slots < gap, cum_after, 0.0)), drawn_cum_gap)

        w = sorted_scores[k]
        q = jnp.where(uniform, floor, jnp.maximum(floor, w * inv_mass)) / norm
        pos = shift_in(pos, gap, k)
        cum_after = jnp.where(slots < gap, cum_after,
                              jnp.where(slots == gap, drawn_cum_gap, jnp.concatenate([cum_after[:1], cum_after[:-1]])) + w)
        c_next = shift_in(c_next, gap, cumsum[k + 1])
        n_zero_drawn = n_zero_drawn + (k < n_zero)

        loss = sorted_losses[k]
        sum_loss = sum_loss + loss
        sum_is = sum_is + loss / q
        # LURE by the cumulative-sum identity (spec §1.1): the term of step m+1 is c l / (N-m-1),
        # c = 1/(n q) - 1; with M = N the (N-M) factor is 0, so the last term is never needed.
        sum_lure = sum_lure + jnp.where(n_left > 1, (1.0 / (n_left * q) - 1.0) * loss
                                        / jnp.maximum(n_left - 1, 1), 0.0)
        count = m + 1
        if estimator == "lure":
            est = (sum_loss + (n_pool - count) * sum_lure) / count
        elif estimator == "is":
            est = sum_is / (n_pool * count)
        else:
            est = sum_loss / count
        out = (est, k, q) if record else est
        return (pos, cum_after, c_next, n_zero_drawn, sum_loss, sum_is, sum_lure), out

    zero = jnp.zeros((), jnp.float64)
    carry = (jnp.full((size,), n_pool, jnp.int32), jnp.zeros((size,), jnp.float64),
             jnp.zeros((size,), jnp.float64), jnp.zeros((), jnp.int32), zero, zero, zero)
    _, out = jax.lax.scan(step, carry, (jnp.arange(size, dtype=jnp.int32), uniforms))
    return out


@functools.partial(jax.jit, static_argnames=("size", "estimator", "record"))
def _sweep_chunk(base_key, run_indices, sorted_scores, cumsum, sorted_losses, n_zero, clip, *,
                 size, estimator, record):
    keys = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(run_indices)
    run = functools.partial(_run_one, size=size, estimator=estimator, record=record)
    return jax.vmap(run, in_axes=(0, None, None, None, None, None))(
        keys, sorted_scores, cumsum, sorted_losses, n_zero, clip)


def sweep_chunk(pool: PreparedPool, base_key: jax.Array, run_indices: np.ndarray, *, size: int,
                clip: float, estimator: str = "lure", record: bool = False):
    """Estimates [runs_in_chunk, size] float64 for the given run indices; with `record`, also the
    drawn pool rows [runs, size] and their proposal probabilities q [runs, size]."""
    with jax.enable_x64(True):
        out = _sweep_chunk(base_key, jnp.asarray(run_indices, jnp.int64),
                           jnp.asarray(pool.sorted_scores), jnp.asarray(pool.cumsum),
                           jnp.asarray(pool.sorted_losses), jnp.asarray(pool.n_zero, jnp.int64),
                           jnp.asarray(clip, jnp.float64), size=size, estimator=estimator,
                           record=record)
        out = jax.tree.map(np.asarray, out)
    if record:
        est, pos, q = out
        return est, pool.order[pos], q
    return out
