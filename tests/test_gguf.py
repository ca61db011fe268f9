"""GGUF path: tiny llama, qwen2, qwen3, gemma3 and phi2 GGUFs written with gguf's own writer from a tiny HF model (f32 and Q8_0),
converted by jaxprobe, must match the HF model (f32 exactly; Q8_0 against its dequantised weights)."""

import json

import numpy as np
import pytest
import torch

import jaxprobe
from jaxprobe.convert import convert
from jaxprobe.errors import UserError
from jaxprobe.testing import make_hf_model

TEXTS = ["This movie was wonderful, a charming journey.", "dull", "Sentence: 'a great film' \nLabel:"]


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf q/k row permutation (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF module names -> llama.cpp's GGUF tensor names, and per architecture the names that differ.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "model.embed_tokens": "token_embd", "model.norm": "output_norm",
              "lm_head": "output"}
GGUF_RENAMED = {
    "gemma3": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "phi2": {"self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
             "model.final_layernorm": "output_norm"},
}


def write_metadata(w, cfg, arch):
    """The hyperparameters llama.cpp's convert_hf_to_gguf.py writes for `arch`."""
    if getattr(cfg, "head_dim", None) and arch != "phi2":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "phi2":  # Phi2Model: LayerNorm eps, 4 * d as the MLP width, RoPE dims per head
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_layer_norm_eps(cfg.layer_norm_eps)
        partial = cfg.rope_parameters["partial_rotary_factor"]
        w.add_rope_dimension_count(int(partial * cfg.hidden_size) // cfg.num_attention_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        return
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":  # the global layers' RoPE base; the window (its layer pattern is fixed)
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_freq_base(10000.0)


def write_gguf(model, tokenizer_json, path, qtype, arch="llama", fused_qkv=False, extra=None):
    """`model` as llama.cpp's converter would write it (F32 or quantised), with `extra` metadata;
    returns the weights the file really holds, in HF layout and values, by HF name."""
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import dequantize, quantize

    cfg = model.config
    w = GGUFWriter(str(path), arch)
    write_metadata(w, cfg, arch)
    for key, value in (extra or {}).items():
        w.add_float32(key, value)
    vocab = tokenizer_json["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t == "<|endoftext|>" else TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    names = {**GGUF_NAMES, **GGUF_RENAMED.get(arch, {})}
    state = {k: t.numpy().astype(np.float32) for k, t in model.state_dict().items()}
    if arch == "gemma3":
        state.pop("lm_head.weight")  # tied; llama.cpp writes no output tensor for Gemma
    if fused_qkv:  # older Phi-2 files hold q, k and v as one attn_qkv tensor
        for key in [k for k in state if ".self_attn.q_proj." in k]:
            parts = [state.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
            state[key.replace("q_proj", "qkv_proj")] = np.concatenate(parts)
        names["self_attn.qkv_proj"] = "attn_qkv"
    dequantised = {}
    for key, a in state.items():
        module, suffix = key.rsplit(".", 1)
        kind = None
        if module.startswith("model.layers."):
            _, _, i, rest = module.split(".", 3)
            kind = names[rest]
            name = f"blk.{i}.{kind}.{suffix}"
        else:
            name = f"{names[module]}.{suffix}"
        if arch == "llama" and kind == "attn_q":  # llama.cpp permutes q/k rows for llama only
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and kind == "attn_k":
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if arch == "gemma3" and key.endswith("norm.weight"):  # llama.cpp stores Gemma's 1 + weight
            a = a + np.float32(1.0)
        if a.ndim == 2 and qtype != GGMLQuantizationType.F32:
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            d = dequantize(q, qtype).reshape(a.shape)
            if arch == "llama" and kind in ("attn_q", "attn_k"):  # back to HF row order for the reference
                n = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
                d = d.reshape(n, d.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(d.shape)
            dequantised[key] = d
        else:
            w.add_tensor(name, a)
            dequantised[key] = a
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return dequantised


def assert_matches_hf(lm, model):
    """Every hidden state, the final norm and the logits at each text's last token, against HF."""
    res = lm.run(TEXTS, all_logits=True)
    for i, ids in enumerate(lm.tokenize(TEXTS)):
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        hs = np.stack([h[0, -1].numpy() for h in out.hidden_states])
        np.testing.assert_allclose(res["activations"][i, :-1], hs[:-1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["final_norm"][i], hs[-1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(res["logits"][i], out.logits[0, -1].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype_name", ["F32", "Q8_0"])
def test_gguf_conversion_matches_hf(tmp_path, qtype_name):
    from gguf import GGMLQuantizationType
    from transformers import AutoTokenizer

    qtype = getattr(GGMLQuantizationType, qtype_name)
    model = make_hf_model(tmp_path / "hf", num_attention_heads=4, num_key_value_heads=2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer_json = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    model.resize_token_embeddings(len(tokenizer_json["model"]["vocab"]))
    dequantised = write_gguf(model, tokenizer_json, tmp_path / "tiny.gguf", qtype)
    if qtype_name != "F32":  # the reference is the HF model holding the weights the GGUF really holds
        with torch.no_grad():
            for key, p in model.state_dict().items():
                p.copy_(torch.from_numpy(np.ascontiguousarray(dequantised[key])))
    convert(tmp_path / "tiny.gguf", tmp_path / "ckpt", progress=False)
    lm = jaxprobe.load_model(tmp_path / "ckpt")
    assert lm.tokenize(TEXTS) == tok(TEXTS)["input_ids"]  # the GGUF's tokenizer is rebuilt exactly
    assert_matches_hf(lm, model)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_gguf_files_match_hf(tmp_path, family):
    """qwen2 (q/k/v biases) and qwen3 (q/k norms, head_dim apart from d_model) GGUF files, which
    llama.cpp writes without the q/k row permutation."""
    extra = {"head_dim": 32} if family == "qwen3" else {}
    model = make_hf_model(tmp_path / "hf", family=family, num_attention_heads=4, num_key_value_heads=2, **extra)
    tokenizer_json = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    model.resize_token_embeddings(len(tokenizer_json["model"]["vocab"]))
    from gguf import GGMLQuantizationType

    write_gguf(model, tokenizer_json, tmp_path / "tiny.gguf", GGMLQuantizationType.F32, arch=family)
    convert(tmp_path / "tiny.gguf", tmp_path / "ckpt", progress=False)
    lm = jaxprobe.load_model(tmp_path / "ckpt")
    assert_matches_hf(lm, model)


# Gemma 3 in a GGUF: llama.cpp fixes every sixth layer global (the others local, RoPE base 1e4) and
# the query scale head_dim**-0.5, so the HF model takes those values; 7 layers hold one global and a
# local after it, and texts longer than the window of 8 tokens.
GEMMA3 = {"family": "gemma3_text", "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 32, "sliding_window": 8, "query_pre_attn_scalar": 32}
PHI2 = {"family": "phi", "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 256,
        "layer_norm_eps": 1e-5}


def tiny_hf_and_gguf(tmp_path, arch, hf, **gguf):
    model = make_hf_model(tmp_path / "hf", **hf)
    tokenizer_json = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    from gguf import GGMLQuantizationType

    write_gguf(model, tokenizer_json, tmp_path / "tiny.gguf", GGMLQuantizationType.F32, arch=arch, **gguf)
    return model


@pytest.mark.parametrize("arch, hf, fused", [("gemma3", GEMMA3, False), ("phi2", PHI2, False),
                                             ("phi2", PHI2, True)], ids=["gemma3", "phi2", "phi2-fused-qkv"])
def test_gemma3_and_phi2_gguf_files_match_hf(tmp_path, arch, hf, fused):
    """gemma3 (norms stored as 1 + weight, q/k norms, output norms, interleaved local layers) and
    phi2 (LayerNorm biases, separate or fused q/k/v with biases, an output bias, partial RoPE)."""
    model = tiny_hf_and_gguf(tmp_path, arch, hf, **({"fused_qkv": True} if fused else {}))
    convert(tmp_path / "tiny.gguf", tmp_path / "ckpt", progress=False)
    lm = jaxprobe.load_model(tmp_path / "ckpt")
    assert max(map(len, lm.tokenize(TEXTS))) > 8  # past Gemma's window
    assert_matches_hf(lm, model)


@pytest.mark.parametrize("arch, hf, key", [("gemma3", GEMMA3, "gemma3.attn_logit_softcapping"),
                                           ("phi2", PHI2, "phi2.attention.clamp_kqv")])
def test_unknown_gguf_field_is_refused_by_name(tmp_path, arch, hf, key):
    tiny_hf_and_gguf(tmp_path, arch, hf, extra={key: 30.0})
    with pytest.raises(UserError, match=f"unsupported GGUF field {key}=30.0"):
        convert(tmp_path / "tiny.gguf", tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()
