"""Active-testing sweeps on arrays: many runs of sequential label acquisition, each giving a risk
estimate after every label, and their summary.

    estimates = run_sweep(target_logits, surrogate_logits, labels, acquisition="cross-entropy",
                          estimator="lure", runs=3000, size=400, seed=0)   # float64 [size, runs]
    summary = summarise_sweep(estimates, true_risk, iid_estimates)         # JSON-ready dict

Runs are a `vmap` over per-run keys inside one jitted `lax.scan` over steps (`sampler.py`); run r
always uses `fold_in(key(seed, acquisition), r)`, so results do not depend on chunking, threads or
resumption. Chunks of runs go to Orbax checkpoints (`jaxprobe.sweep_checkpoint.SweepCheckpoint`), and a killed
sweep resumes to the same bits.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import math
import time

import numpy as np

from jaxprobe.active.estimators import (
    ACQUISITIONS,
    EPS,
    ESTIMATORS,
    NEEDS_SURROGATE,
    REFERENCE_CLIP,
    acquisition_scores,
    ase_estimate,
    per_example_loss,
)
from jaxprobe.errors import UserError

SWEEP_FORMAT = "jaxprobe.acquire-sweep/1"


TABLE_BUDGETS = (50, 100, 200, 300, 400)


DEFAULT_CHUNK_RUNS = 256


LANE_BLOCK = 64  # chunk widths are multiples of this (see _chunks)


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


def fingerprint(*arrays: np.ndarray) -> str:
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


def sweep_pool(pool, config: SweepConfig, *, checkpoint_dir, chunk_runs: int, threads: int,
                progress: bool, true_risk: float | None, checkpoint_every_s: float, desc: str,
                log=None) -> np.ndarray:
    """estimates [size, runs] of the sampler over `pool`, in resumable chunks of runs."""
    from tqdm.auto import tqdm

    from jaxprobe.active.sampler import stream_key, sweep_chunk

    size, runs = config.size, config.runs
    meta = {"format": SWEEP_FORMAT, "config": dataclasses.asdict(config), "clip": config.resolved_clip,
            "pool_size": pool.size, "data": fingerprint(pool.sorted_scores, pool.sorted_losses)}
    estimates = np.zeros((size, runs))
    done = 0
    ckpt = None
    if checkpoint_dir is not None:
        from jaxprobe.sweep_checkpoint import SweepCheckpoint

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
    return sweep_pool(pool, config, checkpoint_dir=checkpoint_dir, chunk_runs=chunk_runs, threads=threads,
                       progress=progress, true_risk=true_risk, checkpoint_every_s=checkpoint_every_s,
                       desc=f"{acquisition}/{estimator}")


def json_floats(values) -> list:
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
           "median_squared_error": json_floats(med), "mean_squared_error": json_floats(mean),
           "mean_estimate": json_floats(np.mean(estimates, axis=1)), "relative_error": None,
           "relative_mean_squared_error": None, "iid_offset": offset}
    rel = None
    if iid_estimates is not None:
        iid_se = (np.asarray(iid_estimates, np.float64) - true_risk) ** 2
        rel = relative_error(med, np.median(iid_se, axis=1), offset)
        out["relative_error"] = json_floats(rel)
        out["relative_mean_squared_error"] = json_floats(relative_error(mean, iid_se.mean(axis=1), offset))
        finite = rel[np.isfinite(rel)]
        out["median_relative_error"] = float(np.median(finite)) if finite.size else None
        out["fraction_of_steps_better_than_iid"] = float(np.mean(finite < 1)) if finite.size else None
    out["table"] = [{"labels": b, "median_squared_error_x1e4": float(med[b - 1] * 1e4),
                     "relative_error": (None if rel is None or b > len(rel) or not np.isfinite(rel[b - 1])
                                        else float(rel[b - 1]))}
                    for b in sorted({*(b for b in budgets if b <= len(med)), len(med)})]
    return out
