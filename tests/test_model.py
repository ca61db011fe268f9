"""jaxprobe's Flax model against transformers' PyTorch LlamaForCausalLM on tiny random checkpoints
converted by our converter: every hidden state, the final norm and the logits; and the blocked
causal attention and the last-position-only block against a plain full-softmax reference, on
shapes that span several query blocks, with padding, GQA and a shared prefix."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxprobe
from jaxprobe.model import QUERY_BLOCK, PrefixKV, causal_attention, fused_causal_attention
from jaxprobe.testing import HF_VARIANTS

TEXTS = [
    "This movie was wonderful, a charming and often affecting journey.",
    "dull",
    "The plot was dull and the acting was terrible; I wanted my money back. " * 3,
    "Sentence: 'it is a great film' \nLabel:",
]


def hf_reference(model, ids):
    """HF hidden states of one unpadded sequence: [L+1, T, D] with the LAST entry replaced by the
    raw output of the last block (HF applies the final norm there), plus final-normed and logits."""
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    last_block = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
    hs = [h[0].numpy() for h in out.hidden_states]
    normed = hs[-1]
    hs[-1] = last_block[0].numpy()
    return np.stack(hs), normed, out.logits[0].numpy()


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_every_hidden_state_and_logits_match_hf(hf_variant_models, variant):
    model, _, ckpt = hf_variant_models[variant]
    lm = jaxprobe.load_model(ckpt)
    res = lm.run(TEXTS, activations=True, all_logits=True, batch_size=4)  # one padded batch
    mean = lm.activations(TEXTS, positions="mean", batch_size=3)
    for i, ids in enumerate(lm.tokenize(TEXTS)):
        hs, normed, logits = hf_reference(model, ids)
        np.testing.assert_allclose(res["activations"][i], hs[:, -1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["final_norm"][i], normed[-1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["logits"][i], logits[-1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(mean[i], hs.mean(axis=1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("library", ["onednn", "eigen", "ynnpack"])
def test_every_cpu_matmul_library_matches_hf(hf_variant_models, library, monkeypatch):
    """The forward programs pick a CPU matmul library per shape; each must give HF's numbers."""
    monkeypatch.setenv("JAXPROBE_CPU_MATMUL", library)
    model, _, ckpt = hf_variant_models["gqa-tied"]
    lm = jaxprobe.load_model(ckpt)
    res = lm.run(TEXTS, activations=True, all_logits=True, batch_size=4)
    for i, ids in enumerate(lm.tokenize(TEXTS)):
        hs, _, logits = hf_reference(model, ids)
        np.testing.assert_allclose(res["activations"][i], hs[:, -1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["logits"][i], logits[-1], atol=1e-4, rtol=0)


def test_label_token_logits_are_the_full_logits_restricted(hf_variant_models):
    _, _, ckpt = hf_variant_models["gqa-tied"]
    lm = jaxprobe.load_model(ckpt)
    full = lm.logits(TEXTS)
    ids = [5, 17, 300]
    np.testing.assert_allclose(lm.logits(TEXTS, token_ids=ids), full[:, ids], atol=1e-5)


def test_text_alone_equals_text_in_padded_batch(tiny_ckpt):
    lm = jaxprobe.load_model(tiny_ckpt)
    batch = lm.activations(TEXTS, batch_size=4)
    for i, text in enumerate(TEXTS):
        alone = lm.activations([text])
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5, rtol=0)


def test_left_padding_with_explicit_positions_equals_right_padding(tiny_ckpt):
    """The forward itself supports either padding side: positions and the read index are explicit."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxprobe.model import forward

    lm = jaxprobe.load_model(tiny_ckpt)
    model = nnx.merge(lm.graphdef, lm.state)
    ids = lm.tokenize(TEXTS[:2])
    t = max(map(len, ids)) + 3
    right = np.zeros((2, t), np.int32); left = np.zeros((2, t), np.int32)
    rvalid = np.zeros((2, t), bool); lvalid = np.zeros((2, t), bool)
    rpos = np.tile(np.arange(t), (2, 1)); lpos = np.zeros((2, t), np.int64)
    for j, r in enumerate(ids):
        right[j, :len(r)] = r; rvalid[j, :len(r)] = True
        left[j, t - len(r):] = r; lvalid[j, t - len(r):] = True
        lpos[j, t - len(r):] = np.arange(len(r))
    a = forward(model, jnp.asarray(right), jnp.asarray(rpos), jnp.asarray(rvalid),
                jnp.asarray([len(r) - 1 for r in ids]), all_logits=True)
    b = forward(model, jnp.asarray(left), jnp.asarray(lpos), jnp.asarray(lvalid),
                jnp.asarray([t - 1, t - 1]), all_logits=True)
    np.testing.assert_allclose(np.asarray(a.residual), np.asarray(b.residual), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-5)


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_shared_prefix_cache_gives_the_same_numbers(tiny_ckpt, positions):
    lm = jaxprobe.load_model(tiny_ckpt)
    prefix = "Classify the sentiment of the text.\nText: This movie was wonderful.\nSentiment: positive\nText: "
    prompts = [prefix + t for t in TEXTS]
    shared = lm.common_prefix(prompts)
    assert len(shared) > 10
    plain = lm.run(prompts, positions=positions, token_ids=[1, 2, 3], batch_size=2)
    cached = lm.run(prompts, positions=positions, token_ids=[1, 2, 3], batch_size=2, prefix_tokens=shared)
    for key in ("activations", "logits"):
        np.testing.assert_allclose(cached[key], plain[key], atol=1e-5, rtol=0)


def test_bfloat16_weights_stay_close_to_fp32(tiny_ckpt):
    a = jaxprobe.load_model(tiny_ckpt).activations(TEXTS)
    b = jaxprobe.load_model(tiny_ckpt, dtype="bfloat16").activations(TEXTS)
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
    assert rel.max() < 0.05


def test_max_length_keeps_the_last_tokens(tiny_ckpt):
    lm = jaxprobe.load_model(tiny_ckpt)
    ids = lm.tokenize([TEXTS[2]])[0]
    cut = lm.tokenizer.decode(ids[-20:])
    assert lm.tokenize([cut])[0] == ids[-20:]  # decodes back to the same tokens
    np.testing.assert_allclose(lm.activations([TEXTS[2]], max_length=20), lm.activations([cut]), atol=1e-5)


# ---------------------------------------------------------------- attention

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


@pytest.mark.parametrize("window", [None, 9])
def test_fused_attention_matches_the_blocked_one(window):
    """jax.nn.dot_product_attention (its XLA kernel here; cuDNN's on a GPU takes the same
    arguments) on right-padded rows, with and without a sliding window."""
    q, k, v, valid, lengths = random_inputs()
    blocked = np.asarray(causal_attention(q, k, v, valid, window=window))
    fused = np.asarray(jax.jit(fused_causal_attention, static_argnums=(4, 5))(q, k, v, valid, window, "xla"))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(fused[i, :n], blocked[i, :n], atol=1e-5)
    if window is None:
        np.testing.assert_allclose(fused[0], reference_attention(q, k, v, valid)[0], atol=1e-5)


@pytest.mark.parametrize("variant", ["gqa-tied", "mistral-window-8", "gemma3-interleaved"])
def test_models_with_fused_attention_match_hf(hf_variant_models, variant):
    """The runner's path with a fused kernel (GPU default in bf16): where it does not apply
    (Gemma 3's per-layer windows, the last block's read position) the blocked one runs."""
    model, _, ckpt = hf_variant_models[variant]
    lm = jaxprobe.load_model(ckpt)
    lm.fused_attention = "xla"
    res = lm.run(TEXTS, activations=True, all_logits=True, batch_size=4)
    for i, ids in enumerate(lm.tokenize(TEXTS)):
        hs, _, logits = hf_reference(model, ids)
        np.testing.assert_allclose(res["activations"][i], hs[:, -1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["logits"][i], logits[-1], atol=1e-4, rtol=0)


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


@pytest.mark.parametrize("variant", ["gemma-gqa-head-dim", "gemma2-softcap", "gemma3-interleaved", "mistral-window-8", "phi-partial-rotary", "qwen2-gqa-bias",
                                     "qwen3-gqa-qk-norm"])
def test_prefix_cache_and_label_logits_per_family(hf_variant_models, variant):
    """The families' extra parameters (q/k/v biases, q/k norms) enter the cached prefix's keys and
    the query-only last block as they enter the full pass."""
    model, _, ckpt = hf_variant_models[variant]
    lm = jaxprobe.load_model(ckpt)
    texts = ["Sentence: 'it is a great film' \nLabel: positive\n\nSentence: " + t for t in ("dull", "a charming film", "fun")]
    whole = lm.run(texts, activations=True, all_logits=True)
    cached = lm.run(texts, activations=True, all_logits=True, prefix_tokens="auto")
    np.testing.assert_allclose(cached["activations"], whole["activations"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(cached["logits"], whole["logits"], atol=2e-5, rtol=0)
    ids = [7, 11, 300]
    np.testing.assert_allclose(lm.logits(texts, token_ids=ids, prefix_tokens="auto"), whole["logits"][:, ids],
                               atol=2e-5, rtol=0)
    hf_logits = hf_reference(model, lm.tokenize(texts[:1])[0])[2][-1]
    np.testing.assert_allclose(whole["logits"][0], hf_logits, atol=1e-4, rtol=0)
