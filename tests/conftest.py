"""Test set-up: 8 host devices for the sharding tests (must precede the first JAX import), offline
HF, and session fixtures of tiny models (builders in jaxprobe/testing.py)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_variant_models(tmp_path_factory):
    """name -> (torch model, HF folder, converted jaxprobe checkpoint folder)."""
    from jaxprobe.convert import convert
    from jaxprobe.testing import HF_VARIANTS, make_hf_model

    out = {}
    for name, overrides in HF_VARIANTS.items():
        root = tmp_path_factory.mktemp(name)
        model = make_hf_model(root / "hf", **overrides)
        convert(root / "hf", root / "ckpt", progress=False)
        out[name] = (model, root / "hf", root / "ckpt")
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from jaxprobe.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")
