"""Benchmark: untruncated 5-shot extraction with and without the shared-prefix key/value cache.

Every `vector-5shot-untruncated` prompt starts with the same instruction + 5 demonstrations
(~430 SmolLM2 tokens) and ends with a different query (<= 128 words). Without the cache the
model runs that prefix again for every prompt; with it the prefix runs once per call and its
keys/values are reused by every batch. Both paths run in this one process on the same prompts,
each once to compile and then timed; the script prints both times, the ratio and the largest
difference between the two results relative to the largest activation (float32 rounding: ~1e-6;
the residual stream reaches a few hundred, so absolute differences are ~1e-4).

    .venv/bin/python scripts/bench_extract_prefix.py            # 24 IMDB test texts, SmolLM2
    .venv/bin/python scripts/bench_extract_prefix.py --n 16 --batch-size 4
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    n: int = 24
    batch_size: int = 8
    split: str = "test"
    dtype: str = "float32"
    warmup: bool = True


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    d = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=d.model, help="(default: %(default)s)")
    parser.add_argument("--n", type=int, default=d.n, help="IMDB texts (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    parser.add_argument("--split", default=d.split, help="IMDB split of the queries (default: %(default)s)")
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="time the first (compiling) run too")
    cfg = BenchConfig(**vars(parser.parse_args()))

    import jax

    import jaxprobe
    from jaxprobe.extract import ExtractConfig, prepare_prompts

    prompts = prepare_prompts(ExtractConfig(out="", dataset="imdb", split=cfg.split, n=cfg.n,
                                            template="vector-5shot-untruncated")).prompts
    lm = jaxprobe.load_model(cfg.model, dtype=cfg.dtype)
    ids = lm.tokenize(prompts)
    n_tokens = sum(len(r) for r in ids)
    # The extract command computes the prefix once per store; it is part of the cached path's time.
    prefix, prefix_seconds = timed(lambda: lm.common_prefix(prompts))
    print(f"model {lm.name} ({cfg.dtype}), {cfg.n} prompts, {n_tokens:,} tokens "
          f"(mean {n_tokens / cfg.n:.0f}), shared prefix {len(prefix)} tokens; batch {cfg.batch_size}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{platform.processor() or platform.machine()}")

    def run(prefix_tokens):
        return lm.activations(prompts, batch_size=cfg.batch_size, prefix_tokens=prefix_tokens)

    results, seconds = {}, {}
    for name, prefix_tokens in (("no cache", None), ("prefix cache", prefix)):
        if cfg.warmup:
            _, compile_seconds = timed(lambda: run(prefix_tokens))
            print(f"  {name:<13} first run (compiles) {compile_seconds:7.2f} s")
        results[name], seconds[name] = timed(lambda: run(prefix_tokens))
    seconds["prefix cache"] += prefix_seconds
    for name, s in seconds.items():
        print(f"  {name:<13} {s:7.2f} s  {n_tokens / s:8,.0f} prompt tokens/s")
    print(f"speed-up of the prefix cache: {seconds['no cache'] / seconds['prefix cache']:.2f}x "
          f"(no cache / cache)")
    diff = float(np.max(np.abs(results["no cache"] - results["prefix cache"])))
    scale = float(np.max(np.abs(results["no cache"])))
    print(f"largest |difference| between the two results: {diff:.2e} "
          f"({diff / scale:.1e} of the largest |activation|, {scale:.0f})")


if __name__ == "__main__":
    main()
