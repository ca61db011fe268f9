"""Length buckets and the batch planner: how texts of many lengths are cut into a few padded batch
shapes (fewer shapes, fewer programs to compile; less padding, less wasted work)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: planning needs no JAX
    from jaxprobe.model import LlamaConfig


def forward_flops(cfg: LlamaConfig, rows: int, length: int) -> float:
    """Matmul FLOPs of one forward pass over a [rows, length] batch (blocks only, causal attention)."""
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    weights = d * hd * (2 * h + 2 * kv) + 3 * d * f
    attention = 2 * h * hd * length * (length + 1) / 2  # QK^T and PV over the visible keys
    return cfg.n_layers * rows * (2 * weights * length + 2 * attention)


def bucket_length(n: int) -> int:
    """Pad lengths to a coarse grid (multiples of 8 up to 64, of 16 up to 128, then ~12% steps) so
    a run over varied lengths compiles a handful of shapes, with little padding."""
    n = int(n)
    if n <= 64:
        return max(8, -(-n // 8) * 8)
    if n <= 128:
        return -(-n // 16) * 16
    step = 1 << max(4, (n // 8).bit_length() - 1)
    return -(-n // step) * step


# What one more batch costs beyond its tokens, in tokens: a forward pass copies every layer's
# weights out of the stacked arrays once whatever the batch, and oneDNN also reorders each weight
# on every call. For SmolLM2 on the reference CPU a fit over 11 batch shapes gives 87 ms (Eigen)
# to 133 ms (oneDNN) a batch at 0.90 ms a token: 96-147 tokens' worth.
BATCH_OVERHEAD_TOKENS = 128


# What one more batch shape costs a run beyond its batches: a program to trace, lower and load from
# XLA's disk cache (0.15-0.5 s a shape for SmolLM2 here) or, the first time, to compile (about 2.2
# s). The planner counts the low end, 0.15 s of forward work at about 200 GFLOP/s, in FLOPs so
# that it weighs little against a large model's tokens: about 140 tokens of SmolLM2, 1 of a 13B
# model. Twice that also merged batches of different lengths and ran the warm forward benchmark's
# batch-8 job 3-5% slower (two runs of 5 and 8 alternating pairs); this much, 0.976x (6 pairs).
SHAPE_OVERHEAD_FLOPS = 3e10
# On accelerators a new shape costs more time and far more work: on an H200, a 64-text run of a
# 1B-shaped model took 10.7 s the first time (its few shapes compiled) against 0.13 s warm
# (docs/performance.md), i.e. seconds a shape, counted here as 2 s of 100 TFLOP/s.
SHAPE_OVERHEAD_FLOPS_BY_BACKEND = {"cpu": SHAPE_OVERHEAD_FLOPS, "gpu": 2e14, "tpu": 2e14}


def shape_overhead_tokens(cfg: LlamaConfig, backend: str = "cpu") -> float:
    """What one more batch shape costs on `backend`, in tokens of this model's forward pass."""
    flops = SHAPE_OVERHEAD_FLOPS_BY_BACKEND.get(backend, SHAPE_OVERHEAD_FLOPS_BY_BACKEND["gpu"])
    return flops / forward_flops(cfg, 1, 1)


# A batch of texts shorter than the run's longest may hold more than batch_size rows: as many as
# fit in the tokens of batch_size rows at the longest text's bucketed length, or in
# MIN_BATCH_TOKENS, whichever is more (with a shared prefix, every row counts it too), and at most
# MAX_ROWS_FACTOR x batch_size. Short texts then run in larger matmuls and fewer batches pay the
# fixed cost: SST-2 validation (24 tokens a sentence) at batch size 8 runs in 21 batches instead of
# 109, 1.33x faster (median of 4 alternating pairs), activations within 1e-7 of their norm.
# 2,048 tokens is far below what a batch of long texts needs, for any model this runs.
MAX_ROWS_FACTOR = 8


MIN_BATCH_TOKENS = 2048


def batch_row_counts(batch_size: int, multiple: int = 1) -> list[int]:
    """The row counts a batch may have: batch_size, its halves and its doublings up to
    MAX_ROWS_FACTOR x batch_size (a few compiled shapes, not one per remainder), each rounded up
    to a multiple of the data axis."""
    counts = {max(1, batch_size >> k) for k in range(batch_size.bit_length())}
    counts |= {batch_size << k for k in range(1, MAX_ROWS_FACTOR.bit_length())}
    return sorted({-(-c // multiple) * multiple for c in counts})


def padded_rows(n_texts: int, batch_size: int, multiple: int = 1) -> int:
    """The rows a batch of n_texts texts is padded to: the least allowed row count that holds them."""
    return min(c for c in batch_row_counts(batch_size, multiple) if c >= n_texts)


def plan_batches(lengths: Sequence[int], batch_size: int, multiple: int = 1, prefix_length: int = 0,
                 overhead_tokens: float = BATCH_OVERHEAD_TOKENS, shape_tokens: float = 0.0) -> list[list[int]]:
    """Split texts (by token count) into batches, longest first, with the least padded work: cuts
    between length-sorted texts are chosen by dynamic programming to minimise the sum over batches
    of overhead_tokens + rows * bucket_length(longest), plus shape_tokens for every batch whose
    shape (rows, length) differs from the batch before it (a program to trace and load or compile;
    see `SHAPE_OVERHEAD_FLOPS`). A batch's rows are one of `batch_row_counts`, so unused rows count
    as padding too. A batch holds at most batch_size texts (rounded up to the data axis), or more
    while rows * (its length + prefix_length) stays within the token budget (see
    `MIN_BATCH_TOKENS`), so no batch needs much more memory than the first. Returns lists of
    indices into `lengths`."""
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    counts = batch_row_counts(batch_size, multiple)
    plain_rows = padded_rows(batch_size, batch_size, multiple)  # batch_size rows, as the data axis pads them
    rows_for = np.array([0] + [padded_rows(k, batch_size, multiple) for k in range(1, counts[-1] + 1)])
    count_index = np.searchsorted(counts, rows_for)  # which of `counts` k texts are padded to
    padded_length = np.array([bucket_length(lengths[i]) for i in order] + [0])
    budget = max(batch_size * (padded_length[0] + prefix_length), MIN_BATCH_TOKENS)
    # best[j]: least cost of the first j sorted texts, cut[j] where its last batch starts and
    # new[j] whether that batch's shape was new. best_same[j, c]: the same, among plans whose last
    # batch has counts[c] rows and the length of text j's bucket, so a batch starting at text j
    # can have its shape for free (lengths are sorted: a shape can only recur in a row).
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=int)
    new = np.ones(n + 1, dtype=bool)
    best_same = np.full((n + 1, len(counts)), np.inf)
    cut_same = np.zeros((n + 1, len(counts)), dtype=int)
    new_same = np.ones((n + 1, len(counts)), dtype=bool)
    for j in range(1, n + 1):
        k = np.arange(1, min(counts[-1], j) + 1)
        i = j - k  # the batch of sorted texts i..j-1, whose longest is text i
        rows, length, c = rows_for[k], padded_length[i], count_index[k]
        fits = (rows <= plain_rows) | (rows * (length + prefix_length) <= budget)
        as_new, as_same = best[i] + shape_tokens, best_same[i, c]
        is_new = as_new <= as_same
        cost = np.where(fits, np.minimum(as_new, as_same) + overhead_tokens + rows * length, np.inf)
        m = int(np.argmin(cost))  # among equal costs, the fewest texts
        best[j], cut[j], new[j] = cost[m], i[m], is_new[m]
        # the cheapest plan per row count among those whose last batch the next text's may repeat
        match = np.flatnonzero((length == padded_length[j]) & fits)
        if match.size:
            match = match[np.argsort(cost[match], kind="stable")]
            c_match, first = np.unique(c[match], return_index=True)
            win = match[first]
            best_same[j, c_match], cut_same[j, c_match], new_same[j, c_match] = cost[win], i[win], is_new[win]
    batches, j, same = [], n, None  # same: the row-count index the batch ending at j must have
    while j > 0:
        i, is_new = (cut[j], new[j]) if same is None else (cut_same[j, same], new_same[j, same])
        batches.append(order[i:j])
        same = None if is_new else int(count_index[j - i])
        j = int(i)
    return batches[::-1]


def longest_common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return list(first[:n])


def readable_prefix(ids: Sequence[Sequence[int]]) -> list[int]:
    """The common prefix, cut so that every sequence keeps at least one token after it."""
    if not ids:
        return []
    return longest_common_prefix(ids)[: max(0, min(len(r) for r in ids) - 1)]


def pad_batch(rows: list[list[int]], offset: int, shape: tuple[int, int] | None = None):
    """Right-pad a batch to shape (n_rows, length), filler rows after the real ones; by default
    the rows as they are and the bucketed length of the longest.

    Returns tokens, positions, valid, read_index (int32/bool numpy arrays)."""
    b, t = shape or (len(rows), bucket_length(max(len(r) for r in rows)))
    tokens = np.zeros((b, t), np.int32)
    valid = np.zeros((b, t), bool)
    lengths = np.ones((b,), np.int32)
    for j, r in enumerate(rows):
        tokens[j, : len(r)] = r
        valid[j, : len(r)] = True
        lengths[j] = len(r)
    valid[len(rows):, 0] = True  # filler rows: one real token so nothing is empty
    positions = np.broadcast_to(np.arange(offset, offset + t, dtype=np.int32), (b, t)).copy()
    return tokens, positions, valid, lengths - 1
