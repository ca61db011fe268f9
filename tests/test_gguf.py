"""GGUF path: tiny llama, qwen2 and qwen3 GGUFs written with gguf's own writer from a tiny HF model (f32 and Q8_0),
converted by jaxprobe, must match the HF model (f32 exactly; Q8_0 against its dequantised weights)."""

import json

import numpy as np
import pytest
import torch

import jaxprobe
from jaxprobe.testing import make_hf_model
from jaxprobe.convert import convert

TEXTS = ["This movie was wonderful, a charming journey.", "dull", "Sentence: 'a great film' \nLabel:"]


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf q/k row permutation (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer_json, path, qtype, arch="llama"):
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import dequantize, quantize

    cfg = model.config
    w = GGUFWriter(str(path), arch)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer_json["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t == "<|endoftext|>" else TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm"}
    dequantised = {}
    for key, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        kind = None
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, i, rest = key.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            kind = names[module]
            name = f"blk.{i}.{kind}.{suffix}"
            if arch == "llama" and kind == "attn_q":  # llama.cpp permutes q/k rows for llama only
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            elif arch == "llama" and kind == "attn_k":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
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
