"""`jaxprobe acquire`: active-testing sweeps — many runs of sequential label acquisition, each giving
a risk estimate after every label — plus the single-run bootstrap error estimate and its coverage.

Pure-array API (what `jaxprobe active-experiment` calls):

    estimates = run_sweep(target_logits, surrogate_logits, labels, acquisition="cross-entropy",
                          estimator="lure", runs=3000, size=400, seed=0)   # float64 [size, runs]
    summary = summarise_sweep(estimates, true_risk, iid_estimates)         # JSON-ready dict

Runs are a `vmap` over per-run keys inside one jitted `lax.scan` over steps (`sampler.py`); run r
always uses `fold_in(key(seed, acquisition), r)`, so results do not depend on chunking, threads or
resumption. Chunks of runs go to Orbax checkpoints (`jaxprobe.ckpt.SweepCheckpoint`), and a killed
sweep resumes to the same bits.

Output folder of the command (`--out DIR`):
    estimates.npy       float64 [size, runs]: estimate after 1..size labels (the reference's layout)
    iid_estimates.npy   the uniform baseline's sweep, when computed here (`--iid auto`)
    summary.json        settings, true risk, per step the median and mean squared error over runs,
                        the relative error against iid, the table at 50/100/200/300/400 labels,
                        and the bootstrap study (`--bootstrap T`)
    bootstrap_variance.npy / bootstrap_estimates.npy   [budgets, T], with `--bootstrap`
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import math
import shutil
import time
from pathlib import Path

import numpy as np

from jaxprobe.active.estimators import (
    ACQUISITIONS, EPS, ESTIMATORS, NEEDS_SURROGATE, REFERENCE_CLIP, acquisition_scores, ase_estimate,
    mean_loss, per_example_loss)
from jaxprobe.errors import UserError
from jaxprobe.io import load_json, save_json, save_npy

SWEEP_FORMAT = "jaxprobe.acquire-sweep/1"
SUMMARY_FORMAT = "jaxprobe.acquire/1"
TABLE_BUDGETS = (50, 100, 200, 300, 400)
DEFAULT_CHUNK_RUNS = 256
LANE_BLOCK = 64  # chunk widths are multiples of this (see _chunks)
BOOTSTRAP_VARIANCES = {"paper": 1, "reference": 0}  # ddof: the paper's 1/(B-1), the code's np.var


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What decides a sweep's numbers (a resumed sweep must agree on all of it)."""

    acquisition: str = "cross-entropy"
    estimator: str = "lure"
    runs: int = 3000
    size: int = 400
    seed: int = 0
    clip: float | None = None  # None: the reference's clip for this acquisition (REFERENCE_CLIP)
    temperature: float | None = None  # divides the surrogate's logits in the acquisition score
    eps: float = EPS

    @property
    def resolved_clip(self) -> float:
        return REFERENCE_CLIP[self.acquisition] if self.clip is None else float(self.clip)

    def check(self, pool_size: int) -> None:
        if self.acquisition not in ACQUISITIONS:
            raise UserError(f"--acquisition {self.acquisition!r}: choose from {', '.join(ACQUISITIONS)}")
        if self.estimator not in ESTIMATORS:
            raise UserError(f"--estimator {self.estimator!r}: choose from {', '.join(ESTIMATORS)}")
        if self.runs < 1:
            raise UserError(f"--runs must be at least 1, not {self.runs}")
        if self.size < 1:
            raise UserError(f"--size must be at least 1, not {self.size}")
        if self.size > pool_size:
            raise UserError(f"--size {self.size} is larger than the pool ({pool_size} rows)")
        if not 0 <= self.resolved_clip < 1:
            raise UserError(f"--clip must be in [0, 1), not {self.clip}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserError(f"--temperature must be a positive number, not {self.temperature}")


def check_pool_arrays(target_logits, surrogate_logits, labels, *, names=("target logits", "surrogate logits",
                                                                         "labels")) -> int:
    """Shapes, finiteness and label range of the pool arrays; returns N. Errors name the array."""
    labels = np.asarray(labels)
    n, k = None, None
    for logits, name in ((target_logits, names[0]), (surrogate_logits, names[1])):
        if logits is None:
            continue
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise UserError(f"{name}: expected [N, K>=2] logits, got shape {logits.shape}")
        if n is not None and logits.shape != (n, k):
            raise UserError(f"{name}: shape {logits.shape} differs from {names[0]} {(n, k)} "
                            f"(different pool or number of classes K)")
        n, k = logits.shape
        bad = np.flatnonzero(~np.isfinite(logits).all(axis=1))
        if bad.size:
            raise UserError(f"{name}: row {bad[0]} has a NaN or infinite logit")
    if n is None:
        raise UserError("no logits given: the target's are needed for the loss")
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise UserError(f"{names[2]}: expected {n} integer labels, got {labels.dtype} {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= k))
    if bad.size:
        raise UserError(f"{names[2]}: row {bad[0]} has label {labels[bad[0]]}, outside 0..{k - 1}")
    return n


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, np.float64).tobytes())
    return h.hexdigest()[:16]


def _chunks(start: int, stop: int, chunk_runs: int) -> list[tuple[int, int]]:
    # Equal chunks of a width that is a multiple of LANE_BLOCK: XLA's vectorised code gives every
    # run the same bits at such widths (narrower batches take other code paths, 1 ulp apart), so
    # results do not depend on chunking or on where a resumed sweep restarts.
    n_chunks = max(1, math.ceil((stop - start) / chunk_runs))
    width = LANE_BLOCK * math.ceil((stop - start) / n_chunks / LANE_BLOCK)
    return [(a, min(a + width, stop)) for a in range(start, stop, width)]


def _sweep_pool(pool, config: SweepConfig, *, checkpoint_dir, chunk_runs: int, threads: int,
                progress: bool, true_risk: float | None, checkpoint_every_s: float, desc: str,
                log=None) -> np.ndarray:
    """estimates [size, runs] of the sampler over `pool`, in resumable chunks of runs."""
    from tqdm.auto import tqdm

    from jaxprobe.active.sampler import stream_key, sweep_chunk

    size, runs = config.size, config.runs
    meta = {"format": SWEEP_FORMAT, "config": dataclasses.asdict(config), "clip": config.resolved_clip,
            "pool_size": pool.size, "data": _fingerprint(pool.sorted_scores, pool.sorted_losses)}
    estimates = np.zeros((size, runs))
    done = 0
    ckpt = None
    if checkpoint_dir is not None:
        from jaxprobe.ckpt import SweepCheckpoint

        ckpt = SweepCheckpoint(checkpoint_dir)
        step = ckpt.latest_step()
        if step is not None:
            saved = ckpt.restore_meta(step)
            saved_meta = {k: v for k, v in saved.items() if k != "runs_done"}
            if saved_meta != meta:
                diff = [k for k in meta if saved_meta.get(k) != meta[k]]
                if "config" in diff:
                    diff = [f"config.{k}" for k in meta["config"] if saved["config"].get(k) != meta["config"][k]]
                raise UserError(f"checkpoint {checkpoint_dir} belongs to another sweep ({', '.join(diff)} "
                                f"differ); use a new output folder")
            state, _ = ckpt.restore(step, {"estimates": np.zeros((size, step))})
            estimates[:, :step] = state["estimates"]
            done = step
            if log is not None:
                log(f"{desc}: resuming after run {done} of {runs} from {checkpoint_dir}")
    key = stream_key(config.seed, config.acquisition)
    chunks = _chunks(done, runs, chunk_runs)
    width = LANE_BLOCK * math.ceil((chunks[0][1] - chunks[0][0]) / LANE_BLOCK) if chunks else 0

    def work(bounds):
        a, b = bounds
        idx = np.arange(a, a + width)  # padded to one shape; the extra runs are dropped
        return sweep_chunk(pool, key, idx, size=size, clip=config.resolved_clip,
                           estimator=config.estimator)[: b - a]

    last_save = time.monotonic()
    with tqdm(total=runs, initial=done, desc=desc, unit="run", disable=not progress) as bar, \
            concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool_exec:
        futures = []
        for i, bounds in enumerate(chunks):
            futures.append(pool_exec.submit(work, bounds))
            if i == 0:
                futures[0].result()  # compile once before the other threads start
        for (a, b), fut in zip(chunks, futures):
            estimates[:, a:b] = fut.result().T
            bar.update(b - a)
            if true_risk is not None:
                bar.set_postfix(median_se_last=f"{np.median((estimates[-1, :b] - true_risk) ** 2):.3g}")
            if ckpt is not None and b < runs and time.monotonic() - last_save >= checkpoint_every_s:
                ckpt.save(b, {"estimates": estimates[:, :b]}, {**meta, "runs_done": b})
                last_save = time.monotonic()
    if ckpt is not None:
        ckpt.close()
    return estimates


def prepare_pool(target_logits, surrogate_logits, labels, config: SweepConfig):
    """The sampler's view of the pool: scores of `config.acquisition`, target losses, sorted."""
    from jaxprobe.active.sampler import PreparedPool

    scores = acquisition_scores(config.acquisition, target_logits, surrogate_logits, labels,
                                temperature=config.temperature, eps=config.eps)
    return PreparedPool(scores, per_example_loss(target_logits, labels))


def run_sweep(target_logits, surrogate_logits, labels, *, acquisition: str = "cross-entropy",
              estimator: str = "lure", runs: int = 3000, size: int = 400, seed: int = 0,
              clip: float | None = 0.1, temperature: float | None = None, true_risk: float | None = None,
              checkpoint_dir=None, chunk_runs: int = DEFAULT_CHUNK_RUNS, threads: int = 2,
              progress: bool = True, checkpoint_every_s: float = 30.0) -> np.ndarray:
    """Risk estimates float64 [size, runs]: row m is every run's estimate after m+1 labels.

    `clip` None takes the reference's clip for the acquisition (0.1 for the surrogate ones, 0 for
    iid and true-loss, 0.01 for self-entropy). `true_risk` only feeds the progress bar.
    `estimator="ase"` needs no sampling: the zero-shot surrogate estimate, the same in every cell.
    With `checkpoint_dir`, chunks of runs are saved there (at most every `checkpoint_every_s`
    seconds) and a rerun resumes from the last one.
    """
    config = SweepConfig(acquisition, estimator, runs, size, seed, clip, temperature)
    needs_surrogate = acquisition in NEEDS_SURROGATE or estimator == "ase"
    if needs_surrogate and surrogate_logits is None:
        raise UserError(f"--acquisition {acquisition} with --estimator {estimator} needs surrogate logits")
    n = check_pool_arrays(target_logits, surrogate_logits if needs_surrogate else None, labels)
    config.check(n)
    if estimator == "ase":
        return np.full((size, runs), ase_estimate(target_logits, surrogate_logits, temperature))
    pool = prepare_pool(target_logits, surrogate_logits, labels, config)
    return _sweep_pool(pool, config, checkpoint_dir=checkpoint_dir, chunk_runs=chunk_runs, threads=threads,
                       progress=progress, true_risk=true_risk, checkpoint_every_s=checkpoint_every_s,
                       desc=f"{acquisition}/{estimator}")


# ------------------------------------------------------------------------------------ summaries


def _json_floats(values) -> list:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64)]


def relative_error(active_median_se: np.ndarray, iid_median_se: np.ndarray, offset: int = 0) -> np.ndarray:
    """MedSE_active[k] / MedSE_iid[offset + k] for every k with both defined (the paper's relative
    error; `offset` > 0 is its rule for a zero-shot target with an offset-shot surrogate: k active
    labels are compared with offset + k uniform ones)."""
    n = min(len(active_median_se), len(iid_median_se) - offset)
    if n <= 0:
        return np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return active_median_se[:n] / iid_median_se[offset: offset + n]


def summarise_sweep(estimates: np.ndarray, true_risk: float, iid_estimates: np.ndarray | None = None, *,
                    offset: int = 0, budgets=TABLE_BUDGETS) -> dict:
    """Per step (1..size labels): median and mean squared error over runs, and with an iid sweep the
    relative error (median SE ratio, and mean SE ratio); plus the table at `budgets` labels (those
    within the sweep, and its last step)."""
    se = (np.asarray(estimates, np.float64) - true_risk) ** 2
    med, mean = np.median(se, axis=1), se.mean(axis=1)
    out = {"true_risk": float(true_risk), "labels": list(range(1, len(se) + 1)),
           "median_squared_error": _json_floats(med), "mean_squared_error": _json_floats(mean),
           "mean_estimate": _json_floats(np.mean(estimates, axis=1)), "relative_error": None,
           "relative_mean_squared_error": None, "iid_offset": offset}
    rel = None
    if iid_estimates is not None:
        iid_se = (np.asarray(iid_estimates, np.float64) - true_risk) ** 2
        rel = relative_error(med, np.median(iid_se, axis=1), offset)
        out["relative_error"] = _json_floats(rel)
        out["relative_mean_squared_error"] = _json_floats(relative_error(mean, iid_se.mean(axis=1), offset))
        finite = rel[np.isfinite(rel)]
        out["median_relative_error"] = float(np.median(finite)) if finite.size else None
        out["fraction_of_steps_better_than_iid"] = float(np.mean(finite < 1)) if finite.size else None
    out["table"] = [{"labels": b, "median_squared_error_x1e4": float(med[b - 1] * 1e4),
                     "relative_error": (None if rel is None or b > len(rel) or not np.isfinite(rel[b - 1])
                                        else float(rel[b - 1]))}
                    for b in sorted({*(b for b in budgets if b <= len(med)), len(med)})]
    return out


# ------------------------------------------------------------------------------------ bootstrap


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
        "coverage": _json_floats(np.mean(np.abs(at_budget - true_risk) <= half_width, axis=1)),
        "coverage_of_pool_risk": _json_floats(np.mean(np.abs(at_budget - pool_risk) <= half_width, axis=1)),
        "median_mse_estimation_error": _json_floats(np.median((var_boot - err2) ** 2, axis=1)),
        "mean_bootstrap_variance": _json_floats(var_boot.mean(axis=1)),
        "mean_squared_error_over_runs": _json_floats(err2.mean(axis=1)),
        "arrays": {"variance": var_boot, "estimates": at_budget},
    }


# ------------------------------------------------------------------------------------ command


@dataclasses.dataclass(frozen=True)
class AcquireConfig:
    """`jaxprobe acquire`; flags of the same names (see `--help`)."""

    target: str = ""
    out: str = ""
    surrogate: str | None = None
    sweep: SweepConfig = SweepConfig()
    true_risk: str = "test"  # "test": the target's test-subset loss (paper); "pool"
    iid: str = "auto"  # "auto": run the uniform baseline here; "none"; or an earlier iid --out folder
    budget_offset: str = "0"  # "0", an integer, or "auto" (surrogate ICL examples for a zero-shot target)
    bootstrap: int = 0
    bootstrap_resamples: int = 1000
    bootstrap_variance: str = "paper"
    bootstrap_budgets: tuple[int, ...] | None = None
    chunk_runs: int = DEFAULT_CHUNK_RUNS
    threads: int = 2
    checkpoint_every: float = 30.0
    progress: bool = True


def load_inputs(config: AcquireConfig):
    """(target pool, surrogate pool or None, target test or None) as checked `Evaluation`s."""
    from jaxprobe.active.evaluate import check_same_rows, load_evaluation

    target = load_evaluation(config.target, "pool", flag="--target")
    needs_surrogate = config.sweep.acquisition in NEEDS_SURROGATE or config.sweep.estimator == "ase"
    surrogate = None
    if config.surrogate is not None:
        surrogate = load_evaluation(config.surrogate, "pool", flag="--surrogate")
        check_same_rows(target, surrogate)
    elif needs_surrogate:
        raise UserError(f"--acquisition {config.sweep.acquisition} / --estimator {config.sweep.estimator} "
                        f"needs --surrogate DIR")
    test = load_evaluation(config.target, "test", flag="--target") if config.true_risk == "test" else None
    return target, surrogate, test


def _resolve_offset(config: AcquireConfig, target, surrogate) -> int:
    if config.budget_offset == "auto":
        icl = lambda ev: int((ev.meta.get("icl") or {}).get("n", 0)) if ev is not None else 0  # noqa: E731
        return icl(surrogate) if icl(target) == 0 else 0
    try:
        offset = int(config.budget_offset)
    except ValueError:
        raise UserError(f"--budget-offset must be an integer or 'auto', not {config.budget_offset!r}") from None
    if offset < 0:
        raise UserError(f"--budget-offset must be >= 0, not {offset}")
    return offset


def _check_out(out: Path) -> None:
    # what an interrupted run of this command leaves behind (rewritten to the same bits)
    resumable = {"checkpoint", "iid_checkpoint", "estimates.npy", "iid_estimates.npy",
                 "bootstrap_variance.npy", "bootstrap_estimates.npy"}
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if (out / "summary.json").exists():
        raise UserError(f"--out {out} already holds a finished acquire run (summary.json); use a new --out")
    others = [p.name for p in out.iterdir() if p.name not in resumable] if out.is_dir() else []
    if others:
        raise UserError(f"--out {out} already holds other files ({', '.join(sorted(others)[:3])}); "
                        f"give a new or empty folder")


def _load_iid(directory: Path, config: AcquireConfig, pool_data: str, needed: int) -> np.ndarray:
    summary_path = directory / "summary.json"
    if not summary_path.is_file() or not (directory / "estimates.npy").is_file():
        raise UserError(f"--iid {directory}: no summary.json/estimates.npy; not a finished jaxprobe acquire run")
    summary = load_json(summary_path)
    if summary.get("config", {}).get("sweep", {}).get("acquisition") != "iid":
        raise UserError(f"--iid {directory}: that run used --acquisition "
                        f"{summary.get('config', {}).get('sweep', {}).get('acquisition')}, not iid")
    if summary.get("target_data") != pool_data:
        raise UserError(f"--iid {directory}: that run was on another target or pool than --target {config.target}")
    estimates = np.load(directory / "estimates.npy", allow_pickle=False)
    if estimates.ndim != 2 or len(estimates) < needed:
        raise UserError(f"--iid {directory}/estimates.npy: needs at least {needed} steps, has shape {estimates.shape}")
    return estimates


def run_acquire(config: AcquireConfig, *, log=print) -> dict:
    out = Path(config.out)
    _check_out(out)
    if config.true_risk not in ("test", "pool"):
        raise UserError(f"--true-risk must be test or pool, not {config.true_risk!r}")
    if config.bootstrap < 0 or config.bootstrap_resamples < 0:
        raise UserError("--bootstrap and --bootstrap-resamples must be >= 0")
    if config.bootstrap and config.sweep.estimator == "ase":
        raise UserError("--bootstrap needs a sampling estimator (lure, is or mean), not ase")
    for flag, value, least in (("--chunk-runs", config.chunk_runs, 1), ("--threads", config.threads, 1),
                               ("--checkpoint-every", config.checkpoint_every, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, not {value}")
    if config.bootstrap > config.sweep.runs:
        raise UserError(f"--bootstrap {config.bootstrap} is more than --runs {config.sweep.runs}")
    target, surrogate, test = load_inputs(config)
    sweep = config.sweep
    sweep.check(len(target.labels))
    outside = [b for b in config.bootstrap_budgets or () if not 1 <= b <= sweep.size]
    if outside:
        raise UserError(f"--bootstrap-budgets {outside[0]} is outside 1..--size {sweep.size}")
    offset = _resolve_offset(config, target, surrogate)
    risk = {"pool": mean_loss(target.logits, target.labels),
            "test": mean_loss(test.logits, test.labels) if test is not None else None}
    true_risk = risk[config.true_risk]
    target_data = _fingerprint(target.logits, target.labels)
    surrogate_logits = surrogate.logits if surrogate is not None else None
    common = dict(chunk_runs=config.chunk_runs, threads=config.threads, progress=config.progress,
                  true_risk=true_risk, checkpoint_every_s=config.checkpoint_every, log=log)

    # everything that can be refused is checked before anything is written
    needed = min(sweep.size + offset, len(target.labels))
    use_iid = sweep.acquisition != "iid" and config.iid != "none"
    iid_estimates = iid_source = None
    if use_iid and config.iid != "auto":
        iid_estimates = _load_iid(Path(config.iid), config, target_data, needed)
        iid_source = str(Path(config.iid) / "estimates.npy")

    log(f"pool {len(target.labels)} rows, K={target.n_classes}; true risk ({config.true_risk}) {true_risk:.6f}")
    if sweep.estimator == "ase":
        estimates = np.full((sweep.size, sweep.runs), ase_estimate(target.logits, surrogate_logits, sweep.temperature))
        pool = None
    else:
        pool = prepare_pool(target.logits, surrogate_logits, target.labels, sweep)
        estimates = _sweep_pool(pool, sweep, checkpoint_dir=out / "checkpoint", desc=sweep.acquisition, **common)
    if use_iid and config.iid == "auto":
        iid_config = dataclasses.replace(sweep, acquisition="iid", estimator="mean", clip=None, size=needed)
        iid_pool = prepare_pool(target.logits, None, target.labels, iid_config)
        iid_estimates = _sweep_pool(iid_pool, iid_config, checkpoint_dir=out / "iid_checkpoint",
                                    desc="iid baseline", **common)
        save_npy(out / "iid_estimates.npy", iid_estimates)
        iid_source = "iid_estimates.npy (computed here: --acquisition iid, same --runs and --seed)"

    summary = {"format": SUMMARY_FORMAT,
               "config": {**dataclasses.asdict(config), "sweep": {**dataclasses.asdict(sweep),
                                                                  "clip": sweep.resolved_clip}},
               "target": str(target.directory), "surrogate": str(surrogate.directory) if surrogate else None,
               "target_model": target.meta.get("model"), "surrogate_model": surrogate.meta.get("model") if surrogate else None,
               "target_data": target_data, "pool_size": int(len(target.labels)), "n_classes": target.n_classes,
               "true_risk_source": config.true_risk, "pool_risk": risk["pool"], "test_risk": risk["test"],
               "iid_source": iid_source,
               **summarise_sweep(estimates, true_risk, iid_estimates, offset=offset)}
    if config.bootstrap:
        study = bootstrap_study(pool, sweep, runs=config.bootstrap, resamples=config.bootstrap_resamples,
                                variance=config.bootstrap_variance, budgets=config.bootstrap_budgets,
                                true_risk=true_risk, progress=config.progress)
        arrays = study.pop("arrays")
        save_npy(out / "bootstrap_variance.npy", arrays["variance"])
        save_npy(out / "bootstrap_estimates.npy", arrays["estimates"])
        summary["bootstrap"] = study
    save_npy(out / "estimates.npy", estimates)
    save_json(out / "summary.json", summary)  # last: its presence marks a finished run
    for name in ("checkpoint", "iid_checkpoint"):
        shutil.rmtree(out / name, ignore_errors=True)
    _log_table(summary, log)
    return summary


def _log_table(summary: dict, log) -> None:
    for row in summary["table"]:
        rel = row["relative_error"]
        log(f"  {row['labels']:4d} labels: median squared error x1e4 {row['median_squared_error_x1e4']:.4f}"
            + (f", relative to iid {rel:.3f}" if rel is not None else ""))
    if summary.get("median_relative_error") is not None:
        log(f"median relative error over steps {summary['median_relative_error']:.3f} "
            f"({'better' if summary['median_relative_error'] < 1 else 'not better'} than iid)")


def _clip_value(text: str) -> float | None:
    if text.lower() in ("none", "reference"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'reference', not {text!r}") from None


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None


def add_acquire_command(subparsers) -> argparse.ArgumentParser:
    d, s = AcquireConfig(), SweepConfig()
    parser = subparsers.add_parser(
        "acquire", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="active-testing sweeps: label acquisition runs and LURE risk estimates (step 2)",
        description="Estimate a target model's risk (mean log loss) from few labels, chosen by an "
                    "acquisition function on a surrogate, over many independent runs.\n\n"
                    "Reads `jaxprobe evaluate` folders (pool logits, labels, row indices; the test "
                    "subset for the true risk). Each run draws --size labels without replacement from "
                    "the pool, from the proposal q = max(w / sum w, clip / n_left), renormalised over "
                    "the points left, and gives the estimate after every label.\n\n"
                    "Writes OUT/estimates.npy [size, runs], OUT/summary.json (median and mean squared "
                    "error per step, relative error to iid, the 50/100/200/300/400 table, bootstrap), "
                    "and with --iid auto OUT/iid_estimates.npy. A killed run resumes when rerun.",
        epilog="examples:\n"
               "  jaxprobe acquire --target runs/zero --surrogate runs/icl50 --out runs/ce\n"
               "  jaxprobe acquire --target runs/zero --acquisition iid --out runs/iid\n"
               "  jaxprobe acquire --target runs/zero --surrogate runs/icl50 --iid runs/iid "
               "--budget-offset auto --bootstrap 100 --out runs/ce-boot")
    parser.add_argument("--target", required=True, help="evaluate folder of the model under test")
    parser.add_argument("--surrogate", help="evaluate folder of the surrogate, on the same pool rows "
                                            "(needed by cross-entropy, entropy, nll, nll-exact and ase)")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an unfinished run)")
    parser.add_argument("--acquisition", default=s.acquisition, choices=ACQUISITIONS,
                        help="score w of each pool row: iid (uniform), cross-entropy (E_surrogate[-log "
                             "p_target]), entropy (surrogate entropy), nll (the reference's label-smoothed "
                             "form), nll-exact (-log pi(y)), true-loss (oracle), self-entropy (target "
                             "entropy) (default: %(default)s)")
    parser.add_argument("--estimator", default=s.estimator, choices=ESTIMATORS,
                        help="lure (unbiased), is (importance weights 1/(Nq)), mean (naive sample mean), "
                             "ase (zero-shot surrogate estimate, constant) (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=s.runs, help="independent runs (default: %(default)s)")
    parser.add_argument("--size", type=int, default=s.size, help="labels acquired per run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=s.seed,
                        help="run r uses key fold_in(seed, acquisition, r) (default: %(default)s)")
    parser.add_argument("--clip", type=_clip_value, default=None, metavar="ALPHA",
                        help="floor alpha/n_left on each probability before renormalising, in [0, 1) "
                             "(default: the reference's per acquisition: 0.1 surrogate ones, 0 iid and "
                             "true-loss, 0.01 self-entropy)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="divide the surrogate's logits by T in the score (default: none)")
    parser.add_argument("--true-risk", default=d.true_risk, choices=("test", "pool"),
                        help="truth for the squared error: the target's test-subset loss (paper) or "
                             "its pool loss, which LURE estimates without bias (default: %(default)s)")
    parser.add_argument("--iid", default=d.iid, metavar="auto|none|DIR",
                        help="uniform baseline for the relative error: auto runs it here (same runs and "
                             "seed), DIR is an earlier `acquire --acquisition iid` folder of the same "
                             "target (default: %(default)s)")
    parser.add_argument("--budget-offset", default=d.budget_offset, metavar="N|auto",
                        help="compare k active labels with N+k uniform ones (the paper's rule for a "
                             "zero-shot target with an N-shot surrogate); auto reads N from the "
                             "surrogate's ICL count when the target is zero-shot (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap, metavar="T",
                        help="bootstrap single-run error estimates on the first T runs, with their "
                             "coverage (paper: 100; default: off)")
    parser.add_argument("--bootstrap-resamples", type=int, default=d.bootstrap_resamples, metavar="B",
                        help="resamples per run and budget (paper: 1000; 0: the exact B->inf variance) "
                             "(default: %(default)s)")
    parser.add_argument("--bootstrap-variance", default=d.bootstrap_variance, choices=tuple(BOOTSTRAP_VARIANCES),
                        help="paper: 1/(B-1) as the paper writes; reference: np.var (1/B) as the "
                             "reference code (default: %(default)s)")
    parser.add_argument("--bootstrap-budgets", type=_budgets, default=None, metavar="K1,K2,...",
                        help="label budgets of the bootstrap (default: every 25 labels and --size)")
    parser.add_argument("--chunk-runs", type=int, default=d.chunk_runs,
                        help="runs per compiled chunk; one checkpoint per chunk (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="chunks run at once (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every, metavar="SECONDS",
                        help="at most one checkpoint per this many seconds (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=_acquire_command)
    return parser


def config_from_args(args: argparse.Namespace) -> AcquireConfig:
    sweep_fields = {f.name for f in dataclasses.fields(SweepConfig)}
    top_fields = {f.name for f in dataclasses.fields(AcquireConfig)} - {"sweep"}
    values = vars(args)
    return AcquireConfig(sweep=SweepConfig(**{k: v for k, v in values.items() if k in sweep_fields}),
                         **{k: v for k, v in values.items() if k in top_fields})


def _acquire_command(args: argparse.Namespace) -> int:
    run_acquire(config_from_args(args))
    return 0
