"""Sharded runs on 8 host devices (XLA_FLAGS set in conftest) equal the one-device run."""


import jax
import numpy as np
import pytest

import jaxprobe
from jaxprobe.sharding import DEFAULT_RULES, make_mesh

TEXTS = ["a charming and often affecting journey", "dull", "the plot was dull and the acting terrible",
         "Sentence: 'it is great' \nLabel:", "one more", "and another text here"]


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory):
    from jaxprobe.testing import tiny_checkpoint

    # 8 heads / 8 KV heads / ffn 128 / vocab 320 all divide by 8, so every rule really shards.
    return tiny_checkpoint(tmp_path_factory.mktemp("sh") / "ckpt", d_model=64, n_heads=8, n_kv_heads=8)


def test_eight_devices_are_visible():
    assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_shape", [(8, 1), (1, 8), (2, 4)])
def test_sharded_equals_single_device(sharded_ckpt, mesh_shape):
    ref = _run(jaxprobe.load_model(sharded_ckpt, mesh_shape=(8, 1)), one_device=True)
    lm = jaxprobe.load_model(sharded_ckpt, mesh_shape=mesh_shape)
    wqkv = lm.state["blocks"]["attn"]["wqkv"][...]  # [layer, embed, kv_heads, qkv, head_dim]
    if mesh_shape[1] > 1:  # weights restored straight into their sharded layout, by whole KV groups
        assert wqkv.sharding.spec[2] == "model"
        assert len(wqkv.addressable_shards) == 8 and wqkv.addressable_shards[0].data.shape[2] == 8 // mesh_shape[1]
    got = _run(lm)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], atol=1e-5, rtol=0)


def _run(lm, one_device=False):
    if one_device:  # the reference: a 1x1 mesh on the first device
        from jaxprobe.testing import on_one_device

        lm = on_one_device(lm)
    return lm.run(TEXTS, all_logits=True, batch_size=8, prefix_tokens=None)


def test_rules_replicate_dimensions_the_mesh_does_not_divide():
    mesh = make_mesh((1, 8))
    assert DEFAULT_RULES.spec(("layer", "embed", "kv_heads", "head_dim"), (2, 64, 3, 16), mesh) == \
        jax.P(None, None, None, None)
    assert DEFAULT_RULES.spec(("layer", "embed", "heads", "head_dim"), (2, 64, 16, 16), mesh) == \
        jax.P(None, None, "model", None)


def test_bad_mesh_shape_is_a_user_error(sharded_ckpt):
    from jaxprobe.errors import UserError

    with pytest.raises(UserError, match="needs 9 devices; 8 are visible"):
        jaxprobe.load_model(sharded_ckpt, mesh_shape=(3, 3))


def test_the_fingerprint_does_not_depend_on_the_mesh(sharded_ckpt):
    """A store started on one mesh resumes on another: the model's identity is exact integer sums of
    its weights' bits, which no sharding changes (float sums do)."""
    prints = {shape: jaxprobe.load_model(sharded_ckpt, mesh_shape=shape).fingerprint
              for shape in [(1, 1), (2, 1), (1, 2), (1, 8), (8, 1), (2, 4)]}
    assert len(set(prints.values())) == 1, prints
    other = jaxprobe.load_model(sharded_ckpt, dtype="bfloat16").fingerprint
    assert other != prints[(1, 1)]  # the same weights in another dtype are another model


def test_weights_per_device_and_the_default_accelerator_mesh():
    """Memory per device as docs/scale.md gives it: Llama-2-70B (GQA, 8 kv heads) in bf16."""
    from jaxprobe.model import LlamaConfig
    from jaxprobe.sharding import accelerator_mesh_shape, replicated_on_model_axis, weight_bytes_per_device

    llama70 = LlamaConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                          head_dim=128, d_ff=28672)
    whole = weight_bytes_per_device(llama70, (1, 1), 2)
    assert whole == 2 * llama70.n_params  # every parameter once, 2 bytes each
    assert weight_bytes_per_device(llama70, (8, 1), 2) == whole  # data replicas hold whole copies
    norms = 2 * (2 * 80 * 8192 + 8192)  # the norms are not split on the model axis
    assert weight_bytes_per_device(llama70, (1, 8), 2) == (whole - norms) // 8 + norms
    assert replicated_on_model_axis(llama70, (1, 8)) == []
    assert "blocks.attn.wqkv (kv_heads 8)" in replicated_on_model_axis(llama70, (1, 16))
    gib = 1 << 30
    assert accelerator_mesh_shape(llama70, 8, 80 * gib, 2) == (2, 4)   # 8 x 80 GB: 4-way model, 2 copies
    assert accelerator_mesh_shape(llama70, 8, 40 * gib, 2) == (1, 8)
    assert accelerator_mesh_shape(llama70, 8, 16 * gib, 2) == (1, 8)   # fits nowhere: all on model
