"""A probe on the target's own activations as the surrogate of active testing.

The in-context surrogate spends n labelled examples (the paper's 50) on its prompt. The same n
labels can train a K-way logistic probe on the target's residual stream instead, read in the
same forward pass as the target's logits (`evaluate --activations`):

  * `choose_layer`: for every hook point and L2 strength, F-fold cross-validated log-loss of a
    logistic probe trained on the labelled examples (layers x strengths x folds in one vmapped
    program); the best pair wins (a weak penalty gives an overconfident surrogate);
  * `probe_logits`: the probe refitted on all examples at that layer, applied to the pool: the
    surrogate's class logits [N, K], used by any acquisition exactly as an evaluated surrogate's;
  * `adaptive_sweep` (`--refit-every R`): many runs (vmapped over per-run keys) in which the probe
    is refitted every R acquired labels on the examples plus the labels acquired so far, and the
    acquisition scores recomputed. A segment of R steps uses a proposal fixed at its start, so
    every draw's proposal depends only on labels acquired BEFORE it, and LURE stays unbiased
    (tested by exact enumeration on a tiny pool).

The probe: features standardised with the training rows' weighted mean and deviation, weights and
bias from `steps` Adam steps (lr 0.05) on mean cross-entropy + l2 / 2 ||W||^2 (convex: from zero
weights it converges to the one optimum; a fixed step count keeps it one compiled program).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxprobe.errors import UserError

DEFAULT_L2 = 1e-2
L2_GRID = (1e-2, 1e-1, 1.0, 10.0)  # cross-validated with the layer: 50 examples in ~600 dimensions overfit
DEFAULT_STEPS = 300
DEFAULT_FOLDS = 5


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def _fit(x, y, w, *, k, l2, steps):
    """(W [D, K], b [K], mu [D], sd [D]) of the probe on rows x [n, D] with labels y [n] and row
    weights w [n] (0 leaves a row out)."""
    jax, jnp = _jax()
    import optax

    total = jnp.maximum(w.sum(), 1.0)
    mu = (w[:, None] * x).sum(0) / total
    sd = jnp.sqrt((w[:, None] * (x - mu) ** 2).sum(0) / total) + 1e-6
    z = (x - mu) / sd
    one_hot = jax.nn.one_hot(y, k)

    def loss(params):
        logits = z @ params[0] + params[1]
        ce = -(one_hot * jax.nn.log_softmax(logits)).sum(-1)
        return (w * ce).sum() / total + 0.5 * l2 * jnp.sum(params[0] ** 2)

    opt = optax.adam(0.05)
    params = (jnp.zeros((x.shape[1], k), x.dtype), jnp.zeros((k,), x.dtype))

    def step(_, carry):
        p, s = carry
        grads = jax.grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
    return params[0], params[1], mu, sd


def _predict(fitted, x):
    w, b, mu, sd = fitted
    return ((x - mu) / sd) @ w + b


@functools.cache
def _cv_program():
    jax, jnp = _jax()

    @functools.partial(jax.jit, static_argnames=("k", "steps"))
    def cv(features, labels, fold_of, n_folds_arr, l2_grid, *, k, steps):
        # features [L, n, D]; per layer, strength and fold: train on the other folds, log-loss on this one
        def one(x, f, l2):
            train = (fold_of != f).astype(x.dtype)
            fitted = _fit(x, labels, train, k=k, l2=l2, steps=steps)
            logp = jax.nn.log_softmax(_predict(fitted, x))
            held = 1.0 - train
            ce = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
            return (held * ce).sum(), held.sum()

        per_fold = lambda x, l2: jax.vmap(lambda f: one(x, f, l2))(n_folds_arr)
        loss, count = jax.vmap(lambda x: jax.vmap(lambda l2: per_fold(x, l2))(l2_grid))(features)
        return loss.sum(-1) / count.sum(-1)  # [L, G] mean held-out log-loss

    return cv


def choose_layer(features: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = DEFAULT_FOLDS,
                 seed: int = 0, l2_grid=L2_GRID, steps: int = DEFAULT_STEPS) -> tuple[int, float, np.ndarray]:
    """(best hook point, its best L2 strength, held-out log-loss [L, len(l2_grid)]) by
    `folds`-fold cross-validation on labelled examples `features` [n, L, D] (class-stratified
    folds, seeded)."""
    _, jnp = _jax()
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    folds = min(folds, n)
    if n < 2 or folds < 2:
        raise UserError(f"a probe surrogate needs at least 2 labelled examples, got {n}")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)])
    fold_of = np.empty(n, np.int32)
    fold_of[order] = np.arange(n) % folds  # each class dealt round the folds
    losses = _cv_program()(jnp.asarray(features.transpose(1, 0, 2)), jnp.asarray(labels, jnp.int32),
                           jnp.asarray(fold_of), jnp.arange(folds, dtype=jnp.int32),
                           jnp.asarray(l2_grid, jnp.float32), k=n_classes, steps=steps)
    losses = np.asarray(losses, np.float64)
    layer, strength = np.unravel_index(int(np.argmin(losses)), losses.shape)
    return int(layer), float(l2_grid[strength]), losses


def probe_logits(example_features: np.ndarray, example_labels: np.ndarray, pool_features: np.ndarray,
                 n_classes: int, *, l2: float = DEFAULT_L2, steps: int = DEFAULT_STEPS) -> np.ndarray:
    """The probe trained on all examples [n, D] (one layer), its logits on the pool [N, D] -> [N, K]."""
    jax, jnp = _jax()
    x = jnp.asarray(example_features, jnp.float32)
    fit = jax.jit(functools.partial(_fit, k=n_classes, l2=l2, steps=steps))
    fitted = fit(x, jnp.asarray(example_labels, jnp.int32), jnp.ones(len(example_labels), jnp.float32))
    return np.asarray(_predict(fitted, jnp.asarray(pool_features, jnp.float32)), np.float64)


# ---------------------------------------------------------------- refits inside the sweep

def _ce_scores(target_log_probs, surrogate_logits):
    # the paper's cross-entropy acquisition, E_surrogate[-log p_target] (stable softmaxes)
    jax, _ = _jax()
    return -(jax.nn.softmax(surrogate_logits) * target_log_probs).sum(-1)


def proposal(scores, remaining, clip):
    """The clipped proposal over the remaining items (spec section 1.2) as a [N] vector, zero on
    drawn items: p = w / sum(w), q = max(p, clip / n_left), renormalised."""
    _, jnp = _jax()
    n_left = remaining.sum()
    w = jnp.where(remaining, jnp.maximum(scores, 0.0), 0.0)
    total = w.sum()
    p = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), remaining / n_left)
    q = jnp.where(remaining, jnp.maximum(p, clip / n_left), 0.0)
    return q / q.sum()


def refit_scores(state_acquired, pool_x, pool_labels, ex_x, ex_y, target_log_probs, *, k, l2, steps):
    """Acquisition scores [N] from a probe fitted on the examples plus the pool items acquired
    (`state_acquired` [N] bool): the labels it sees are exactly those acquired so far."""
    _, jnp = _jax()
    x = jnp.concatenate([ex_x, pool_x])
    y = jnp.concatenate([ex_y, pool_labels])
    w = jnp.concatenate([jnp.ones(ex_x.shape[0], pool_x.dtype), state_acquired.astype(pool_x.dtype)])
    fitted = _fit(x, y, w, k=k, l2=l2, steps=steps)
    return _ce_scores(target_log_probs, _predict(fitted, pool_x))


@functools.cache
def _adaptive_program():
    jax, jnp = _jax()

    @functools.partial(jax.jit, static_argnames=("size", "refit_every", "k", "l2", "steps"))
    def run(uniforms, pool_x, pool_labels, ex_x, ex_y, target_log_probs, losses, clip, *, size, refit_every,
            k, l2, steps):
        n = pool_x.shape[0]
        rescore = functools.partial(refit_scores, pool_x=pool_x, pool_labels=pool_labels, ex_x=ex_x, ex_y=ex_y,
                                    target_log_probs=target_log_probs, k=k, l2=l2, steps=steps)

        def one_run(u):
            def segment(carry, u_seg):
                remaining, sums = carry
                scores = rescore(~remaining)  # refit on what was acquired before this segment

                def draw(carry, um):
                    remaining, (count, sum_loss, sum_lure) = carry
                    q = proposal(scores, remaining, clip)
                    i = jnp.minimum(jnp.searchsorted(jnp.cumsum(q), um * q.sum(), side="right"), n - 1)
                    i = jnp.where(remaining[i], i, jnp.argmax(remaining))  # rounding at the CDF's end
                    n_left = remaining.sum()
                    loss = losses[i]
                    sum_lure = sum_lure + jnp.where(n_left > 1, (1.0 / (n_left * q[i]) - 1.0) * loss
                                                    / jnp.maximum(n_left - 1, 1), 0.0)
                    count, sum_loss = count + 1, sum_loss + loss
                    est = (sum_loss + (n - count) * sum_lure) / count  # LURE, spec 1.1's running sums
                    return (remaining.at[i].set(False), (count, sum_loss, sum_lure)), (est, i, q[i])

                return jax.lax.scan(draw, (remaining, sums), u_seg)

            zero = jnp.zeros((), losses.dtype)
            init = (jnp.ones(n, bool), (jnp.zeros((), jnp.int32), zero, zero))
            _, out = jax.lax.scan(segment, init, u.reshape(size // refit_every, refit_every))
            return jax.tree.map(lambda a: a.reshape(size), out)

        return jax.vmap(one_run)(uniforms)

    return run


def adaptive_sweep(target_logits, labels, pool_features, example_features, example_labels, *, runs: int,
                   size: int, refit_every: int, clip: float = 0.1, seed: int = 0, l2: float = DEFAULT_L2,
                   steps: int = DEFAULT_STEPS, uniforms: np.ndarray | None = None):
    """Cross-entropy acquisition with a probe surrogate refitted every `refit_every` labels:
    (LURE estimates [runs, size], drawn rows [runs, size], q [runs, size]); `size` must be a
    multiple of `refit_every`. Features: pool [N, D] and examples [n, D] at the chosen layer."""
    jax, jnp = _jax()
    if refit_every < 1 or size % refit_every:
        raise UserError(f"--refit-every {refit_every} must divide --size {size}")
    labels = np.asarray(labels, np.int64)
    z = np.asarray(target_logits, np.float64)
    log_p = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
    losses = -log_p[np.arange(len(labels)), labels]
    with jax.enable_x64(True):
        if uniforms is None:
            from jaxprobe.active.sampler import stream_key

            key = stream_key(seed, f"probe-refit/{refit_every}")
            uniforms = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (size,), jnp.float64))(
                jnp.arange(runs))
        out = _adaptive_program()(
            jnp.asarray(uniforms, jnp.float64), jnp.asarray(pool_features, jnp.float64), jnp.asarray(labels),
            jnp.asarray(example_features, jnp.float64), jnp.asarray(example_labels, jnp.int64),
            jnp.asarray(log_p), jnp.asarray(losses), jnp.asarray(clip, jnp.float64), size=size,
            refit_every=refit_every, k=z.shape[1], l2=l2, steps=steps)
        return tuple(np.asarray(a) for a in out)


# ---------------------------------------------------------------- from an evaluate folder

def load_probe_data(directory, *, flag: str = "--target"):
    """(pool activations [N, L+1, D] (memory-mapped), example activations [n, L+1, D], example
    labels [n]) of an evaluate folder written with `--activations N`."""
    from pathlib import Path

    from jaxprobe.files import load_npy

    directory = Path(directory)
    pool, examples = directory / "pool" / "activations.npy", directory / "examples"
    if not pool.is_file():
        raise UserError(f"{flag} {directory}: no pool/activations.npy; a probe surrogate needs the target "
                        "evaluated with --activations N (N labelled examples to train it on)")
    if not (examples / "activations.npy").is_file():
        raise UserError(f"{flag} {directory}: no examples/ subset; evaluate with --activations N, N > 0")
    return (load_npy(pool, mmap=True), load_npy(examples / "activations.npy"),
            load_npy(examples / "labels.npy").astype(np.int64))


def probe_surrogate(target, *, folds: int = DEFAULT_FOLDS, seed: int = 0, steps: int = DEFAULT_STEPS,
                    flag: str = "--target"):
    """The probe surrogate of an evaluated target (`inputs.Evaluation` of its pool): an Evaluation
    of the same rows whose logits are the probe's, plus {layer, cv_log_loss, examples}."""
    import dataclasses

    pool_acts, ex_acts, ex_y = load_probe_data(target.directory, flag=flag)
    if pool_acts.shape[0] != len(target.indices):
        raise UserError(f"{flag} {target.directory}: pool/activations.npy has {pool_acts.shape[0]} rows, "
                        f"logits.npy {len(target.indices)}")
    k = target.n_classes
    layer, l2, cv = choose_layer(ex_acts, ex_y, k, folds=folds, seed=seed, steps=steps)
    logits = probe_logits(ex_acts[:, layer], ex_y, np.asarray(pool_acts[:, layer]), k, l2=l2, steps=steps)
    info = {"layer": layer, "l2": l2, "cv_log_loss": [float(x) for x in cv.min(axis=1)], "examples": len(ex_y)}
    meta = {**target.meta, "icl": {"n": len(ex_y)}, "model": f"probe on {target.meta.get('model')}",
            "probe": info}
    return dataclasses.replace(target, directory=target.directory / "probe", logits=logits.astype(np.float32),
                               meta=meta, metrics={}), info


def refit_sweep(target, sweep, refit_every: int, *, chunk_runs: int = 64, progress: bool = False,
                steps: int = DEFAULT_STEPS) -> np.ndarray:
    """`acquire --surrogate probe --refit-every R`: estimates [size, runs] of cross-entropy
    acquisition with LURE, the probe (on the layer cross-validation picks from the examples)
    refitted every R labels inside each run; runs in chunks (run r's draws depend on r only)."""
    from tqdm.auto import tqdm

    pool_acts, ex_acts, ex_y = load_probe_data(target.directory)
    layer, l2, _ = choose_layer(ex_acts, ex_y, target.n_classes, steps=steps)
    pool_x, ex_x = np.asarray(pool_acts[:, layer]), ex_acts[:, layer]
    jax, jnp = _jax()
    from jaxprobe.active.sampler import stream_key

    key = stream_key(sweep.seed, f"probe-refit/{refit_every}")
    out = np.zeros((sweep.size, sweep.runs))
    for start in tqdm(range(0, sweep.runs, chunk_runs), desc="probe refits", unit="chunk", disable=not progress):
        stop = min(start + chunk_runs, sweep.runs)
        with jax.enable_x64(True):
            u = np.asarray(jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (sweep.size,),
                                                                 jnp.float64))(jnp.arange(start, stop)))
        est, _, _ = adaptive_sweep(target.logits, target.labels, pool_x, ex_x, ex_y, runs=stop - start,
                                   size=sweep.size, refit_every=refit_every, clip=sweep.resolved_clip, l2=l2,
                                   steps=steps, uniforms=u)
        out[:, start:stop] = est.T
    return out
