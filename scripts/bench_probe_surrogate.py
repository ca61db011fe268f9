"""The probe surrogate against uniform sampling and the in-context surrogate, on a finished
`jaxprobe active-experiment` folder (run with the probe, the default):

  1. median squared error x10^4 of LURE with cross-entropy acquisition at 50/100/200/300/400
     labels (pool truth and test truth), from the experiment's own sweeps (3,000 runs by default);
  2. the labels a user needs for a 95% interval of +-0.02 on ACCURACY with each: `--runs` runs of
     the acquire sampler up to the whole pool, the one-run interval of `jaxprobe estimate` (hybrid
     with a surrogate, martingale for uniform sampling) after every 25 labels; the first budget
     whose median half-width is <= 0.02, and the coverage of the pool accuracy there;
  3. optionally (`--refit-every R --refit-runs n`) the probe refitted every R labels.

    python scripts/bench_probe_surrogate.py runs/active-experiment --runs 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from jaxprobe.active import interval as I
from jaxprobe.active.estimators import proposal_pmf
from jaxprobe.active.inputs import load_evaluation
from jaxprobe.active.probe_surrogate import (
    adaptive_sweep,
    load_probe_data,
    probe_surrogate,
)
from jaxprobe.active.sampler import stream_key, sweep_chunk
from jaxprobe.active.sweep import SweepConfig, prepare_pool

BUDGETS = (50, 100, 200, 300, 400)


def labels_for_accuracy(target, surrogate_logits, acquisition, runs, half_width, seed=0):
    n = len(target.labels)
    config = SweepConfig(acquisition=acquisition, runs=runs, size=n, seed=seed, clip=None if acquisition == "iid" else 0.1)
    pool = prepare_pool(target.logits, surrogate_logits, target.labels, config)
    _, rows, q = sweep_chunk(pool, stream_key(seed, "bench/" + acquisition), np.arange(runs), size=n,
                             clip=config.resolved_clip, record=True)
    values = I.per_example_metrics(target.logits, target.labels)["accuracy"]
    truth = float(values.mean())
    sigma2 = None
    method = "martingale"
    if surrogate_logits is not None:
        scores = np.empty(n)
        scores[pool.order] = pool.sorted_scores
        sigma2 = I.pool_sigma2(target.logits, surrogate_logits, proposal_pmf(scores, config.resolved_clip))["accuracy"]
        method = "hybrid"
    for b in range(25, n + 1, 25):
        est = I.lure(values[rows[:, :b]], q[:, :b], n)
        half = 1.959964 * np.sqrt(I.lure_variance(values[rows[:, :b]], q[:, :b], n, method=method, sigma2=sigma2))
        if np.median(half) <= half_width:
            return {"labels": b, "median_half_width": float(np.median(half)),
                    "coverage": float(np.mean(np.abs(est - truth) <= half)), "method": method}
    return {"labels": None, "method": method}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--runs", type=int, default=1000, help="runs for the labels-needed study")
    parser.add_argument("--half-width", type=float, default=0.02)
    parser.add_argument("--refit-every", type=int, default=0)
    parser.add_argument("--refit-runs", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.experiment)
    results = json.loads((out / "results.json").read_text())
    runs = results["settings"]["runs"]
    print(f"{out}: {platform.processor() or platform.machine()}; sweeps of {runs} runs")
    zero = load_evaluation(out / "evaluations" / "target-0shot")
    probe, info = probe_surrogate(zero)
    print(f"probe: hook point {info['layer']} of {len(info['cv_log_loss'])}, l2 {info['l2']}, {info['examples']} examples, "
          f"cross-validated log-loss {min(info['cv_log_loss']):.4f}")
    few_dir = min(p for p in (out / "evaluations").glob("target-*shot") if p.name != "target-0shot")
    icl = load_evaluation(few_dir)
    for truth in ("pool", "test"):
        if not all(truth in data["median_se"] for data in results["targets"].values()):
            continue  # e.g. FPB: no test subset, the pool loss is the truth
        print(f"\nmedian squared error x1e4 (true risk = {truth} loss; columns: labels spent, the zero-shot "
              "target's surrogates having used the in-context examples)")
        print("| target | method | " + " | ".join(map(str, BUDGETS)) + " | median rel. error vs iid |")
        print("|---" * (len(BUDGETS) + 3) + "|")
        for target, data in results["targets"].items():
            for method in ("iid", "cross-entropy", "probe-cross-entropy"):
                curve = data["median_se"][truth].get(method)
                if curve is None:
                    continue
                offset = 0 if method == "iid" else data["budget_offset"]
                cells = [f"{curve[b - offset - 1] * 1e4:.4f}" if 0 < b - offset <= len(curve)
                         and curve[b - offset - 1] is not None else "—" for b in BUDGETS]
                rel = data["median_relative_error"][truth].get(method)
                print(f"| {target} | {method} | " + " | ".join(cells) + f" | {'' if rel is None else f'{rel:.3f}'} |")
    print(f"\nlabels for a 95% interval of +-{args.half_width} on accuracy ({args.runs} runs; first budget, in "
          "steps of 25, whose median half-width is below it)")
    print("| target | method | labels | median half-width | coverage there |")
    print("|---|---|---|---|---|")
    for name, target in (("0shot", zero), (few_dir.name.removeprefix("target-"), load_evaluation(few_dir))):
        for method, surrogate, acquisition in (("iid", None, "iid"), ("CE, in-context surrogate", icl.logits, "cross-entropy"),
                                               ("CE, probe surrogate", probe.logits, "cross-entropy")):
            t0 = time.time()
            found = labels_for_accuracy(target, surrogate, acquisition, args.runs, args.half_width)
            cells = ("not reached", "", "") if found["labels"] is None else (
                found["labels"], f"{found['median_half_width']:.4f}", f"{found['coverage']:.3f}")
            print(f"| {name} | {method} ({found['method']}) | " + " | ".join(map(str, cells)) + f" |  <!-- {time.time() - t0:.0f}s -->")
    if args.refit_every:
        pool_acts, ex_acts, ex_y = load_probe_data(out / "evaluations" / "target-0shot")
        layer = info["layer"]
        truth = float(I.per_example_metrics(zero.logits, zero.labels)["loss"].mean())
        t0 = time.time()
        est, _, _ = adaptive_sweep(zero.logits, zero.labels, np.asarray(pool_acts[:, layer]), ex_acts[:, layer], ex_y,
                                   runs=args.refit_runs, size=400, refit_every=args.refit_every, l2=info["l2"])
        se = np.median((est - truth) ** 2, axis=0)
        ests = np.load(out / "sweeps" / "0shot" / "probe-cross-entropy" / "estimates.npy")[:, :args.refit_runs]
        fixed = np.median((ests - truth) ** 2, axis=1)
        print(f"\nprobe refitted every {args.refit_every} labels, 0shot target, {args.refit_runs} runs, columns: acquired labels "
              f"({time.time() - t0:.0f}s), median squared error x1e4 vs pool loss")
        print("| labels | " + " | ".join(map(str, BUDGETS)) + " |\n|---" * 1 + "|---" * len(BUDGETS) + "|")
        print("| refit | " + " | ".join(f"{se[b - 1] * 1e4:.4f}" for b in BUDGETS) + " |")
        print("| fixed probe (same number of runs) | " + " | ".join(f"{fixed[b - 1] * 1e4:.4f}" for b in BUDGETS) + " |")


if __name__ == "__main__":
    main()
