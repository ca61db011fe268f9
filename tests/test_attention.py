"""The blocked causal attention and the last-position-only block against a plain full-softmax
reference, on shapes that span several query blocks, with padding, GQA and a shared prefix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprobe.model import QUERY_BLOCK, PrefixKV, causal_attention


def reference_attention(q, k, v, valid, prefix=None, query_index=None):
    """Every query against every key it may see, one softmax over the whole row (float64)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, h, hd = q.shape
    t, g = k.shape[1], k.shape[2]
    r = h // g
    query_pos = np.arange(tq)[None].repeat(b, 0) if query_index is None else np.asarray(query_index)
    out = np.zeros_like(q)
    for i in range(b):
        for j in range(tq):
            for head in range(h):
                keys, values = k[i, :, head // r], v[i, :, head // r]
                visible = (np.arange(t) <= query_pos[i, j]) & np.asarray(valid[i])
                if prefix is not None:
                    pk, pv = np.asarray(prefix.k, np.float64), np.asarray(prefix.v, np.float64)
                    keys = np.concatenate([pk[:, head // r], keys])
                    values = np.concatenate([pv[:, head // r], values])
                    visible = np.concatenate([np.ones(len(pk), bool), visible])
                if not visible.any():  # a padding query with nothing to see: left as zeros
                    continue
                scores = np.where(visible, keys @ q[i, j, head], -np.inf)
                weights = np.exp(scores - scores.max())
                out[i, j, head] = weights @ values / weights.sum()
    return out


def random_inputs(b=3, t=2 * QUERY_BLOCK + 11, h=6, g=2, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, hd)).astype(np.float32) / math.sqrt(hd)
    k = rng.standard_normal((b, t, g, hd)).astype(np.float32)
    v = rng.standard_normal((b, t, g, hd)).astype(np.float32)
    lengths = [t, t - 20, 7]  # right padding of 0, 20 and t - 7 keys
    valid = np.arange(t)[None] < np.array(lengths)[:, None]
    return q, k, v, valid, lengths


@pytest.mark.parametrize("with_prefix", [False, True])
def test_blocked_causal_attention_matches_full_softmax(with_prefix):
    q, k, v, valid, lengths = random_inputs()
    prefix = None
    if with_prefix:
        rng = np.random.default_rng(1)
        prefix = PrefixKV(rng.standard_normal((5, 2, 8)).astype(np.float32),
                          rng.standard_normal((5, 2, 8)).astype(np.float32))
    got = np.asarray(jax.jit(causal_attention)(q, k, v, valid, prefix))
    want = reference_attention(q, k, v, valid, prefix)
    for i, n in enumerate(lengths):  # rows past a sequence's end are padding queries: unused
        np.testing.assert_allclose(got[i, :n], want[i, :n], atol=1e-5)


def test_attention_at_query_positions_equals_those_rows_of_the_full_attention():
    q, k, v, valid, lengths = random_inputs()
    query_index = np.array([[n - 1] for n in lengths], np.int32)  # each sequence's last real token
    q_read = np.take_along_axis(q, query_index[:, :, None, None], axis=1)
    got = np.asarray(causal_attention(jnp.asarray(q_read), k, v, valid, None, jnp.asarray(query_index)))
    full = np.asarray(causal_attention(q, k, v, valid))
    np.testing.assert_allclose(got, np.take_along_axis(full, query_index[:, :, None, None], axis=1), atol=1e-6)
    np.testing.assert_allclose(got, reference_attention(q_read, k, v, valid, None, query_index), atol=1e-5)


def test_left_padding_masks_the_leading_keys():
    q, k, v, _, _ = random_inputs(b=1)
    t = q.shape[1]
    valid = np.arange(t)[None] >= 13  # 13 padding keys on the left
    got = np.asarray(causal_attention(q, k, v, valid))
    np.testing.assert_allclose(got[:, 13:], reference_attention(q, k, v, valid)[:, 13:], atol=1e-5)
