"""Sharded runs on 8 host devices (XLA_FLAGS set in conftest) equal the one-device run."""

import os
import subprocess
import sys

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


def _device_count_in_new_process(env_extra, code="import jaxprobe.runner, jax; print(jax.device_count())"):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXPROBE_CPU_DEVICES", "JAX_NUM_CPU_DEVICES")}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_one_cpu_device_per_core_unless_chosen_otherwise():
    from jaxprobe.cpu import CPU_DEVICES_MAX, usable_cores

    assert _device_count_in_new_process({}) == str(min(usable_cores(), CPU_DEVICES_MAX))
    assert _device_count_in_new_process({"JAXPROBE_CPU_DEVICES": "3"}) == "3"
    assert _device_count_in_new_process({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}) == "5"
    assert _device_count_in_new_process({"JAX_NUM_CPU_DEVICES": "4"}) == "4"
    # `import jaxprobe` first, JAX used before the runner module is imported: still one per core
    early = ("import jaxprobe, jax; jax.numpy.ones(1).block_until_ready(); import jaxprobe.runner; "
             "print(jax.device_count())")
    assert _device_count_in_new_process({}, early) == str(min(usable_cores(), CPU_DEVICES_MAX))
    # JAX already running when jaxprobe is imported: its single device stays, nothing fails
    started = "import jax; jax.numpy.ones(1).block_until_ready(); import jaxprobe.runner; print(jax.device_count())"
    assert _device_count_in_new_process({}, started) == "1"
    bad = ("import jaxprobe.runner as rt\ntry:\n    rt.load_model('x')\nexcept rt.UserError as e:\n    print(e)")
    assert _device_count_in_new_process({"JAXPROBE_CPU_DEVICES": "two"}, bad) == \
        "JAXPROBE_CPU_DEVICES='two': expected a positive number of CPU devices"


def test_default_cpu_mesh_holds_as_many_weight_copies_as_fit_in_half_the_memory():
    from jaxprobe.cpu import cpu_data_devices

    gib = 1 << 30
    assert cpu_data_devices(2, gib // 2, 24 * gib) == 2
    assert cpu_data_devices(8, 5 * gib, 24 * gib) == 2   # 12 GiB hold two copies of 5 GiB
    assert cpu_data_devices(8, 52 * gib, 24 * gib) == 1  # too large for even one: still one device


def test_cpu_forward_programs_split_over_every_core_run_eigen_single_threaded(monkeypatch):
    from jaxprobe import cpu

    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)  # the reference CPU, whatever runs the test
    eight, one = make_mesh((8, 1)), make_mesh((1, 1))
    assert cpu.compiler_options(eight, "eigen")["xla_cpu_multi_thread_eigen"] is False
    assert "xla_cpu_multi_thread_eigen" not in cpu.compiler_options(eight, "eigen", rows_split=False)
    assert "xla_cpu_multi_thread_eigen" not in cpu.compiler_options(one, "eigen")
    monkeypatch.setattr(cpu, "usable_cores", lambda: 16)  # fewer devices than cores: Eigen keeps threads
    assert "xla_cpu_multi_thread_eigen" not in cpu.compiler_options(eight, "eigen")
