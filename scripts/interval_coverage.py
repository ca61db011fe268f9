"""Coverage of the one-run confidence interval (`jaxprobe.active.interval`), measured by simulation:
thousands of runs of the acquire sampler on fully labelled pools, the 95% interval of loss and
accuracy after each budget against the pool value. Prints a markdown table for
docs/active-testing.md.

    python scripts/interval_coverage.py --runs 3000
    python scripts/interval_coverage.py --target runs/zero --surrogate runs/icl50   # an evaluated pool
"""

from __future__ import annotations

import argparse
import platform

from jaxprobe.active.interval import INTERVAL_METHODS, METRICS, coverage_study
from jaxprobe.testing import synthetic_pool


def pools(args):
    if args.target:
        from jaxprobe.active.inputs import load_evaluation

        target = load_evaluation(args.target, "pool")
        surrogate = load_evaluation(args.surrogate, "pool", flag="--surrogate").logits if args.surrogate else None
        yield f"{args.target} (N={len(target.labels)}, K={target.n_classes})", target.logits, surrogate, target.labels
        return
    for k in (2, 3):
        for sharpness in (0.8, 0.3):
            t, s, y = synthetic_pool(args.pool_size, k, seed=k, sharpness=sharpness)
            yield f"synthetic K={k}, sharpness {sharpness} (N={args.pool_size})", t, s, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--pool-size", type=int, default=2000)
    parser.add_argument("--budgets", default="25,100,400")
    parser.add_argument("--acquisitions", default="cross-entropy,iid")
    parser.add_argument("--target")
    parser.add_argument("--surrogate")
    args = parser.parse_args()
    budgets = tuple(int(b) for b in args.budgets.split(","))
    print(f"{args.runs} runs per cell, clip 0.1 (iid: 0), 95% intervals; {platform.processor() or platform.machine()}")
    print("\n| pool | acquisition | metric | " + " | ".join(f"{m} @{b}" for m in INTERVAL_METHODS for b in budgets) + " |")
    print("|---" * (3 + len(INTERVAL_METHODS) * len(budgets)) + "|")
    for name, t, s, y in pools(args):
        for acquisition in args.acquisitions.split(","):
            study = coverage_study(t, s, y, acquisition=acquisition, runs=args.runs, size=max(budgets),
                                   budgets=budgets)
            for metric in METRICS:
                cells = [f"{study[m][metric][b]['coverage']:.3f}" if m in study else "—"
                         for m in INTERVAL_METHODS for b in budgets]
                print(f"| {name} | {acquisition} | {metric} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
