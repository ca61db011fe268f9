"""load_model's choices per backend: the dtype "auto" resolves to, and the fp32 precision rule."""

import jax
import numpy as np

from jaxprobe import runner


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators(monkeypatch, tiny_ckpt):
    assert runner.resolve_dtype("auto") == "float32"  # these tests run on CPU
    assert np.dtype(runner.load_model(tiny_ckpt).dtype) == np.float32
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert runner.resolve_dtype("auto") == "bfloat16"
        assert runner.resolve_dtype("float32") == "float32"  # asked for: kept


def test_fused_attention_is_cudnn_for_half_precision_on_recent_gpus_only():
    import jax.numpy as jnp

    assert runner.default_fused_attention("gpu", jnp.bfloat16, "9.0") == "cudnn"
    assert runner.default_fused_attention("gpu", np.float16, "8.0") == "cudnn"
    assert runner.default_fused_attention("gpu", np.float32, "9.0") is None  # cuDNN has no fp32 kernel
    assert runner.default_fused_attention("gpu", jnp.bfloat16, "7.5") is None  # pre-Ampere
    assert runner.default_fused_attention("cpu", jnp.bfloat16) is None
