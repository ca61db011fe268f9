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

    with pytest.raises(UserError, match="needs 6 devices"):
        jaxprobe.load_model(sharded_ckpt, mesh_shape=(2, 3))
