"""How lm.run splits texts into batches: every text once, longest first, batch_size rows at the
longest texts and no more tokens than that (or MIN_BATCH_TOKENS) in a batch of shorter ones, and
never more padded work than fixed-size batches of the length-sorted texts; the cheapest such
split once each new batch shape costs its compilation; and how it picks each batch shape's CPU
matmul library from the work planned for it."""

import itertools

import numpy as np
import pytest

from jaxprobe import batching
from jaxprobe.model import LlamaConfig
from jaxprobe.batching import (BATCH_OVERHEAD_TOKENS, MAX_ROWS_FACTOR, MIN_BATCH_TOKENS, batch_row_counts,
                               bucket_length, forward_flops, padded_rows, plan_batches,
                               shape_overhead_tokens)


def planned_cost(lengths, batches, batch_size, multiple=1, shape_tokens=0.0):
    """The planner's objective: padded work, a fixed cost per batch, and shape_tokens for each batch
    whose (rows, length) differs from the batch before it."""
    total, previous = 0.0, None
    for b in batches:
        shape = (padded_rows(len(b), batch_size, multiple), bucket_length(max(lengths[i] for i in b)))
        total += BATCH_OVERHEAD_TOKENS + shape[0] * shape[1] + (shape_tokens if shape != previous else 0)
        previous = shape
    return total


def allowed(lengths, batch, batch_size):
    """Whether the planner may run `batch`: at most MAX_ROWS_FACTOR x batch_size texts, and more
    than batch_size rows only within the token budget of batch_size rows of the longest text."""
    if len(batch) > MAX_ROWS_FACTOR * batch_size:
        return False
    rows = padded_rows(len(batch), batch_size)
    budget = max(batch_size * bucket_length(max(lengths)), MIN_BATCH_TOKENS)
    return rows <= batch_size or rows * bucket_length(lengths[batch[0]]) <= budget


@pytest.mark.parametrize("batch_size", [1, 3, 8, 32])
def test_plan_covers_every_text_once_within_the_token_budget(batch_size):
    lengths = list(np.random.default_rng(batch_size).integers(1, 400, size=97))
    batches = plan_batches(lengths, batch_size)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) >= 1 and allowed(lengths, b, batch_size)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # longest first: memory trouble shows at once
    fixed = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    fixed = [fixed[s:s + batch_size] for s in range(0, len(fixed), batch_size)]
    assert planned_cost(lengths, batches, batch_size) <= planned_cost(lengths, fixed, batch_size)


def test_a_long_outlier_is_not_padded_into_a_batch_of_short_texts():
    lengths = [300] + [40] * 15
    batches = plan_batches(lengths, 16)
    assert batches[0] == [0]
    assert sorted(len(b) for b in batches) == [1, 15]


def test_short_texts_share_batches_up_to_the_longest_texts_tokens():
    lengths = [300] * 8 + [30] * 100  # 8 x 320 padded tokens: 64 rows of 32 fit (80 would)
    batches = plan_batches(lengths, 8)
    assert [len(b) for b in batches] == [8, 64, 32, 4]  # 36 left: 32 + 4 rows pad less than 64


def test_short_texts_alone_share_batches_up_to_the_floor():
    batches = plan_batches([20] * 200, 8)  # 8 x 24 tokens is tiny: the floor lets 64 rows run at once
    assert [len(b) for b in batches] == [64, 64, 64, 8]
    assert 64 * bucket_length(20) <= MIN_BATCH_TOKENS


def test_a_shared_prefix_counts_in_every_rows_tokens():
    # with 466 prefix tokens a row of 24 costs 490: batch_size rows of the longest are the budget
    batches = plan_batches([20] * 200, 8, prefix_length=466)
    assert all(len(b) <= 8 for b in batches)


def test_the_plan_is_the_cheapest_split_counting_each_new_shape():
    rng = np.random.default_rng(0)
    for _ in range(150):
        n, batch_size = int(rng.integers(1, 11)), int(rng.choice([1, 2, 3, 4]))
        pool = rng.choice([10, 30, 60, 100, 120, 150, 250], size=2) if rng.random() < 0.5 else np.arange(1, 260)
        lengths = [int(x) for x in rng.choice(pool, size=n)]
        shape_tokens = float(rng.choice([0, 50, 300, 1000]))
        plan = plan_batches(lengths, batch_size, shape_tokens=shape_tokens)
        assert sorted(i for b in plan for i in b) == list(range(n))
        order = sorted(range(n), key=lambda i: -lengths[i])
        best = np.inf  # every split of the length-sorted texts into consecutive batches
        for cuts in itertools.product([False, True], repeat=n - 1):
            edges = [0] + [k + 1 for k, c in enumerate(cuts) if c] + [n]
            split = [order[a:b] for a, b in zip(edges, edges[1:])]
            if all(allowed(lengths, b, batch_size) for b in split):
                best = min(best, planned_cost(lengths, split, batch_size, shape_tokens=shape_tokens))
        assert planned_cost(lengths, plan, batch_size, shape_tokens=shape_tokens) == best, (lengths, batch_size, shape_tokens)


def test_a_new_batch_shape_costs_its_compilation():
    lengths = [120] * 5
    assert [len(b) for b in plan_batches(lengths, 4)] == [4, 1]  # least padding: 4 + 1 rows
    assert [len(b) for b in plan_batches(lengths, 4, shape_tokens=300)] == [5]  # one program: 8 rows
    cfg = LlamaConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                      d_ff=1536, tie_embeddings=True)  # SmolLM2-135M: a shape is worth ~140 tokens
    assert 100 < shape_overhead_tokens(cfg) < 200


def test_row_counts_are_halvings_and_doublings_rounded_to_the_data_axis():
    assert batch_row_counts(32) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert batch_row_counts(8, 4) == [4, 8, 16, 32, 64]
    assert batch_row_counts(6, 4) == [4, 8, 12, 24, 48]
    assert [padded_rows(k, 8) for k in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert plan_batches([], 8) == []


def test_forward_flops_counts_weights_and_causal_attention():
    cfg = LlamaConfig(vocab_size=10, d_model=4, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=2, d_ff=8)
    weights = 4 * 2 * (2 * 2 + 2 * 1) + 3 * 4 * 8  # q, o: 2 heads; k, v: 1 head; gate, up, down
    attention = 2 * 2 * 2 * 3 * 4 / 2               # 3 tokens see 1 + 2 + 3 keys
    assert forward_flops(cfg, 5, 3) == 2 * 5 * (2 * weights * 3 + 2 * attention)


def test_larger_batches_of_short_texts_give_each_texts_own_numbers(tiny_ckpt, monkeypatch):
    import jaxprobe
    from jaxprobe.testing import on_one_device

    lm = on_one_device(jaxprobe.load_model(tiny_ckpt))  # so that batch_size 1 means one text a batch
    texts = [f"review {i}: " + "good " * (i % 7) for i in range(40)] + ["a much longer review " * 12]
    lengths = [len(r) for r in lm.tokenize(texts)]
    assert max(len(b) for b in plan_batches(lengths, 2)) == 16  # short texts share batches beyond batch_size
    together = lm.run(texts, all_logits=True, batch_size=2)
    monkeypatch.setattr(batching, "MAX_ROWS_FACTOR", 1)
    monkeypatch.setattr(batching, "MIN_BATCH_TOKENS", 0)
    assert max(len(b) for b in plan_batches(lengths, 1)) == 1
    alone = lm.run(texts, all_logits=True, batch_size=1)
    for key in ("activations", "logits"):
        np.testing.assert_allclose(together[key], alone[key], atol=1e-5, rtol=0)
