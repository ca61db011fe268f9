"""Test set-up: 8 host devices for the sharding tests (must precede the first JAX import), offline
HF, and shared builders for tiny random HF models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# HF tiny-model variants the parity tests run over.
HF_VARIANTS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}),
}


def make_hf_model(folder, *, seed=0, **overrides):
    """A tiny random transformers LlamaForCausalLM saved with save_pretrained (+ a tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxprobe.testing import tiny_tokenizer

    kwargs = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                  max_position_embeddings=512, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # norms away from 1 so that their weights are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tiny_tokenizer(kwargs["vocab_size"]).save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def hf_variant_models(tmp_path_factory):
    """name -> (torch model, HF folder, converted jaxprobe checkpoint folder)."""
    from jaxprobe.convert import convert

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
