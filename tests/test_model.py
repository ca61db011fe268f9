"""jaxprobe's Flax model against transformers' PyTorch LlamaForCausalLM on tiny random checkpoints
converted by our converter: every hidden state, the final norm and the logits."""

import numpy as np
import pytest
import torch

import jaxprobe
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
