"""`jaxprobe acquire`: active-testing sweeps — many runs of sequential label acquisition, each giving
a risk estimate after every label — plus the single-run bootstrap error estimate and its coverage.

The sweeps themselves are in `sweep.py` and the bootstrap in `bootstrap.py`.

Output folder of the command (`--out DIR`):
    estimates.npy       float64 [size, runs]: estimate after 1..size labels (the reference's layout)
    iid_estimates.npy   the uniform baseline's sweep, when computed here (`--iid auto`)
    summary.json        settings, true risk, per step the median and mean squared error over runs,
                        the relative error against iid, the table at 50/100/200/300/400 labels,
                        and the bootstrap study (`--bootstrap T`)
    bootstrap_variance.npy / bootstrap_estimates.npy   [budgets, T], with `--bootstrap`
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from jaxprobe.active.bootstrap import bootstrap_study
from jaxprobe.active.estimators import NEEDS_SURROGATE, ase_estimate, mean_loss
from jaxprobe.active.inputs import check_same_rows, load_evaluation
from jaxprobe.active.predictions import is_predictions_file, load_acquire_input
from jaxprobe.active.sweep import (
    DEFAULT_CHUNK_RUNS,
    SweepConfig,
    fingerprint,
    prepare_pool,
    summarise_sweep,
    sweep_pool,
)
from jaxprobe.errors import UserError
from jaxprobe.files import claim_folder, load_json_object, load_npy, save_json, save_npy
from jaxprobe.moved import forward

SUMMARY_FORMAT = "jaxprobe.acquire/1"
SETTINGS_FORMAT = "jaxprobe.acquire-settings/1"


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
    refit_every: int = 0  # with --surrogate probe: refit it every N acquired labels (0: never)
    chunk_runs: int = DEFAULT_CHUNK_RUNS
    threads: int = 2
    checkpoint_every: float = 30.0
    progress: bool = True


def load_inputs(config: AcquireConfig):
    """(target pool, surrogate pool or None, target test or None) as checked `Evaluation`s."""
    target = load_acquire_input(config.target, flag="--target")  # an evaluate folder or a predictions file
    needs_surrogate = config.sweep.acquisition in NEEDS_SURROGATE or config.sweep.estimator == "ase"
    surrogate = None
    if config.surrogate == "probe":  # a probe on the target's own activations (evaluate --activations)
        from jaxprobe.active.probe_surrogate import probe_surrogate

        surrogate = probe_surrogate(target)[0]
    elif config.surrogate is not None:
        surrogate = load_acquire_input(config.surrogate, flag="--surrogate", like=target)
        check_same_rows(target, surrogate)
    elif needs_surrogate:
        raise UserError(f"--acquisition {config.sweep.acquisition} / --estimator {config.sweep.estimator} "
                        f"needs --surrogate DIR")
    if config.true_risk == "test" and is_predictions_file(config.target):
        raise UserError(f"--target {config.target} is a predictions file, with no test subset; use --true-risk pool")
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


def _claim_out(out: Path, config: AcquireConfig, target_data: str, surrogate_data: str | None) -> None:
    """Claim --out for this run's settings (acquire.json, written first), so a killed run resumes
    only into the same command and a finished one is never overwritten."""
    asked = dataclasses.asdict(config)
    for key in ("out", "chunk_runs", "threads", "checkpoint_every", "progress"):  # results do not depend on them
        asked.pop(key)
    settings = _normalised({**asked, "target_data": target_data, "surrogate_data": surrogate_data})
    if claim_folder(out, "acquire.json", settings, what="an acquire run", format=SETTINGS_FORMAT) is None:
        save_json(out / "acquire.json", {"format": SETTINGS_FORMAT, "settings": settings})
    elif (out / "summary.json").exists():
        raise UserError(f"--out {out} already holds a finished acquire run (summary.json); use a new --out")


def _normalised(obj):
    """JSON round trip, so settings compare the same before and after being stored."""
    return json.loads(json.dumps(obj))


def _load_iid(directory: Path, config: AcquireConfig, pool_data: str, needed: int) -> np.ndarray:
    summary_path = directory / "summary.json"
    if not summary_path.is_file() or not (directory / "estimates.npy").is_file():
        raise UserError(f"--iid {directory}: no summary.json/estimates.npy; not a finished jaxprobe acquire run")
    summary = load_json_object(summary_path)
    if summary.get("config", {}).get("sweep", {}).get("acquisition") != "iid":
        raise UserError(f"--iid {directory}: that run used --acquisition "
                        f"{summary.get('config', {}).get('sweep', {}).get('acquisition')}, not iid")
    if summary.get("target_data") != pool_data:
        raise UserError(f"--iid {directory}: that run was on another target or pool than --target {config.target}")
    estimates = load_npy(directory / "estimates.npy")
    if estimates.ndim != 2 or len(estimates) < needed:
        raise UserError(f"--iid {directory}/estimates.npy: needs at least {needed} steps, has shape {estimates.shape}")
    return estimates


def run_acquire(config: AcquireConfig, *, log=print) -> dict:
    out = Path(config.out)
    _check_flags(config)
    target, surrogate, test = load_inputs(config)
    return _run_acquire_checked(config, out, target, surrogate, test, log)


def _check_flags(config: AcquireConfig) -> None:
    """Every flag that needs no input read, refused in one line."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if config.true_risk not in ("test", "pool"):
        raise UserError(f"--true-risk must be test or pool, not {config.true_risk!r}")
    if config.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0, not {config.bootstrap}")
    if config.bootstrap and config.bootstrap_resamples < 2:  # one resample has no variance to estimate
        raise UserError(f"--bootstrap-resamples must be at least 2, not {config.bootstrap_resamples}")
    if config.bootstrap and config.sweep.estimator == "ase":
        raise UserError("--bootstrap needs a sampling estimator (lure, is or mean), not ase")
    for flag, value, least in (("--chunk-runs", config.chunk_runs, 1), ("--threads", config.threads, 1),
                               ("--checkpoint-every", config.checkpoint_every, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, not {value}")
    if config.refit_every and (config.surrogate != "probe" or config.sweep.acquisition != "cross-entropy"
                               or config.sweep.estimator != "lure" or config.bootstrap or config.refit_every < 0):
        raise UserError("--refit-every needs --surrogate probe, --acquisition cross-entropy, --estimator lure "
                        "and no --bootstrap")
    if config.bootstrap > config.sweep.runs:
        raise UserError(f"--bootstrap {config.bootstrap} is more than --runs {config.sweep.runs}")


def _run_acquire_checked(config: AcquireConfig, out: Path, target, surrogate, test, log) -> dict:
    sweep = config.sweep
    sweep.check(len(target.labels))
    outside = [b for b in config.bootstrap_budgets or () if not 1 <= b <= sweep.size]
    if outside:
        raise UserError(f"--bootstrap-budgets {outside[0]} is outside 1..--size {sweep.size}")
    offset = _resolve_offset(config, target, surrogate)
    risk = {"pool": mean_loss(target.logits, target.labels),
            "test": mean_loss(test.logits, test.labels) if test is not None else None}
    true_risk = risk[config.true_risk]
    target_data = fingerprint(target.logits, target.labels)
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
    _claim_out(out, config, target_data,
               fingerprint(surrogate.logits, surrogate.labels) if surrogate is not None else None)

    log(f"pool {len(target.labels)} rows, K={target.n_classes}; true risk ({config.true_risk}) {true_risk:.6f}")
    if sweep.estimator == "ase":
        estimates = np.full((sweep.size, sweep.runs), ase_estimate(target.logits, surrogate_logits, sweep.temperature))
        pool = None
    elif config.refit_every:  # the probe refitted inside each run: its own vmapped sampler
        from jaxprobe.active.probe_surrogate import refit_sweep

        estimates, pool = refit_sweep(target, sweep, config.refit_every, progress=config.progress), None
    else:
        pool = prepare_pool(target.logits, surrogate_logits, target.labels, sweep)
        estimates = sweep_pool(pool, sweep, checkpoint_dir=out / "checkpoint", desc=sweep.acquisition, **common)
    if use_iid and config.iid == "auto":
        iid_config = dataclasses.replace(sweep, acquisition="iid", estimator="mean", clip=None, size=needed)
        iid_pool = prepare_pool(target.logits, None, target.labels, iid_config)
        iid_estimates = sweep_pool(iid_pool, iid_config, checkpoint_dir=out / "iid_checkpoint",
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


# run_sweep, summarise_sweep, SweepConfig, ... lived here before `sweep.py`: kept for one release
__getattr__ = forward(__name__, "jaxprobe.active.sweep")
