"""Tiny random models, tokenizers and data for tests, no network (`make_hf_model` needs torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxprobe.model import LlamaConfig, RopeScaling, param_shapes

_CORPUS = [
    "This movie was wonderful, a charming and often affecting journey.",
    "The plot was dull and the acting was terrible; I wanted my money back.",
    "Classify the sentiment of the text. Text: Sentiment: positive negative",
    "Sentence: 'it is a great film' \nLabel: positive\n\n",
    "A review of the film, with some words and some punctuation!? 0123456789",
] * 4


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (GPT-2 style, like SmolLM2's) trained on a few sentences; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_config(*, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2,
                d_ff: int = 128, vocab_size: int = 320, tie_embeddings: bool = False,
                llama3_rope: bool = False) -> LlamaConfig:
    scaling = RopeScaling(8.0, 1.0, 4.0, 64) if llama3_rope else None
    return LlamaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=d_model // n_heads, d_ff=d_ff, rms_eps=1e-5,
                       rope_theta=10000.0, rope_scaling=scaling, tie_embeddings=tie_embeddings,
                       max_position=512)


def tiny_checkpoint(path, *, seed: int = 0, **config) -> Path:
    """Write a random tiny model (a jaxprobe checkpoint folder) and return its path."""
    from jaxprobe.checkpoint import save_checkpoint

    cfg = tiny_config(**config)
    rng = np.random.default_rng(seed)
    params = {}
    for p, shape in param_shapes(cfg).items():
        if p[-1] == "weight" and p[-2].endswith("norm"):
            params[p] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            params[p] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(cfg.vocab_size).save_pretrained(path / "tokenizer")
    save_checkpoint(path, cfg, params, source={"kind": "random", "seed": seed, "dtype": "float32"})
    return path


def on_one_device(lm):
    """The same loaded model on a 1 x 1 mesh of the first device (a reference that ignores the
    visible device count: with 8 host devices the default mesh pads every batch to 8 rows)."""
    import jax
    from flax import nnx

    from jaxprobe.runner import LanguageModel
    from jaxprobe.sharding import make_mesh

    mesh = make_mesh((1, 1))
    model = nnx.merge(lm.graphdef, jax.device_put(lm.state, jax.devices()[0]))
    return LanguageModel(model, lm.tokenizer, name=lm.name, mesh=mesh)


def tiny_job(root: Path, model, n_rows: int, seed: int) -> dict:
    """What a command-line test needs: {"root", "model", "data"} with a tiny labelled data set."""
    data = write_tiny_dataset(Path(root) / "data.parquet", n_rows, seed=seed)
    return {"root": Path(root), "model": str(model), "data": str(data)}


def write_tiny_dataset(path: Path, n_rows: int, seed: int, n_classes: int = 2) -> Path:
    """A labelled parquet file of short sentences (trailing spaces, as SST-2 has) in the tiny
    tokenizer's words; labels 0..n_classes-1 are random, so a random model is as good as anything."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(_TINY_WORDS, rng.integers(2, 6))) + " " for _ in range(n_rows)]
    pd.DataFrame({"text": texts, "label": rng.integers(0, n_classes, n_rows)}).to_parquet(path)
    return path


_TINY_WORDS = "the film was a great charming dull terrible movie plot acting good fun".split()


# Label words that are one token each after "...:" for the tiny tokenizer (" A" is a space then "A").
TINY_LABEL_WORDS = ("positive", "film", "was", "the")


def write_tiny_choices(path: Path, n_rows: int, seed: int, n_subjects: int = 3) -> Path:
    """A multiple-choice parquet file laid out as data/mmlu_*.parquet (question, subject, choices
    of four, answer 0-3), in the tiny tokenizer's words; answers are random."""
    import pandas as pd

    rng = np.random.default_rng(seed)

    def words(k):
        return " ".join(rng.choice(_TINY_WORDS, k))

    pd.DataFrame({"question": [words(rng.integers(2, 5)) + "?" for _ in range(n_rows)],
                  "subject": [f"subject_{rng.integers(n_subjects)}" for _ in range(n_rows)],
                  "choices": [[words(rng.integers(1, 3)) for _ in range(4)] for _ in range(n_rows)],
                  "answer": rng.integers(0, 4, n_rows)}).to_parquet(path)
    return path


# HF tiny-model variants the parity tests run over.
HF_VARIANTS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}),
    "mistral-window-8": dict(family="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                             tie_word_embeddings=False),
    "gemma-gqa-head-dim": dict(family="gemma", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma2-softcap": dict(family="gemma2", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                           final_logit_softcapping=3.0),
    "gemma3-interleaved": dict(family="gemma3_text", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                            "full_attention"]),
    "phi-partial-rotary": dict(family="phi", num_attention_heads=4, num_key_value_heads=4, layer_norm_eps=1e-5),
    "qwen2-gqa-bias": dict(family="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3-gqa-qk-norm": dict(family="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                              tie_word_embeddings=True),
}


def make_hf_model(folder, *, seed=0, family="llama", **overrides):
    """A tiny random transformers causal LM of `family` (its own config class) saved with
    save_pretrained, plus a tokenizer. Norm weights and biases are moved away from their init
    (1 and 0) so that they are tested."""
    import torch
    import transformers

    config_class = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                    "qwen3": "Qwen3Config", "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "phi": "PhiConfig",
                    "gemma3_text": "Gemma3TextConfig"}[family]
    kwargs = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                  max_position_embeddings=512, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tiny_tokenizer(kwargs["vocab_size"]).save_pretrained(folder)
    return model


def hf_last_token(model, ids) -> tuple[np.ndarray, np.ndarray]:
    """A transformers causal LM run on one row of token ids: its last-token residual stream as
    jaxprobe's hook points index it ([n_layers + 1, d]: the embeddings, then each block's output,
    the last one before the final norm that HF's hidden_states[-1] has applied), and its logits."""
    import torch

    captured = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: captured.__setitem__("x", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    states = [h[0, -1].numpy() for h in out.hidden_states[:-1]] + [captured["x"][0, -1].numpy()]
    return np.stack(states), out.logits[0, -1].numpy()


def assert_near_hf(run: dict, row: int, model, ids, tol: float = 1e-3) -> None:
    """Every hook point's activation and the logits of jaxprobe's `run` result at `row` within `tol`
    of HF's norm (relative L2 error), and the same top token."""
    states, logits = hf_last_token(model, ids)
    assert run["activations"].shape[1] == len(states)
    for layer, ref in enumerate(states):
        err = np.linalg.norm(run["activations"][row, layer] - ref) / np.linalg.norm(ref)
        assert err < tol, (row, layer, err)
    assert np.linalg.norm(run["logits"][row] - logits) / np.linalg.norm(logits) < tol
    assert run["logits"][row].argmax() == logits.argmax()


def synthetic_pool(n: int, k: int, seed: int, *, sharpness: float = 0.8):
    """(target logits, surrogate logits, labels) of a synthetic K-way pool: true class
    probabilities softmax(z), z ~ N(0, 2^2); the target sees `sharpness` z plus N(0, 1) noise,
    the surrogate z plus N(0, 1.5^2) noise, so both are informative and imperfect."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, k))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1).astype(np.int64)
    target = sharpness * z + rng.normal(0.0, 1.0, (n, k))
    surrogate = z + rng.normal(0.0, 1.5, (n, k))
    return target.astype(np.float32), surrogate.astype(np.float32), labels
