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
