"""Benchmark: `jaxprobe evaluate`'s 50-shot pass against the reference's way of running it.

The reference evaluates an in-context prompt one at a time (batch size 1 in its notebooks) with
`generate(max_new_tokens=1)`: the whole ~1,200-token prompt through the model for every example,
and logits over the full vocabulary, of which it keeps the K label tokens. `evaluate` tokenises the
prompts whole, runs their shared in-context prefix once (keys/values reused by every batch), batches
the queries by length and computes only the K label logits. Both paths run in this one process on
the same SST-2 prompts, each once to compile and then timed; the script prints both times, the
ratio, and the largest difference between the two results.

    .venv/bin/python scripts/bench_evaluate.py               # 16 SST-2 prompts, 50-shot, SmolLM2
    .venv/bin/python scripts/bench_evaluate.py --n 32 --icl 20
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
    n: int = 16
    icl: int = 50
    batch_size: int = 16
    seed: int = 0


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sst2_prompts(cfg: BenchConfig) -> tuple[list[str], list[int]]:
    """`cfg.n` SST-2 prompts with `cfg.icl` class-proportional examples, as `evaluate` builds them."""
    from jaxprobe.evaluate import EvaluateConfig, LabelledSplit, draw_subsets
    from jaxprobe.prompts import SST2_INSTRUCTION, SST2_LABEL_WORDS, build_prompts, select_icl_examples

    split = LabelledSplit(EvaluateConfig(out=""))
    rows = draw_subsets(split.n_rows, pool_size=cfg.n, test_size=0, icl_candidates=500, seed=cfg.seed)
    chosen = rows["icl_candidates"][select_icl_examples(split.labels(rows["icl_candidates"]), cfg.icl,
                                                        n_classes=2, seed=cfg.seed)]
    examples = [(t, SST2_LABEL_WORDS[y]) for t, y in zip(split.texts(chosen), split.labels(chosen))]
    prompts = build_prompts(split.texts(rows["pool"]), instruction=SST2_INSTRUCTION, answer_word="Label",
                            examples=examples)
    return prompts, split.labels(rows["pool"]).tolist()


def main() -> None:
    d = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=d.model, help="(default: %(default)s)")
    parser.add_argument("--n", type=int, default=d.n, help="SST-2 pool prompts (default: %(default)s)")
    parser.add_argument("--icl", type=int, default=d.icl, help="in-context examples (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    cfg = BenchConfig(**vars(parser.parse_args()))

    import jax

    import jaxprobe
    from jaxprobe.prompts import SST2_LABEL_WORDS, resolve_label_tokens

    prompts, _ = sst2_prompts(cfg)
    lm = jaxprobe.load_model(cfg.model)
    label_ids = resolve_label_tokens(lm.tokenize, prompts[0], SST2_LABEL_WORDS)
    n_tokens = sum(len(r) for r in lm.tokenize(prompts))
    print(f"model {lm.name}, {cfg.n} SST-2 prompts with {cfg.icl} in-context examples, {n_tokens:,} tokens "
          f"(mean {n_tokens / cfg.n:.0f}); label tokens {label_ids}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{platform.processor() or platform.machine()}")

    def ours():
        # what evaluate does per run: the prefix found once on whole prompts, then batches
        prefix = lm.common_prefix(prompts)
        return lm.logits(prompts, token_ids=label_ids, prefix_tokens=prefix, batch_size=cfg.batch_size)

    def reference():
        # one whole prompt per forward pass, full-vocabulary logits, label columns kept afterwards
        return np.concatenate([lm.logits([p], batch_size=1)[:, label_ids] for p in prompts])

    results, seconds = {}, {}
    for name, fn in (("reference (batch 1, no cache, full vocab)", reference),
                     ("evaluate (prefix cache, batches, K logits)", ours)):
        _, compile_seconds = timed(fn)
        results[name], seconds[name] = timed(fn)
        print(f"  {name:<44} {seconds[name]:8.2f} s  ({seconds[name] / cfg.n * 1e3:7.1f} ms per prompt; "
              f"first run {compile_seconds:.2f} s)")
    (ref_name, ref_s), (our_name, our_s) = seconds.items()
    print(f"speed-up of evaluate's pass: {ref_s / our_s:.2f}x (reference / evaluate)")
    diff = float(np.max(np.abs(results[ref_name] - results[our_name])))
    print(f"largest |difference| between the two logit arrays: {diff:.2e}")


if __name__ == "__main__":
    main()
