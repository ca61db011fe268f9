"""HF names -> ours: a config.json of a family in FAMILY_SWITCHES -> LlamaConfig, and each HF
tensor -> (our parameter, the slot it fills, the array in our layout). Anything whose math we do
not implement is refused in one line: an unknown config field, tensor name or shape."""

from __future__ import annotations

import re

import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.model import LlamaConfig, RopeScaling, param_shapes


# HF config fields we read, and those that may be present with any value without changing the math.
_HF_IGNORED = {
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "initializer_range", "model_type", "_name_or_path",
    "attention_dropout", "pretraining_tp", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "tokenizer_class", "is_decoder", "quantization_config",
    "hidden_act", "mlp_bias", "attention_bias", "rope_parameters", "rope_scaling", "rope_theta",
    "head_dim", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "rms_norm_eps", "tie_word_embeddings",
    "max_position_embeddings", "sliding_window", "use_sliding_window", "max_window_layers",
    "layer_types", "hidden_activation", "use_bidirectional_attention", "chunk_size_feed_forward",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "_sliding_window_pattern",
    "sliding_window_pattern", "rope_local_base_freq", "resid_pdrop", "embd_pdrop", "qk_layernorm",
    "layer_norm_eps", "partial_rotary_factor",
    "problem_type", "task_specific_params",
    "finetuning_task", "prefix", "bad_words_ids", "generation_config", "cross_attention_hidden_size",
    "add_cross_attention", "is_encoder_decoder", "decoder_start_token_id", "sep_token_id",
    "tie_encoder_decoder", "torchscript", "pruned_heads", "chunk_size", "output_scores",
    "return_dict_in_generate", "use_return_dict",
}


# The families jaxprobe reads from an HF config.json's `model_type`, as switches of the one model
# (jaxprobe/model.py); everything else about them is LLaMA's. Qwen2's q/k/v projections carry
# biases; Qwen3 RMS-normalises each query and key head before RoPE; Mistral's queries see only
# their last `sliding_window` keys (LlamaConfig.sliding_window, read from the config); Gemma scales
# by 1 + its norm weights, gates its MLP with GELU-tanh and multiplies embeddings by sqrt(d_model);
# Gemma 3 adds per-head q/k norms, norms on the attention and MLP outputs, a query scale of its
# own, and local sliding-window layers (with their own RoPE base) among global ones. Phi-2 runs
# attention and a plain (ungated) MLP in parallel on one LayerNorm, with biases everywhere and RoPE
# on part of each head.
FAMILY_SWITCHES: dict[str, dict[str, bool]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"norm_offset": True, "mlp_activation": "gelu_tanh", "embed_scale": True},
    "phi": {"layer_norm": True, "parallel_block": True, "gated_mlp": False, "mlp_bias": True, "o_bias": True,
            "qkv_bias": True, "lm_head_bias": True, "mlp_activation": "gelu_tanh"},
    "gemma2": {"norm_offset": True, "mlp_activation": "gelu_tanh", "embed_scale": True, "post_norms": True},
    "gemma3_text": {"norm_offset": True, "mlp_activation": "gelu_tanh", "embed_scale": True, "qk_norm": True,
                    "post_norms": True},
}
# Families whose layers alternate local (sliding-window) and global attention, by `layer_types`.
_INTERLEAVED = ("gemma2", "gemma3_text")
# Families whose scores and logits may be soft-capped (cap * tanh(x / cap)).
_SOFTCAPPED = ("gemma2",)
# The MLP activation each family's config must name (anything else is refused by name).
_HF_ACTIVATIONS = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new")}
# Families whose configs carry a `sliding_window` size that only `use_sliding_window` switches on.
_WINDOW_SWITCHED = ("qwen2", "qwen3")


def hf_config_to_llama(hf: dict, where: str = "config.json") -> LlamaConfig:
    """Translate an HF config dict of a family in FAMILY_SWITCHES, refusing anything whose math
    we do not implement."""
    family = hf.get("model_type", "llama")

    def refuse(field, value):
        raise UserError(f"{where}: unsupported config field {field}={value!r} (jaxprobe implements "
                        f"{', '.join(FAMILY_SWITCHES)} without it)")

    if family not in FAMILY_SWITCHES:
        refuse("model_type", family)
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            refuse(flag, hf[flag])
    activations = _HF_ACTIVATIONS[FAMILY_SWITCHES[family].get("mlp_activation", "silu")]
    for field in ("hidden_act", "hidden_activation"):  # older Gemma configs name it the second way
        if hf.get(field) is not None and hf[field] not in activations:
            refuse(field, hf[field])
    if hf.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", hf["use_bidirectional_attention"])
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(field) is not None and family not in _SOFTCAPPED:
            refuse(field, hf[field])
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window", hf["use_sliding_window"])
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types") or []
    local_layers = None
    if family in _INTERLEAVED:
        if not isinstance(layer_types, list) or len(layer_types) != hf.get("num_hidden_layers") or any(
                kind not in ("full_attention", "sliding_attention") for kind in layer_types):
            refuse("layer_types", layer_types)
        local_layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    elif any(kind != "full_attention" for kind in layer_types):
        refuse("layer_types", sorted(set(layer_types)))
    if family in _WINDOW_SWITCHED or (family not in _INTERLEAVED and isinstance(window, int)
                                      and window >= hf.get("max_position_embeddings", 4096)):
        window = None  # off unless switched on; a window as long as the context changes nothing
    if window is not None and family not in ("mistral", *_INTERLEAVED):
        refuse("sliding_window", window)
    if hf.get("pretraining_tp", 1) != 1:
        refuse("pretraining_tp", hf["pretraining_tp"])
    unknown = sorted(k for k in hf if k not in _HF_IGNORED)
    if unknown:
        refuse(unknown[0], hf[unknown[0]])

    # transformers 5 folds rope_theta and rope_scaling into `rope_parameters` (per layer type for
    # interleaved families).
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    local_theta = None
    if family in _INTERLEAVED and "full_attention" in rope:  # one RoPE per layer type
        local = dict(rope.get("sliding_attention") or {})
        rope = dict(rope.get("full_attention") or {})
        if local.get("rope_type", "default") != "default" or set(local) - {"rope_theta", "rope_type"}:
            refuse("rope_parameters.sliding_attention", local)
        local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = linear = None
    if rope_type == "linear":
        linear = rope.pop("factor", None)
        if not isinstance(linear, (int, float)) or isinstance(linear, bool) or not linear > 0:
            refuse("rope_parameters.factor", linear)
    elif rope_type == "llama3":
        try:
            scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                  float(rope["high_freq_factor"]),
                                  int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise UserError(f"{where}: llama3 rope scaling lacks {e.args[0]}") from None
        except (TypeError, ValueError):
            raise UserError(f"{where}: llama3 rope scaling holds a non-number: {rope}") from None
    elif rope_type != "default":
        refuse("rope_type", rope_type)
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial is not None and (family != "phi" or not isinstance(partial, (int, float)) or not 0 < partial <= 1):
        refuse("partial_rotary_factor", partial)
    for k in ("attention_factor", "beta_fast", "beta_slow", "mscale"):
        if k in rope:
            refuse(f"rope_parameters.{k}", rope[k])
    if hf.get("qk_layernorm"):
        refuse("qk_layernorm", hf["qk_layernorm"])

    def number(key, kind=int, default=None, value=None):
        """A numeric field, refused in one line if missing (without a default) or of another type."""
        value = hf.get(key) if value is None else value
        if value is None:
            if default is None:
                raise UserError(f"{where}: lacks the field {key!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise UserError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
        return kind(value)

    n_heads, d_model = number("num_attention_heads"), number("hidden_size")
    if n_heads < 1:
        raise UserError(f"{where}: num_attention_heads must be a positive integer, not {n_heads}")
    head_dim = number("head_dim", default=d_model // n_heads)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise UserError(f"{where}: tie_word_embeddings must be true or false, not {tie!r}")
    try:
        return LlamaConfig(
            vocab_size=number("vocab_size"), d_model=d_model, n_layers=number("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=number("num_key_value_heads", default=n_heads),
            head_dim=head_dim,
            d_ff=number("intermediate_size"),
            rms_eps=number("layer_norm_eps" if family == "phi" else "rms_norm_eps", float, 1e-6),
            rotary_dim=(int(head_dim * partial) // 2 * 2 if partial is not None and partial < 1 else None),
            rope_theta=number("rope_theta", float, value=theta), rope_scaling=scaling, tie_embeddings=tie,
            max_position=number("max_position_embeddings", default=4096),
            sliding_window=number("sliding_window", value=window) if window is not None else None,
            query_scale=number("query_pre_attn_scalar", float) if family in _INTERLEAVED else None,
            local_layers=local_layers, local_rope_theta=float(local_theta) if local_theta is not None else None,
            rope_linear_factor=float(linear) if linear is not None else None,
            attn_softcap=number("attn_logit_softcapping", float) if hf.get("attn_logit_softcapping") else None,
            final_softcap=number("final_logit_softcapping", float) if hf.get("final_logit_softcapping") else None,
            **FAMILY_SWITCHES[family])
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------------
# Key mapping: (source tensor name) -> (our parameter path, where in it, array in our layout)

HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# q, k and v projections (weights, and biases where a family has them) fill slots of wqkv / bqkv.
_QKV_PARAMS = {f"self_attn.{p}_proj.{kind}": ("blocks", "attn", "wqkv" if kind == "weight" else "bqkv")
               for p in "qkv" for kind in ("weight", "bias")}
_HF_LAYER_PARAMS = {
    "input_layernorm.weight": ("blocks", "attn_norm", "weight"),
    **_QKV_PARAMS,
    "self_attn.q_norm.weight": ("blocks", "attn", "q_norm", "weight"),
    "self_attn.k_norm.weight": ("blocks", "attn", "k_norm", "weight"),
    "self_attn.o_proj.weight": ("blocks", "attn", "wo"),
    "post_attention_layernorm.weight": ("blocks", "mlp_norm", "weight"),
    "mlp.gate_proj.weight": ("blocks", "mlp", "w_gate_up"),
    "mlp.up_proj.weight": ("blocks", "mlp", "w_gate_up"),
    "mlp.down_proj.weight": ("blocks", "mlp", "w_down"),
}


# Gemma 3's four block norms: HF's "post_attention_layernorm" is then on the attention output, and
# the MLP's own input norm is "pre_feedforward_layernorm".
_POST_NORM_LAYER_PARAMS = {
    "post_attention_layernorm.weight": ("blocks", "attn_post_norm", "weight"),
    "pre_feedforward_layernorm.weight": ("blocks", "mlp_norm", "weight"),
    "post_feedforward_layernorm.weight": ("blocks", "mlp_post_norm", "weight"),
}


def _layer_params(cfg: LlamaConfig) -> dict[str, tuple[str, ...]]:
    if cfg.layer_norm:
        return _PHI_LAYER_PARAMS
    return {**_HF_LAYER_PARAMS, **_POST_NORM_LAYER_PARAMS} if cfg.post_norms else _HF_LAYER_PARAMS


def target_param(cfg: LlamaConfig, name: str) -> tuple[str, ...] | None:
    """The parameter an HF tensor name fills (None: not one of this family's names)."""
    if name in _global_params(cfg):
        return _global_params(cfg)[name]
    m = HF_LAYER.fullmatch(name)
    return _layer_params(cfg).get(m.group(2)) if m else None


def hf_tensor_names(cfg: LlamaConfig) -> list[str]:
    """Every HF tensor name a checkpoint of this config must hold."""
    shapes = param_shapes(cfg)
    names = [name for name, p in _global_params(cfg).items() if p in shapes]
    return names + [f"model.layers.{i}.{part}" for i in range(cfg.n_layers)
                    for part, path in _layer_params(cfg).items() if path in shapes]
_HF_GLOBAL = {
    "model.embed_tokens.weight": ("embed", "weight"),
    "model.norm.weight": ("final_norm", "weight"),
    "lm_head.weight": ("lm_head",),
}
# Phi's names: a LayerNorm with a bias, biases on the output projection, the MLP and the logits.
_PHI_GLOBAL = {
    "model.embed_tokens.weight": ("embed", "weight"),
    "model.final_layernorm.weight": ("final_norm", "weight"),
    "model.final_layernorm.bias": ("final_norm", "bias"),
    "lm_head.weight": ("lm_head",),
    "lm_head.bias": ("lm_head_bias",),
}
_PHI_LAYER_PARAMS = {
    "input_layernorm.weight": ("blocks", "attn_norm", "weight"),
    "input_layernorm.bias": ("blocks", "attn_norm", "bias"),
    **_QKV_PARAMS,
    "self_attn.dense.weight": ("blocks", "attn", "wo"),
    "self_attn.dense.bias": ("blocks", "attn", "bo"),
    "mlp.fc1.weight": ("blocks", "mlp", "w_up"),
    "mlp.fc1.bias": ("blocks", "mlp", "b_up"),
    "mlp.fc2.weight": ("blocks", "mlp", "w_down"),
    "mlp.fc2.bias": ("blocks", "mlp", "b_down"),
}


def _global_params(cfg: LlamaConfig) -> dict[str, tuple[str, ...]]:
    return _PHI_GLOBAL if cfg.layer_norm else _HF_GLOBAL

def hf_to_ours(cfg: LlamaConfig, name: str, w: np.ndarray) -> tuple[tuple[str, ...], tuple | None, np.ndarray]:
    """Map one HF tensor (torch layout [out, in]) to (our path, the index it fills in that
    parameter or None for all of it, array in our layout), checking its shape, in the source's
    layout, against the config. Fused parameters take several tensors: q/k/v fill slots of
    `wqkv`'s group axis, gate/up the two rows of `w_gate_up`."""
    shapes = param_shapes(cfg)
    global_params, layer_params = _global_params(cfg), _layer_params(cfg)
    if name in global_params:
        path, layer = global_params[name], None
        if path == ("lm_head",) and cfg.tie_embeddings:
            return path, None, w  # some tied checkpoints also store the (identical) head; skipped
        want = shapes[path]
    else:
        m = HF_LAYER.fullmatch(name)
        if not m or layer_params.get(m.group(2)) not in shapes:
            raise UserError(f"unknown tensor {name!r} (shape {tuple(w.shape)}): not part of this model's "
                            "family (see hf_mapping.FAMILY_SWITCHES)")
        layer, part, path = int(m.group(1)), m.group(2), layer_params[m.group(2)]
        if not 0 <= layer < cfg.n_layers:
            raise UserError(f"tensor {name!r} names layer {layer} but the config has {cfg.n_layers} layers")
        want = shapes[path][1:]
        d, g, hd, r = cfg.d_model, cfg.n_kv_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        if path[-1] in ("wqkv", "bqkv"):  # [heads*hd(, d)] -> [(d,) kv groups, heads per group, hd] slots
            projection = part.split(".")[1]
            heads, slots = {"q_proj": (r, slice(0, r)), "k_proj": (1, slice(r, r + 1)),
                            "v_proj": (1, slice(r + 1, r + 2))}[projection]
            if path[-1] == "bqkv":
                _check_shape(name, w, (g * heads * hd,))
                return path, (layer, slice(None), slots), w.reshape(g, heads, hd)
            _check_shape(name, w, (g * heads * hd, d))
            return path, (layer, slice(None), slice(None), slots), w.T.reshape(d, g, heads, hd)
        if path[-1] == "w_gate_up":  # [d_ff, d] -> [d, d_ff], into row 0 (gate) or 1 (up)
            _check_shape(name, w, (cfg.d_ff, d))
            return path, (layer, slice(None), 0 if part == "mlp.gate_proj.weight" else 1), w.T
    index = None if layer is None else (layer,)
    if len(want) == 1 or path == ("embed", "weight"):  # norms, embeddings: stored as we store them
        _check_shape(name, w, want)
        return path, index, w
    if path[-1] == "wo":  # [d, heads*hd] -> [heads, hd, d]
        _check_shape(name, w, (cfg.d_model, cfg.n_heads * cfg.head_dim))
        return path, index, w.T.reshape(want)
    _check_shape(name, w, want[::-1])  # plain linear: torch [out, in] -> ours [in, out]
    return path, index, w.T


def _check_shape(name, w, shape):
    if tuple(w.shape) != tuple(shape):
        raise UserError(f"tensor {name!r} has shape {tuple(w.shape)} but the config implies {tuple(shape)}")
