"""The exact sequential sampler of active testing, vectorised over runs: one jitted `lax.scan` over
acquisition steps, `vmap`ped over per-run PRNG keys.

At step m (0-based) with n = N - m points left, the reference's proposal (spec §1.2) is
    q(i) = max(w_i / S, f) / Z,    f = alpha / n,  S = remaining score mass,  Z = normaliser,
so it changes between steps through the removed points AND the floor f: Gumbel-top-k is not exact.
A [runs, N] remaining-mask updated inside the scan costs N per run and step (and XLA copies such a
carry when it is read before it is written), so the pool is sorted by score once, and each run
keeps only its drawn points: their sorted positions `drawn` and the running sum of their scores
`drawn_cum` (`size` entries each). Then, per step and run, in O(log N + log size) lookups:
  * the floored points are a prefix of the sorted pool: t = #{w < f S}, one binary search;
  * the remaining mass below sorted position k, with j drawn points below k, is
        R(k, j) = f (min(k, t) - min(j, jt)) + max(C[k] - drawn_cum[j] - (C[t] - drawn_cum[jt]), 0) / S
    (C: the shared cumulative sum of sorted scores; jt: drawn points below t), and Z = R(N, m);
  * a draw u ~ U(0, Z) inverts that CDF: a binary search over the gaps between drawn points, then
    one over C inside the chosen gap. Only the insertion into `drawn`/`drawn_cum` is O(size).
LURE comes from running sums (the cumulative-sum identity, spec §1.1), IS and the naive mean too.
Everything is float64 (under `jax.enable_x64`, inside this module only): the CDF is a difference of
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
    false). Branch-free, `n_bits` halvings (a rolled loop: small programs compile fast); safe
    under vmap. limit < start returns start."""
    def halve(i, pos):
        c = pos + jnp.left_shift(1, n_bits - 1 - i).astype(pos.dtype)
        ok = c <= limit
        return jnp.where(ok & pred(jnp.where(ok, c, pos)), c, pos)

    return jax.lax.fori_loop(0, n_bits, halve, jnp.asarray(start, jnp.int32))


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


def _shifted_right(values):
    # values[i - 1] at every i > 0 (entry 0 is never used)
    return jnp.concatenate([values[:1], values[:-1]])


SAMPLED_ESTIMATORS = ("lure", "is", "mean")  # an index into this is a traced argument: one compile


def _run_one(uniforms, sorted_scores, cumsum, sorted_losses, n_zero, clip, estimator, *, size, record):
    n_pool = sorted_scores.shape[0]
    total = cumsum[n_pool]
    slots = jnp.arange(size + 1, dtype=jnp.int32)
    bits_pool, bits_drawn = _bits(n_pool), _bits(size)

    def step(carry, xs):
        # drawn[i]: sorted position of the i-th drawn point in position order, n_pool when unused;
        # drawn_cum[i]: their scores summed over slots < i (so drawn_cum[m] is all drawn mass).
        drawn, drawn_cum, n_zero_drawn, sum_loss, sum_is, sum_lure = carry
        m, u01 = xs
        n_left = n_pool - m
        drawn_mass = drawn_cum[m]
        mass = total - drawn_mass
        # no remaining point has a positive score: draw uniformly (the reference divides by 0)
        uniform = ((n_pool - n_zero) - (m - n_zero_drawn) == 0) | (mass <= 0)
        floor = jnp.where(uniform, 1.0 / n_left, clip / n_left)
        inv_mass = jnp.where(uniform, 0.0, 1.0 / jnp.where(mass > 0, mass, 1.0))
        t = jnp.where(uniform, n_pool,
                      _last_true(lambda c: sorted_scores[c - 1] < floor * mass, 0, n_pool, bits_pool))
        jt = _last_true(lambda c: drawn[c - 1] < t, 0, m, bits_drawn)
        base = cumsum[t] - drawn_cum[jt]

        def remaining_mass_below(k, j):  # R(k, j) of the module docstring
            return (floor * (jnp.minimum(k, t) - jnp.minimum(j, jt))
                    + jnp.maximum(cumsum[k] - drawn_cum[j] - base, 0.0) * inv_mass)

        norm = remaining_mass_below(n_pool, m)
        u = u01 * norm
        # the gap after drawn slot gap-1 that holds the draw, then the point inside it
        gap = _last_true(lambda c: remaining_mass_below(drawn[c - 1] + 1, c) <= u, 0, m, bits_drawn)
        lo = jnp.where(gap > 0, drawn[jnp.maximum(gap - 1, 0)] + 1, 0)
        hi = drawn[gap]
        k = _last_true(lambda c: remaining_mass_below(c, gap) <= u, lo, hi - 1, bits_pool)
        # Rounding can make an empty gap look chosen (probability ~1e-16): take the first
        # remaining point after it instead, found by its rank among the remaining points.
        empty = lo >= hi
        rank = jnp.minimum(lo - gap, n_left - 1)
        gap_r = _last_true(lambda c: drawn[c - 1] - (c - 1) <= rank, 0, m, bits_drawn)
        gap = jnp.where(empty, gap_r, gap)
        k = jnp.where(empty, rank + gap_r, k)

        w = sorted_scores[k]
        q = jnp.where(uniform, floor, jnp.maximum(floor, w * inv_mass)) / norm
        # insert k at slot `gap`: later slots move right by one (the last, unused, falls off)
        tail = slots[:-1] > gap
        drawn = jnp.where(tail, _shifted_right(drawn), jnp.where(slots[:-1] == gap, k, drawn))
        drawn_cum = jnp.where(slots > gap, _shifted_right(drawn_cum) + w, drawn_cum)
        n_zero_drawn = n_zero_drawn + (k < n_zero)

        loss = sorted_losses[k]
        sum_loss = sum_loss + loss
        sum_is = sum_is + loss / q
        # LURE by the cumulative-sum identity (spec §1.1): the term of step m+1 is c l / (N-m-1),
        # c = 1/(n q) - 1; with M = N the (N-M) factor is 0, so the last term is never needed.
        sum_lure = sum_lure + jnp.where(n_left > 1, (1.0 / (n_left * q) - 1.0) * loss
                                        / jnp.maximum(n_left - 1, 1), 0.0)
        count = m + 1
        est = jnp.select([estimator == 0, estimator == 1],
                         [(sum_loss + (n_pool - count) * sum_lure) / count, sum_is / (n_pool * count)],
                         sum_loss / count)
        out = (est, k, q) if record else est
        return (drawn, drawn_cum, n_zero_drawn, sum_loss, sum_is, sum_lure), out

    zero = jnp.zeros((), jnp.float64)
    carry = (jnp.full((size,), n_pool, jnp.int32), jnp.zeros((size + 1,), jnp.float64),
             jnp.zeros((), jnp.int32), zero, zero, zero)
    _, out = jax.lax.scan(step, carry, (jnp.arange(size, dtype=jnp.int32), uniforms))
    return out


def _runs(uniforms, sorted_scores, cumsum, sorted_losses, n_zero, clip, estimator, *, record):
    run = functools.partial(_run_one, size=uniforms.shape[1], record=record)
    return jax.vmap(run, in_axes=(0,) + (None,) * 6)(
        uniforms, sorted_scores, cumsum, sorted_losses, n_zero, clip, estimator)


@functools.partial(jax.jit, static_argnames=("size", "record"))
def _sweep_chunk(base_key, run_indices, *pool_args, size, record):
    uniforms = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(base_key, r), (size,), jnp.float64))(
        run_indices)
    return _runs(uniforms, *pool_args, record=record)


def _pool_args(pool: PreparedPool, clip: float, estimator: str) -> tuple:
    return (jnp.asarray(pool.sorted_scores), jnp.asarray(pool.cumsum), jnp.asarray(pool.sorted_losses),
            jnp.asarray(pool.n_zero, jnp.int64), jnp.asarray(clip, jnp.float64),
            jnp.asarray(SAMPLED_ESTIMATORS.index(estimator), jnp.int32))


def _outputs(pool: PreparedPool, out, record: bool):
    out = jax.tree.map(np.asarray, out)
    if record:
        est, pos, q = out
        return est, pool.order[pos], q
    return out


def sweep_chunk(pool: PreparedPool, base_key: jax.Array, run_indices: np.ndarray, *, size: int,
                clip: float, estimator: str = "lure", record: bool = False):
    """Estimates [runs_in_chunk, size] float64 for the given run indices; with `record`, also the
    drawn pool rows [runs, size] and their proposal probabilities q [runs, size]."""
    with jax.enable_x64(True):
        out = _sweep_chunk(base_key, jnp.asarray(run_indices, jnp.int64), *_pool_args(pool, clip, estimator),
                           size=size, record=record)
        return _outputs(pool, out, record)


def sweep_with_uniforms(pool: PreparedPool, uniforms: np.ndarray, *, clip: float, estimator: str = "lure"):
    """(estimates, pool rows, q), each [runs, size], for given U(0, 1) draws [runs, size]: the same
    sampler as `sweep_chunk` with the randomness supplied (tests drive it to edge cases)."""
    with jax.enable_x64(True):
        out = jax.jit(_runs, static_argnames=("record",))(
            jnp.asarray(uniforms, jnp.float64), *_pool_args(pool, clip, estimator), record=True)
        return _outputs(pool, out, True)
