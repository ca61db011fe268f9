"""GGUF files (llama.cpp's format) -> LlamaConfig, tensors under HF names in torch layout
(dequantized, llama.cpp's conversion-time changes undone) and the HF fast tokenizer, read with
the `gguf` package and without torch."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.hf_mapping import FAMILY_SWITCHES
from jaxprobe.model import LlamaConfig


def open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as e:
        raise UserError(f"{path}: not a readable GGUF file (empty, truncated or corrupt?): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# GGUF architectures read (as llama.cpp's converter writes them), with their HF family.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text", "phi2": "phi"}

# The `{arch}.*` metadata keys read; any other is refused by name (as unknown HF config fields are).
_GGUF_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
              "attention.head_count", "attention.head_count_kv", "attention.key_length",
              "attention.value_length", "rope.freq_base", "rope.dimension_count", "rope.scaling.type",
              "rope.scaling.factor", "expert_count")
_GGUF_ARCH_KEYS = {"phi2": ("attention.layer_norm_epsilon",), "gemma3": ("attention.sliding_window",)}

# What llama.cpp's Gemma 3 loader fixes rather than reads from the file (llama-model.cpp): every
# sixth layer is global, the others local (sliding-window) with RoPE base 10,000; the 27B model
# (62 layers) scales queries by (d_model / heads)**-0.5, the others by head_dim**-0.5.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA, _GEMMA3_27B_LAYERS = 6, 10000.0, 62

def gguf_config(reader, where: str) -> LlamaConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{where}: general.architecture is {arch!r}; GGUF files of "
                        f"{', '.join(GGUF_ARCHITECTURES)} are supported")
    f = lambda k, d=None: gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731

    def refuse(key):
        raise UserError(f"{where}: unsupported GGUF field {arch}.{key}={f(key)!r}")

    known = (*_GGUF_KEYS, *_GGUF_ARCH_KEYS.get(arch, ()),
             "attention.layer_norm_rms_epsilon" if arch != "phi2" else "attention.layer_norm_epsilon")
    unknown = sorted(k[len(arch) + 1:] for k in reader.fields if k.startswith(f"{arch}.")
                     and k[len(arch) + 1:] not in known)
    if unknown:
        refuse(unknown[0])
    scaling = f("rope.scaling.type")
    if scaling not in (None, "none") and not (arch == "gemma3" and scaling == "linear"):
        refuse("rope.scaling.type")
    if f("expert_count") not in (None, 0):
        refuse("expert_count")
    required = [k for k in ("attention.head_count", "embedding_length", "block_count", "feed_forward_length",
                            *(("attention.sliding_window",) if arch == "gemma3" else ())) if f(k) is None]
    if required:
        raise UserError(f"{where}: lacks the field {arch}.{required[0]}")
    n_heads = int(f("attention.head_count"))
    d_model = int(f("embedding_length"))
    n_layers = int(f("block_count"))
    vocab = f("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    if n_heads < 1:
        raise UserError(f"{where}: {arch}.attention.head_count must be positive, not {n_heads}")
    head_dim = int(f("attention.key_length") or d_model // n_heads)
    if f("attention.value_length") not in (None, head_dim):
        refuse("attention.value_length")  # one head size for keys and values
    rotary_dim = f("rope.dimension_count")
    if rotary_dim is not None and int(rotary_dim) != head_dim and arch != "phi2":
        refuse("rope.dimension_count")  # partial RoPE is Phi-2's alone
    gemma3 = arch == "gemma3"
    try:
        return LlamaConfig(
            vocab_size=int(vocab), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=int(f("attention.head_count_kv", n_heads)), head_dim=head_dim,
            d_ff=int(f("feed_forward_length")),
            rms_eps=float(f("attention.layer_norm_epsilon" if arch == "phi2" else "attention.layer_norm_rms_epsilon",
                            1e-6 if gemma3 else 1e-5)),
            rope_theta=float(f("rope.freq_base", 10000.0)), rope_scaling=None,
            rope_linear_factor=float(f("rope.scaling.factor")) if scaling == "linear" else None,
            rotary_dim=int(rotary_dim) if rotary_dim is not None and int(rotary_dim) < head_dim else None,
            tie_embeddings="output.weight" not in names, max_position=int(f("context_length", 4096)),
            sliding_window=int(f("attention.sliding_window")) if gemma3 else None,
            local_layers=tuple(i for i in range(n_layers) if (i + 1) % _GEMMA3_PATTERN) if gemma3 else None,
            local_rope_theta=_GEMMA3_LOCAL_THETA if gemma3 else None,
            query_scale=(float(d_model // n_heads if n_layers == _GEMMA3_27B_LAYERS else head_dim)
                         if gemma3 else None),
            **FAMILY_SWITCHES[GGUF_ARCHITECTURES[arch]])
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None

# GGUF tensor names, as llama.cpp's converter writes them, mapped to HF names; per architecture,
# the names that differ from llama's.
_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens",
                "output_norm": "model.norm", "output": "lm_head"}
_GGUF_RENAMED = {
    # Gemma 3's four block norms: ffn_norm is the MLP's input norm, the other two its output norms.
    "gemma3": ({}, {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm"}),
    # Phi-2: HF's PhiForCausalLM names (`attn_qkv`, the fused q/k/v of older files, is split on reading).
    "phi2": ({"output_norm": "model.final_layernorm"},
             {"attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}),
}

def iter_gguf(reader, cfg: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor with llama.cpp's conversion-time changes undone: its q/k row permutation (llama
    only), the +1 it adds to every Gemma 3 norm weight (HF's weights scale by 1 + weight), and a
    fused Phi-2 q/k/v split in three."""
    from gguf.quants import dequantize

    arch = gguf_field(reader, "general.architecture")
    global_names, layer_names = _GGUF_RENAMED.get(arch, ({}, {}))
    global_names, layer_names = {**_GGUF_GLOBAL, **global_names}, {**_GGUF_LAYER, **layer_names}
    for t in reader.tensors:
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32)  # torch layout [out, in]
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(f"GGUF tensor {t.name!r} cannot be read (a truncated file?): {e}") from None
        stem, _, suffix = t.name.rpartition(".")
        if arch == "gemma3" and stem.endswith("norm") and suffix == "weight":
            w = w - np.float32(1.0)  # as transformers' GGUF loader undoes it, in fp32
        if stem in global_names and suffix in ("weight", "bias"):
            yield f"{global_names[stem]}.{suffix}", w
            continue
        parts = stem.split(".")
        if len(parts) != 3 or parts[0] != "blk" or suffix not in ("weight", "bias") or not (
                parts[2] in layer_names or (arch == "phi2" and parts[2] == "attn_qkv")):
            raise UserError(f"unknown GGUF tensor {t.name!r} (shape {tuple(w.shape)})")
        prefix, kind = f"model.layers.{parts[1]}", parts[2]
        if kind == "attn_qkv":  # [q; k; v] rows (Phi-2 is multi-head: three equal parts)
            if w.shape[0] % 3:
                raise UserError(f"GGUF tensor {t.name!r} has shape {tuple(w.shape)}, not three equal q/k/v parts")
            for projection, part in zip("qkv", np.split(w, 3)):
                yield f"{prefix}.self_attn.{projection}_proj.{suffix}", part
            continue
        if arch == "llama" and kind == "attn_q":  # llama.cpp permutes q/k rows for llama only
            w = unpermute_gguf_qk(w, cfg.n_heads)
        elif arch == "llama" and kind == "attn_k":
            w = unpermute_gguf_qk(w, cfg.n_kv_heads)
        yield f"{prefix}.{layer_names[kind]}.{suffix}", w


def unpermute_gguf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its interleaved RoPE layout -> HF rotate-half)."""
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_tokenizer(reader):
    """Build the HF fast tokenizer a GGUF file describes, without torch.

    transformers' own GGUF path imports torch even for the tokenizer; its tokenizer builder does
    not, so we feed it the metadata read with the `gguf` package.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as tm

    meta = {k: (f.contents() if f.types else None) for k, f in reader.fields.items()
            if k.startswith("tokenizer.")}
    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in meta}
               for group, renames in tm.GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in tm._SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = tm.convert_gguf_tokenizer(gguf_field(reader, "general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
