"""Benchmark: the cross-entropy + LURE sweep (3000 runs x 400 labels, clip 0.1) with jaxprobe's
vectorised sampler vs a straightforward NumPy implementation of the reference loop, side by side.

The reference loop (`jaxprobe.active.estimators.reference_sweep`: per step the clipped pmf over the
remaining pool, one `multinomial` draw, LURE recomputed by its direct formula) is timed on a few
runs and scaled to `--runs`. The reference notebook took 30 min 53 s for N = 10,000.

    .venv/bin/python scripts/bench_acquire.py                  # N = 872, 2000, 10000
    .venv/bin/python scripts/bench_acquire.py --pools 10000 --reference-runs 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxprobe.active import estimators as E  # noqa: E402
from jaxprobe.active.sweep import SweepConfig, prepare_pool, sweep_pool  # noqa: E402


def synthetic_pool(n: int, seed: int = 0):
    """Binary-task logits shaped like an LLM's: a target, and a surrogate that knows more."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    signal = np.where(labels == 1, 1.0, -1.0)[:, None] * np.array([[-1.0, 1.0]])
    target = (0.6 * signal + rng.normal(size=(n, 2))).astype(np.float32)
    surrogate = (1.5 * signal + rng.normal(size=(n, 2))).astype(np.float32)
    return target, surrogate, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default="872,2000,10000", help="pool sizes N (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--reference-runs", type=int, default=3, help="runs of the NumPy loop timed per N")
    parser.add_argument("--chunk-runs", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed sweeps of ours per N (the best is kept)")
    args = parser.parse_args(argv)

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} (other jobs slow both sides); {args.runs} runs x {args.size} labels, "
          f"cross-entropy + LURE, clip {args.clip}, {args.threads} threads")
    header = (f"{'N':>6}  {'ours (s)':>9}  {'ours CPU (s)':>12}  {'compile (s)':>11}  {'reference/run (s)':>17}  "
              f"{'reference x runs (s)':>20}  {'speed-up':>9}")
    print(header)
    for n in (int(x) for x in args.pools.split(",")):
        target, surrogate, labels = synthetic_pool(n)
        config = SweepConfig("cross-entropy", "lure", args.runs, args.size, 0, args.clip)
        pool = prepare_pool(target, surrogate, labels, config)
        kw = dict(checkpoint_dir=None, chunk_runs=args.chunk_runs, threads=args.threads, progress=False,
                  true_risk=None, checkpoint_every_s=0.0, desc="")
        t0 = time.perf_counter()
        sweep_pool(pool, SweepConfig("cross-entropy", "lure", 1, args.size, 0, args.clip), **kw)  # compile
        compile_s = time.perf_counter() - t0
        ours, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            estimates = sweep_pool(pool, config, **kw)
            ours.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        scores = E.acquisition_scores("cross-entropy", target, surrogate, labels)
        losses = E.per_example_loss(target, labels)
        t0 = time.perf_counter()
        ref = E.reference_sweep(scores, losses, runs=args.reference_runs, size=args.size, clip=args.clip)
        per_run = (time.perf_counter() - t0) / args.reference_runs
        best = min(ours)
        # a sanity check on the numbers, not just the clock: both estimate the same pool risk
        assert abs(estimates[-1].mean() - losses.mean()) < 0.05 and np.isfinite(ref).all()
        print(f"{n:>6}  {best:>9.2f}  {min(cpu):>12.2f}  {compile_s:>11.2f}  {per_run:>17.3f}  "
              f"{per_run * args.runs:>20.0f}  {per_run * args.runs / best:>8.0f}x", flush=True)
    print("ours: wall time of the whole sweep after compilation (best of --repeats); reference: the NumPy "
          "loop's time per run x --runs; speed-up = reference / ours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
