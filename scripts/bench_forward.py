#!/usr/bin/env python
"""Last-token activations of every layer: jaxprobe vs HF transformers (PyTorch fp32), same CPU.

IMDB test reviews (their last 200 words, random order), batch 8 and 32. Two comparisons:
  same-work:  identical pre-padded batches (random order, padded to the batch's longest) on both sides;
  realistic:  each side batches the way it does by default (HF: dataset order, pad to longest,
              output_hidden_states=True on the base model; jaxprobe: lm.activations, which sorts
              by length, plans batches for the least padding and few program shapes (the batch
              size in rows at the longest texts, more rows of shorter ones within the same tokens),
              and computes no logits, nor the last block anywhere but the read position).
Prints tokens/s (real tokens), the ratios, and GFLOP/s against a measured fp32 matmul peak, two
ways (see MatmulPeak): the median rate of 2048^2 matmuls sampled between the timed runs
("sustained", the same minutes as the model's medians) and the fastest single one ("best").
Same-work pairs the sides batch by batch (ratio of the median totals); realistic pairs whole runs
(ratio: the median of the per-pair ratios, which cancels drift slower than a pair); tok/s are medians.
Run: .venv/bin/python scripts/bench_forward.py [--model gemma3-270m] [--n 64] [--reps 3] [--threads 2]
(--model: an embedded model, smollm2-135m by default; HF loads the same GGUF with gguf_file=.)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


class MatmulPeak:
    """fp32 n^2 matmul GFLOP/s of torch (MKL) and XLA's oneDNN, Eigen and YNNPACK matmuls, sampled
    (one matmul per library, the order rotating) before, between and after the comparisons.

    Two estimates of the peak come out of the same samples:
      best:      the fastest single matmul of any library, a peak in the strict sense;
      sustained: the best library's median rate over the whole run. This shared CPU's speed drifts
                 by +-20% over minutes, and the model's tok/s are medians over the same minutes, so
                 the fraction of this one compares like with like; the fraction of `best` compares
                 a median with the CPU's luckiest moment.
    """

    def __init__(self, n=2048):
        import jax
        import jax.numpy as jnp
        import torch

        from jaxprobe.cpu import CPU_MATMUL_OPTIONS

        self.n, self.flops = n, 2 * n**3
        a = jnp.ones((n, n), jnp.float32)
        ta = torch.ones((n, n))
        self.sides = {"torch": lambda: ta @ ta}
        for name, options in CPU_MATMUL_OPTIONS.items():
            f = jax.jit(lambda x: x @ x, compiler_options=options)
            self.sides[f"jax-{name}"] = lambda f=f: f(a).block_until_ready()
        for f in self.sides.values():
            f()
        self.rates = {name: [] for name in self.sides}
        self.turn = 0

    def sample(self, times=1):
        for _ in range(times):
            names = list(self.sides)
            self.turn += 1
            for name in names[self.turn % len(names):] + names[: self.turn % len(names)]:
                t = time.perf_counter(); self.sides[name](); t = time.perf_counter() - t
                self.rates[name].append(self.flops / t / 1e9)

    @property
    def best(self):
        return max(max(r) for r in self.rates.values())

    @property
    def sustained(self):
        return max(float(np.median(r)) for r in self.rates.values())

    def describe(self):
        per = ", ".join(f"{k} {max(v):.0f} / {np.median(v):.0f}" for k, v in self.rates.items())
        return (f"fp32 {self.n}^2 matmul, best / median of {len(self.rates['torch'])} samples each: {per}\n"
                f"peak: best {self.best:.0f} GFLOP/s, sustained {self.sustained:.0f} GFLOP/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"],
                    help="embedded model, run by both sides from its GGUF (default %(default)s)")
    ap.add_argument("--n", type=int, default=64, help="number of reviews (default %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions per side (median)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    import jaxprobe
    from jaxprobe.data import load_split
    from jaxprobe.batching import forward_flops, pad_batch
    from jaxprobe.source_paths import embedded_gguf_path
    from jaxprobe.cpu import cpu_matmul_library

    torch.set_num_threads(args.threads)
    ds = load_split("imdb", "test").shuffle(seed=0).select(range(args.n))
    texts = [" ".join(t.split(" ")[-200:]) for t in ds["text"]]

    lm = jaxprobe.load_model(args.model)
    gguf = embedded_gguf_path(args.model)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval().model
    ids = lm.tokenize(texts)
    n_tokens = sum(map(len, ids))
    peak = MatmulPeak()
    peak.sample(10)
    print(f"{args.model}: {args.n} reviews, {n_tokens} tokens (mean {n_tokens / len(ids):.0f}); torch threads {args.threads}; "
          f"jaxprobe mesh {dict(lm.mesh.shape)} of {lm.mesh.devices.flat[0].platform} devices")

    def hf_batch(rows):
        t = max(len(ids[i]) for i in rows)
        x = torch.zeros((len(rows), t), dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for j, i in enumerate(rows):
            x[j, : len(ids[i])] = torch.tensor(ids[i]); mask[j, : len(ids[i])] = 1
        with torch.no_grad():
            hs = hf(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
        last = mask.sum(1) - 1
        return torch.stack([h[torch.arange(len(rows)), last] for h in hs], 1).numpy()

    def hf_batches(batches):
        return [hf_batch(rows) for rows in batches]

    # Same-work compares steady-state compute: jaxprobe runs it with the CPU matmul library a long
    # job gets (lm.activations picks per program shape by its planned work; see runner.py).
    library = cpu_matmul_library(float("inf"))
    program = lm._program(pooling="last", residual=True, all_logits=False, has_ids=False, has_prefix=False,
                          library=library)

    data = lm.mesh.shape["data"]  # on this CPU one device per core, each batch's rows split over them

    def jax_batch(rows):
        rows_ids = [ids[i] for i in rows]
        shape = (-(-len(rows) // data) * data, max(map(len, rows_ids)))  # as HF (rows: whole per device)
        tokens, positions, valid, read = pad_batch(rows_ids, 0, shape)
        return np.asarray(program(lm.state, tokens, positions, valid, read, None, None).residual)[: len(rows)]

    def timed(fn, *a, **k):
        t = time.perf_counter(); r = fn(*a, **k); return time.perf_counter() - t, r

    def paired(fa, fb, reps):
        """Alternate the two sides `reps` times (which goes first alternating too) and return each
        side's median time and the median of the per-pair time ratios b / a: this shared CPU's
        speed drifts by +-20% over minutes, and a pair's two runs see nearly the same drift."""
        ta, tb = [], []
        for r in range(reps):
            for fn, times in [(fa, ta), (fb, tb)][:: -1 if r % 2 else 1]:
                times.append(timed(fn)[0])
            peak.sample(3)
        ratios = np.array(tb) / np.array(ta)
        return float(np.median(ta)), float(np.median(tb)), float(np.median(ratios))

    def paired_per_batch(batches, reps):
        """Same-work timing, paired at the finest grain: each batch runs on both sides back to
        back (which side first alternates), so both see the same drift; per-side totals over
        the batches, median over `reps`."""
        t_jax, t_hf = np.zeros(reps), np.zeros(reps)
        for r in range(reps):
            for k, rows in enumerate(batches):
                sides = [(jax_batch, t_jax), (hf_batch, t_hf)]
                for fn, total in sides[::-1] if (r + k) % 2 else sides:
                    total[r] += timed(fn, rows)[0]
                peak.sample()
        return float(np.median(t_jax)), float(np.median(t_hf))

    rng = np.random.default_rng(0)
    rows = []
    same_flops = 0.0
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        order = rng.permutation(len(ids))
        batches = [order[s:s + bs] for s in range(0, len(order), bs)]
        padded_tokens = sum(len(b) * max(len(ids[i]) for i in b) for b in batches)
        a = [jax_batch(rows) for rows in batches]  # compiles every shape: same-work is steady-state compute
        b = hf_batches(batches)
        t_jax, t_hf = paired_per_batch(batches, args.reps)
        err = max(np.abs(x[:, :-1] - y[:, :-1]).max() / np.abs(y[:, :-1]).max() for x, y in zip(a, b))
        same_flops = sum(forward_flops(lm.config, 1, max(len(ids[i]) for i in bb)) * len(bb) for bb in batches)
        rows.append(("same-work", bs, n_tokens / t_jax, n_tokens / t_hf, same_flops / t_jax / 1e9,
                     same_flops / t_hf / 1e9, f"padding {padded_tokens / n_tokens - 1:.0%}, max rel diff {err:.1e}, {library} matmuls",
                     t_hf / t_jax))

        # realistic: HF in dataset order with pad-to-longest; jaxprobe's own batching, timed once its
        # shapes are compiled in this process (a new process still traces each shape and loads it from
        # the disk cache, 0.15-0.5 s a shape; the first run's rate, compilation included, is printed)
        hf_default = [np.arange(s, min(s + bs, len(ids))) for s in range(0, len(ids), bs)]
        t_first, _ = timed(lm.activations, texts, batch_size=bs)
        t_jax, t_hf, ratio = paired(lambda: lm.activations(texts, batch_size=bs), lambda: hf_batches(hf_default),
                                    args.reps)
        useful = sum(forward_flops(lm.config, 1, len(r)) for r in ids)
        rows.append(("realistic", bs, n_tokens / t_jax, n_tokens / t_hf, useful / t_jax / 1e9, useful / t_hf / 1e9,
                     f"ratio of medians {t_hf / t_jax:.2f}x; jaxprobe first run incl. compile "
                     f"{n_tokens / t_first:.0f} tok/s", ratio))

    peak.sample(10)
    print(peak.describe())
    print(f"\n{'comparison':10s} {'batch':>5s} {'jaxprobe tok/s':>15s} {'HF tok/s':>9s} {'ratio':>6s} "
          f"{'jax GFLOP/s':>11s} {'% sustained':>11s} {'% best':>6s} {'HF GFLOP/s':>10s}  notes")
    for name, bs, tj, th, gj, gh, note, ratio in rows:
        print(f"{name:10s} {bs:5d} {tj:15.0f} {th:9.0f} {ratio:5.2f}x {gj:11.0f} {gj / peak.sustained:11.0%} "
              f"{gj / peak.best:6.0%} {gh:10.0f}  {note}")


if __name__ == "__main__":
    main()
