"""The LLaMA model in Flax NNX, in one file: config, modules, and the forward pass that reads the
residual stream.

Conventions (HF `LlamaForCausalLM` numerics, so HF weights need no permutation):
- Linear weights are stored `[in, out]` with named head axes. The matmuls that share an input are
  stored fused, so no forward pass copies weights together: `wqkv: [d_model, kv_heads, r + 2,
  head_dim]` holds each KV group's r = n_heads / kv_heads query heads, then its key and its value
  head (query head g * r + j is `wqkv[:, g, j]`, HF's GQA order; a 'model' mesh axis splits whole
  groups), and `w_gate_up: [d_model, 2, d_ff]` the SwiGLU gate and up projections.
- RoPE is HF's rotate-half over `(i, i + head_dim/2)` pairs, computed in fp32.
- RMSNorm, softmax and RoPE run in fp32; matmuls in the parameter dtype (fp32 or bf16).
- The blocks' parameters are stacked on a leading `layer` axis (created with `nnx.vmap`) and run
  with `jax.lax.scan` over the split state, so compile time does not grow with depth.

Hook points (index into the `[n_layers + 1]` axis of `ForwardOutputs.residual`):
- 0: `embed`, the token embeddings;
- i + 1: `blocks.{i}.resid_post`, the residual stream after block i, before the final norm
  (= Meta's `layers.{i}` output = HF `hidden_states[i + 1]`, except for the last block where HF's
  `hidden_states[-1]` has the final norm applied);
- `final_norm` and `logits` are separate outputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# A large negative score instead of -inf, so fully masked rows (padding queries) stay finite.
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_position: int = 4096
    # Family switches (see FAMILY_SWITCHES in jaxprobe/hf_mapping.py for which family sets which):
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False   # RMSNorm over each query and key head before RoPE (Qwen3)
    sliding_window: int | None = None  # each query sees only the last `sliding_window` keys (Mistral)
    norm_offset: bool = False  # RMSNorm scales by 1 + weight, in fp32 (Gemma)
    mlp_activation: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh" (Gemma)
    embed_scale: bool = False  # token embeddings times sqrt(d_model), in the model dtype (Gemma)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add (Gemma 3)
    query_scale: float | None = None  # scores scaled by query_scale**-0.5, not head_dim**-0.5 (Gemma 3)
    local_layers: tuple[int, ...] | None = None  # the layers that use sliding_window (None: all of them)
    local_rope_theta: float | None = None  # the RoPE base of the local layers (Gemma 3)
    rope_linear_factor: float | None = None  # positions divided by this in the other layers' RoPE
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    layer_norm: bool = False  # LayerNorm with a bias instead of RMSNorm (Phi)
    parallel_block: bool = False  # attention and MLP both read the one normed input (Phi)
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (Phi)
    mlp_bias: bool = False  # biases on the MLP's two projections (Phi)
    o_bias: bool = False  # a bias on the attention output projection (Phi)
    rotary_dim: int | None = None  # RoPE on each head's first rotary_dim dims only (Phi)
    lm_head_bias: bool = False  # a bias on the logits (Phi)

    def __post_init__(self):
        # Checked here so that every way in (HF config, GGUF, a checkpoint's config.json) refuses
        # a malformed size before any array is allocated from it.
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_position"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        for name in ("rms_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(
                self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or null, not {self.sliding_window!r}")
        for name in ("query_scale", "local_rope_theta", "rope_linear_factor", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{name} must be a positive number or null, not {value!r}")
        if self.local_layers is not None and (self.sliding_window is None or not all(
                isinstance(i, int) and 0 <= i < self.n_layers for i in self.local_layers)):
            raise ValueError(f"local_layers must be layer indices below n_layers, with a sliding_window, "
                             f"not {self.local_layers!r}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {', '.join(ACTIVATIONS)}, not {self.mlp_activation!r}")
        if self.rotary_dim is not None and not (isinstance(self.rotary_dim, int) and not isinstance(
                self.rotary_dim, bool) and 2 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be an even number of dims up to head_dim, not {self.rotary_dim!r}")
        for name in ("tie_embeddings", "qkv_bias", "qk_norm", "norm_offset", "embed_scale", "post_norms",
                     "layer_norm", "parallel_block", "gated_mlp", "mlp_bias", "o_bias", "lm_head_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict[str, Any]:
        # Family switches appear only when on, so a plain LLaMA's config (and fingerprint) reads
        # as it did before they existed.
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in _SWITCHES and v == _SWITCHES[k])}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """The config a checkpoint's config.json holds; ValueError naming the first bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, found {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if unknown or missing:
            raise ValueError(f"unknown field {unknown[0]!r}" if unknown else f"missing field {missing[0]!r}")
        d = dict(d)
        if d.get("local_layers") is not None:
            d["local_layers"] = tuple(d["local_layers"])
        if d.get("rope_scaling"):
            try:
                d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
            except TypeError as e:
                raise ValueError(f"rope_scaling: {e}") from None
        return cls(**d)

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for shape in param_shapes(self).values())


_SWITCHES = {"qkv_bias": False, "qk_norm": False, "sliding_window": None, "norm_offset": False,
             "mlp_activation": "silu", "embed_scale": False, "post_norms": False, "query_scale": None,
             "local_layers": None, "local_rope_theta": None, "rope_linear_factor": None,
             "attn_softcap": None, "final_softcap": None, "layer_norm": False, "parallel_block": False,
             "gated_mlp": True, "mlp_bias": False, "o_bias": False, "rotary_dim": None,
             "lm_head_bias": False}  # each with its LLaMA value
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


# Logical axis names of every parameter, by its path in the model state. The sharding table in
# `jaxprobe.sharding` maps these to mesh axes; conversion checks shapes against the config.
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "weight"): ("vocab", "embed"),
    ("blocks", "attn_norm", "weight"): ("layer", "embed"),
    ("blocks", "attn_norm", "bias"): ("layer", "embed"),
    ("blocks", "attn", "bo"): ("layer", "embed"),
    ("blocks", "mlp", "w_up"): ("layer", "embed", "ffn"),
    ("blocks", "mlp", "b_up"): ("layer", "ffn"),
    ("blocks", "mlp", "b_down"): ("layer", "embed"),
    ("final_norm", "bias"): ("embed",),
    ("lm_head_bias",): ("vocab",),
    ("blocks", "attn", "wqkv"): ("layer", "embed", "kv_heads", "qkv", "head_dim"),
    ("blocks", "attn", "wo"): ("layer", "heads", "head_dim", "embed"),
    ("blocks", "attn", "bqkv"): ("layer", "kv_heads", "qkv", "head_dim"),
    ("blocks", "attn", "q_norm", "weight"): ("layer", "head_dim"),
    ("blocks", "attn", "k_norm", "weight"): ("layer", "head_dim"),
    ("blocks", "mlp_norm", "weight"): ("layer", "embed"),
    ("blocks", "attn_post_norm", "weight"): ("layer", "embed"),
    ("blocks", "mlp_post_norm", "weight"): ("layer", "embed"),
    ("blocks", "mlp", "w_gate_up"): ("layer", "embed", "gate_up", "ffn"),
    ("blocks", "mlp", "w_down"): ("layer", "ffn", "embed"),
    ("final_norm", "weight"): ("embed",),
    ("lm_head",): ("embed", "vocab"),
}


def param_shapes(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every parameter, by path: the single source of truth for conversion checks."""
    sizes = {"vocab": cfg.vocab_size, "embed": cfg.d_model, "layer": cfg.n_layers,
             "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
             "ffn": cfg.d_ff, "qkv": cfg.n_heads // cfg.n_kv_heads + 2, "gate_up": 2}
    absent = {("lm_head",): cfg.tie_embeddings, ("blocks", "attn", "bqkv"): not cfg.qkv_bias,
              ("blocks", "attn", "q_norm", "weight"): not cfg.qk_norm,
              ("blocks", "attn", "k_norm", "weight"): not cfg.qk_norm,
              ("blocks", "attn_post_norm", "weight"): not cfg.post_norms,
              ("blocks", "mlp_post_norm", "weight"): not cfg.post_norms,
              ("blocks", "attn_norm", "bias"): not cfg.layer_norm, ("final_norm", "bias"): not cfg.layer_norm,
              ("blocks", "mlp_norm", "weight"): cfg.parallel_block,
              ("blocks", "mlp", "w_gate_up"): not cfg.gated_mlp, ("blocks", "mlp", "w_up"): cfg.gated_mlp,
              ("blocks", "mlp", "b_up"): not cfg.mlp_bias, ("blocks", "mlp", "b_down"): not cfg.mlp_bias,
              ("blocks", "attn", "bo"): not cfg.o_bias, ("lm_head_bias",): not cfg.lm_head_bias}
    return {path: tuple(sizes[a] for a in axes) for path, axes in PARAM_AXES.items()
            if not absent.get(path, False)}


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(dtype))


class Embedding(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
        self.weight = _normal(rngs, (cfg.vocab_size, cfg.d_model), dtype)
        self.scale = math.sqrt(cfg.d_model) if cfg.embed_scale else None

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.weight[...], tokens, axis=0)
        return x if self.scale is None else x * jnp.asarray(self.scale, x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with a bias (Phi), normalised in fp32 as torch does it for fp32 inputs."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centred = x32 - x32.mean(-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...] + self.bias[...]


def make_norm(cfg: LlamaConfig, dim: int, dtype):
    """The family's norm over `dim`: LayerNorm, or RMSNorm (with Gemma's 1 + weight)."""
    return LayerNorm(dim, cfg.rms_eps, dtype) if cfg.layer_norm else RMSNorm(dim, cfg.rms_eps, dtype, cfg.norm_offset)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, offset: bool = False):
        self.weight = nnx.Param((jnp.zeros if offset else jnp.ones)((dim,), dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # as HF's Gemma: scale by 1 + weight in fp32, then cast back
            return (x32 * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * x32.astype(x.dtype)  # as HF's LLaMA: cast back, then scale


def rope_inv_freq(cfg: LlamaConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies [head_dim/2] in fp32, with Llama-3 or linear scaling if configured (the
    local layers' own base, unscaled, with `local`)."""
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    dim = cfg.rotary_dim or cfg.head_dim
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if local:
        return inv_freq
    if cfg.rope_linear_factor is not None:
        return inv_freq / cfg.rope_linear_factor
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


class Rope(NamedTuple):
    """Rotate-half RoPE tables for one batch, computed once per forward pass (not once per layer).

    cos, signed_sin: fp32 [B, T, 1, head_dim]; signed_sin is sin with its first half negated, so
    that rotate_half(x) * sin == swap_halves(x) * signed_sin.
    """

    cos: jax.Array
    signed_sin: jax.Array

    @classmethod
    def at(cls, positions: jax.Array, inv_freq: jax.Array) -> Rope:
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq       # [B, T, hd/2]
        angles = jnp.concatenate([freqs, freqs], -1)[..., None, :]        # [B, T, 1, hd]
        sin = jnp.sin(angles)
        half = sin.shape[-1] // 2
        return cls(jnp.cos(angles), jnp.concatenate([-sin[..., :half], sin[..., half:]], -1))

    def take(self, index: jax.Array) -> Rope:
        """The tables at index [B, Tq] (positions along T) only."""
        pick = lambda table: jnp.take_along_axis(table, index[:, :, None, None], axis=1)
        return Rope(pick(self.cos), pick(self.signed_sin))

    def apply(self, x: jax.Array) -> jax.Array:
        """x: [B, T, heads, head_dim] -> the same, rotated (in fp32, cast back)."""
        x32 = x.astype(jnp.float32)
        half = x.shape[-1] // 2
        swapped = jnp.concatenate([x32[..., half:], x32[..., :half]], -1)
        return (x32 * self.cos + swapped * self.signed_sin).astype(x.dtype)


class PrefixKV(NamedTuple):
    """Keys/values of a prompt prefix shared by a whole batch, for one layer or stacked on layers."""

    k: jax.Array  # [(L,) P, kv_heads, head_dim], RoPE applied
    v: jax.Array  # [(L,) P, kv_heads, head_dim]


# Causal attention runs over blocks of this many query positions, each against only the keys it
# can see: about half the score, softmax and value work of a full [T, T] pass. 32 measured fastest
# on the reference CPU for T of 100 to 1,000 (the block count is capped for long inputs).
QUERY_BLOCK = 32
MAX_QUERY_BLOCKS = 32


# Fused attention kernels (jax.nn.dot_product_attention) by name; the blocked one below is None.
FUSED_ATTENTION = ("xla", "cudnn")


def fused_attention_applies(prefix, query_index, window_on, softcap) -> bool:
    """Whether a fused kernel can run this attention: a whole padded batch from position 0, one
    window for every layer, no score soft-capping (none of the kernels has Gemma 2's tanh cap)."""
    return prefix is None and query_index is None and window_on is None and softcap is None


def fused_causal_attention(q, k, v, valid, window: int | None, implementation: str):
    """causal_attention through jax.nn.dot_product_attention (cuDNN's flash attention on GPU).

    Rows must be right-padded (each row's real tokens first, as the runner pads), since the
    kernels take each row's length, not a mask; a filler row with no real token gets length 1
    (its output is never read)."""
    lengths = jnp.maximum(valid.sum(axis=1, dtype=jnp.int32), 1)
    return jax.nn.dot_product_attention(
        q, k, v, scale=1.0, is_causal=True, key_value_seq_lengths=lengths,
        query_seq_lengths=lengths if implementation == "cudnn" else None,
        local_window_size=None if window is None else (window - 1, 0), implementation=implementation)


def causal_attention(q, k, v, valid, prefix: PrefixKV | None = None, query_index=None,
                     window: int | None = None, window_on: jax.Array | None = None,
                     softcap: float | None = None, fused: str | None = None):
    """Grouped-query causal attention, over the last `window` keys of each query if given.

    q: [B, Tq, H, hd], already scaled by 1/sqrt(hd); k, v: [B, T, G, hd] (H a multiple of G);
    valid: bool [B, T], False on padding keys; prefix: keys/values every sequence of the batch
    continues (all real tokens, all visible). Queries are at positions 0..T-1 (Tq = T), or, with
    query_index int32 [B, Tq], at those positions along T only (a prefix's keys come before
    position 0: a query at t is P + t tokens in). window_on: a traced bool turning the window on
    for this layer (None: on whenever `window` is given). softcap: scores -> softcap * tanh(scores /
    softcap) before masking (Gemma 2). Returns [B, Tq, H, hd].

    Each kv head's query heads are folded into the rows of one matrix (rows ordered (t, r), so a
    block of query positions is a contiguous row range): XLA's CPU backend runs these 4-d batched
    matmuls several times faster than 5-d GQA einsums. Softmax normalisation is applied to the
    [rows, hd] output instead of the [rows, keys] probabilities.

    fused: "cudnn" or "xla" runs fused_causal_attention instead where it applies (see
    fused_attention_applies; rows must then be right-padded).
    """
    if fused is not None and fused_attention_applies(prefix, query_index, window_on, softcap):
        return fused_causal_attention(q, k, v, valid, window, fused)
    b, tq, h, hd = q.shape
    t, g = k.shape[1], k.shape[2]
    r = h // g
    qf = q.reshape(b, tq, g, r, hd).transpose(0, 2, 1, 3, 4).reshape(b, g, tq * r, hd)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                  # [B, G, T, hd]
    n_prefix = 0
    if prefix is not None:
        # One [B*T*R, hd] x [hd, P] matmul per kv head for the whole batch.
        n_prefix = prefix.k.shape[0]
        qp = qf.transpose(1, 0, 2, 3).reshape(g, b * tq * r, hd)
        prefix_scores = jnp.einsum("gmk,pgk->gmp", qp, prefix.k, preferred_element_type=jnp.float32)
        prefix_scores = _capped(prefix_scores.reshape(g, b, tq * r, n_prefix).transpose(1, 0, 2, 3), softcap)
    if query_index is None:
        # (row range, keys it can see, each row's query position [1, rows]) per block of queries
        block = max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))
        blocks = []
        for start in range(0, t, block):
            stop = min(t, start + block)
            blocks.append((slice(start * r, stop * r), stop, (start + jnp.arange((stop - start) * r) // r)[None]))
    else:
        blocks = [(slice(0, tq * r), t, jnp.repeat(query_index, r, axis=1))]
    outs = []
    for rows, stop, query_pos in blocks:
        scores = _capped(jnp.einsum("bgmk,bgsk->bgms", qf[:, :, rows], kt[:, :, :stop],
                                    preferred_element_type=jnp.float32), softcap)
        key_pos = jnp.arange(stop)[None, None, :]
        visible = key_pos <= query_pos[:, :, None]                                       # [B|1, rows, S]
        if window is not None:  # HF: a key is seen while query - key < window
            visible = visible & _windowed(key_pos > query_pos[:, :, None] - window, window_on)
        scores = jnp.where(visible[:, None] & valid[:, None, None, :stop], scores, _MASKED)
        if prefix is not None:
            seen = prefix_scores[:, :, rows]
            if window is not None:
                in_window = jnp.arange(n_prefix)[None, None, :] > (n_prefix + query_pos[:, :, None] - window)
                seen = jnp.where(_windowed(in_window, window_on)[:, None], seen, _MASKED)
            scores = jnp.concatenate([seen, scores], axis=-1)
        weights = jnp.exp(scores - scores.max(-1, keepdims=True))
        total = weights.sum(-1, keepdims=True)
        weights = weights.astype(v.dtype)
        out = jnp.einsum("bgms,bgsk->bgmk", weights[..., n_prefix:], vt[:, :, :stop],
                         preferred_element_type=jnp.float32)
        if prefix is not None:
            out = out + jnp.einsum("bgmp,pgk->bgmk", weights[..., :n_prefix], prefix.v,
                                   preferred_element_type=jnp.float32)
        outs.append((out / total).astype(v.dtype))
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    return out.reshape(b, g, tq, r, hd).transpose(0, 2, 1, 3, 4).reshape(b, tq, h, hd)


def _capped(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _windowed(in_window: jax.Array, window_on: jax.Array | None) -> jax.Array:
    return in_window if window_on is None else in_window | ~window_on


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # per KV group: its h / kv query heads, its key head, its value head (see the module docstring)
        self.wqkv = _normal(rngs, (d, kv, h // kv + 2, hd), dtype)
        self.wo = _normal(rngs, (h, hd, d), dtype)
        self.bqkv = _normal(rngs, (kv, h // kv + 2, hd), dtype) if cfg.qkv_bias else None
        self.q_norm = RMSNorm(hd, cfg.rms_eps, dtype, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_eps, dtype, cfg.norm_offset) if cfg.qk_norm else None
        self.window = cfg.sliding_window
        self.query_scale = cfg.query_scale
        self.softcap = cfg.attn_softcap
        self.rotary_dim = cfg.rotary_dim
        self.bo = _normal(rngs, (d,), dtype) if cfg.o_bias else None

    def _rotate(self, rope: Rope, x: jax.Array) -> jax.Array:
        """RoPE over each head's first rotary_dim dims (all of them unless the family says)."""
        if self.rotary_dim is None:
            return rope.apply(x)
        return jnp.concatenate([rope.apply(x[..., :self.rotary_dim]), x[..., self.rotary_dim:]], -1)

    def _project(self, x, slots: slice) -> jax.Array:
        """x [B, T, D] -> the projections of `slots` of every KV group [B, T, G, S, hd], with the
        family's bias and per-head q/k norms applied (before RoPE, as HF does)."""
        out = jnp.einsum("btd,dgjk->btgjk", x, self.wqkv[:, :, slots])
        if self.bqkv is not None:
            out = out + self.bqkv[:, slots]
        if self.q_norm is not None:
            # the selected slots are some queries (slots < r), then maybe the key, then the value
            n_q = max(0, self.wqkv.shape[2] - 2 - (slots.start or 0))
            parts = [self.q_norm(out[:, :, :, :n_q]), self.k_norm(out[:, :, :, n_q:n_q + 1]),
                     out[:, :, :, n_q + 1:]]
            out = jnp.concatenate([p for p in parts if p.shape[3]], axis=3)
        return out

    def __call__(self, x, rope: Rope, valid, prefix: PrefixKV | None = None, query_index=None,
                 window_on=None, fused: str | None = None):
        """x: [B, T, D]; rope: tables at the batch's positions; valid: [B, T] (False on padding).

        Returns the attention output [B, T, D] (or [B, Tq, D] at query_index [B, Tq] only) and this
        layer's own keys/values (for caching).
        """
        b, t = x.shape[:2]
        _, g, slots, hd = self.wqkv.shape
        r = slots - 2  # query heads per KV group
        scale = jnp.asarray(1.0 / math.sqrt(self.query_scale or hd), x.dtype)
        if query_index is None:
            # one [d, (h + 2 kv) * hd] matmul instead of three: larger matmuls run closer to peak
            qkv = self._project(x, slice(None))
            # queries and keys rotated in one pass
            qk = self._rotate(rope, qkv[:, :, :, :r + 1].reshape(b, t, g * (r + 1), hd)).reshape(b, t, g, r + 1, hd)
            q = (qk[:, :, :, :r] * scale).reshape(b, t, g * r, hd)
            k, v = qk[:, :, :, r], qkv[:, :, :, r + 1]
        else:
            # keys and values at every position, queries only where the output is read
            kv_proj = self._project(x, slice(r, None))
            k, v = self._rotate(rope, kv_proj[:, :, :, 0]), kv_proj[:, :, :, 1]
            x_query = jnp.take_along_axis(x, query_index[:, :, None], axis=1)
            q = self._project(x_query, slice(None, r)).reshape(b, -1, g * r, hd)
            q = self._rotate(rope.take(query_index), q) * scale
        out = causal_attention(q, k, v, valid, prefix, query_index, self.window, window_on, self.softcap, fused)
        out = jnp.einsum("bthk,hkd->btd", out, self.wo[...])
        return (out if self.bo is None else out + self.bo[...]), (k, v)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or GELU-tanh (Gemma's GeGLU)."""

    def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
        if cfg.gated_mlp:
            self.w_gate_up = _normal(rngs, (cfg.d_model, 2, cfg.d_ff), dtype)  # [:, 0] gate, [:, 1] up
        else:
            self.w_up = _normal(rngs, (cfg.d_model, cfg.d_ff), dtype)
        self.w_down = _normal(rngs, (cfg.d_ff, cfg.d_model), dtype)
        self.b_up = _normal(rngs, (cfg.d_ff,), dtype) if cfg.mlp_bias else None
        self.b_down = _normal(rngs, (cfg.d_model,), dtype) if cfg.mlp_bias else None
        self.activation = cfg.mlp_activation
        self.gated = cfg.gated_mlp

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        if self.gated:
            gate_up = jnp.einsum("...d,dcf->...cf", x, self.w_gate_up[...])  # one matmul, not two
            return (act(gate_up[..., 0, :]) * gate_up[..., 1, :]) @ self.w_down[...]
        up = x @ self.w_up[...]
        if self.b_up is not None:
            up = up + self.b_up[...]
        out = act(up) @ self.w_down[...]
        return out if self.b_down is None else out + self.b_down[...]


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = make_norm(cfg, cfg.d_model, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = None if cfg.parallel_block else make_norm(cfg, cfg.d_model, dtype)
        self.mlp = MLP(cfg, dtype, rngs)
        post = lambda: make_norm(cfg, cfg.d_model, dtype) if cfg.post_norms else None  # noqa: E731
        self.attn_post_norm, self.mlp_post_norm = post(), post()

    def __call__(self, x, rope: Rope, valid, prefix: PrefixKV | None = None, query_index=None, window_on=None,
                 fused: str | None = None):
        """Returns the block's output [B, T, D], or [B, Tq, D] at query_index [B, Tq] only."""
        normed = self.attn_norm(x)
        attn_out, kv = self.attn(normed, rope, valid, prefix, query_index, window_on, fused)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[:, :, None], axis=1)
            normed = jnp.take_along_axis(normed, query_index[:, :, None], axis=1)
        if self.mlp_norm is None:  # parallel: attention and MLP read the same normed input
            return x + attn_out + self.mlp(normed), kv
        if self.attn_post_norm is not None:
            attn_out = self.attn_post_norm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            mlp_out = self.mlp_post_norm(mlp_out)
        return x + mlp_out, kv


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embedding(cfg, dtype, rngs)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtype, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = make_norm(cfg, cfg.d_model, dtype)
        self.lm_head_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), dtype)) if cfg.lm_head_bias else None
        self.lm_head = None if cfg.tie_embeddings else _normal(rngs, (cfg.d_model, cfg.vocab_size), dtype)

    def unembedding(self) -> jax.Array:
        """[d_model, vocab]: the LM head, or the transposed embeddings when tied."""
        return self.embed.weight[...].T if self.lm_head is None else self.lm_head[...]


class ForwardOutputs(NamedTuple):
    """What one forward pass reads out, per example (fp32).

    residual: [B, n_layers + 1, d_model] at the read position (or pooled), index as in the module
        docstring; None if not requested.
    final_norm: [B, d_model], the final RMSNorm of the last block's output at the read position.
    logits: [B, vocab] or [B, K] for the requested token ids; None if not requested.
    """

    residual: jax.Array | None
    final_norm: jax.Array | None
    logits: jax.Array | None


class PrefixCache(NamedTuple):
    """A shared prompt prefix run once: its per-layer keys/values and, for mean pooling, the sum of
    its residual stream over its tokens."""

    kv: PrefixKV            # k, v: [L, P, kv_heads, head_dim]
    residual_sum: jax.Array  # [n_layers + 1, d_model] fp32
    length: jax.Array        # [] int32, P


def _read(x, read_index, valid, pooling, prefix_sum=None, prefix_len=None):
    """Read one vector per example from x [B, T, D]: at read_index, or the mean over valid tokens."""
    if pooling == "last":
        return jnp.take_along_axis(x, read_index[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    total = jnp.einsum("btd,bt->bd", x.astype(jnp.float32), valid.astype(jnp.float32))
    count = valid.sum(-1, keepdims=True).astype(jnp.float32)
    if prefix_sum is not None:
        total, count = total + prefix_sum, count + prefix_len.astype(jnp.float32)
    return total / jnp.maximum(count, 1.0)


def _layer_options(cfg: LlamaConfig, positions: jax.Array):
    """A function of the layer index giving that layer's (RoPE tables, window switch): the same
    for every layer unless the family interleaves local (sliding-window) layers with global ones,
    which may also have their own RoPE base (Gemma 3)."""
    rope = Rope.at(positions, rope_inv_freq(cfg))
    if cfg.local_layers is None:
        return lambda layer_index: (rope, None)
    is_local = jnp.asarray([i in cfg.local_layers for i in range(cfg.n_layers)])
    local_rope = None if cfg.local_rope_theta is None else Rope.at(positions, rope_inv_freq(cfg, local=True))

    def options(layer_index):
        on = is_local[layer_index]
        if local_rope is None:
            return rope, on
        return jax.tree.map(lambda a, b: jnp.where(on, a, b), local_rope, rope), on

    return options


def forward(model: Llama, tokens, positions, valid, read_index, *, pooling: str = "last",
            residual: bool = True, logit_ids: jax.Array | None = None, all_logits: bool = False,
            prefix: PrefixCache | None = None, fused_attention: str | None = None) -> ForwardOutputs:
    """Run the model over a padded batch and read the residual stream at one position per example.

    tokens, positions: int32 [B, T]; valid: bool [B, T] (False on padding; left or right padding
    both work because positions are explicit); read_index: int32 [B], the position in T of each
    example's last real token. `pooling` is "last" or "mean" (over real tokens, prefix included).
    Logits are computed at read_index only: for `logit_ids` [K] if given, all vocab if
    `all_logits`. With `prefix`, the batch continues a shared prefix (positions start after it).
    fused_attention: None (the blocked attention), or "cudnn" / "xla" for jax.nn.dot_product_attention
    where it applies (see causal_attention); then rows must be right-padded.
    """
    cfg = model.config
    layer_options = _layer_options(cfg, positions)
    x = model.embed(tokens)
    prefix_sum = None if prefix is None else prefix.residual_sum
    prefix_len = None if prefix is None else prefix.length

    def read(h, layer_index):
        if not residual:
            return None
        ps = None if prefix_sum is None else prefix_sum[layer_index]
        return _read(h, read_index, valid, pooling, ps, prefix_len)

    embed_read = read(x, 0)
    graphdef, block_state = nnx.split(model.blocks)
    layer_prefix = lambda i: None if prefix is None else jax.tree.map(lambda a: a[i], prefix.kv)
    layer_block = lambda i: nnx.merge(graphdef, jax.tree.map(lambda a: a[i], block_state))
    # Reading one position, the last block only needs its output there: its keys and values at
    # every position, but queries, attention output and MLP at the read position alone.
    last_at_read = pooling == "last"
    n_scanned = cfg.n_layers - 1 if last_at_read else cfg.n_layers

    def body(h, layer_index):
        rope, window_on = layer_options(layer_index)
        h, _ = layer_block(layer_index)(h, rope, valid, layer_prefix(layer_index), window_on=window_on,
                                        fused=fused_attention)
        return h, read(h, layer_index + 1)

    x, block_reads = jax.lax.scan(body, x, jnp.arange(n_scanned))
    reads = [embed_read[:, None], jnp.swapaxes(block_reads, 0, 1)] if residual else None
    if last_at_read:
        last_layer = cfg.n_layers - 1
        rope, window_on = layer_options(last_layer)
        x = layer_block(last_layer)(x, rope, valid, layer_prefix(last_layer), read_index[:, None],
                                    window_on=window_on)[0]
        last = x[:, 0]
        if residual:
            reads.append(last[:, None].astype(jnp.float32))
    else:
        last = jnp.take_along_axis(x, read_index[:, None, None], axis=1)[:, 0]
    resid = jnp.concatenate(reads, axis=1) if residual else None
    normed = model.final_norm(last)
    logits = None
    if logit_ids is not None:
        logits = jnp.take(model.unembedding(), logit_ids, axis=1)
    elif all_logits:
        logits = model.unembedding()
    if logits is not None:
        logits = jnp.einsum("bd,dv->bv", normed, logits, preferred_element_type=jnp.float32)
        if model.lm_head_bias is not None:
            bias = model.lm_head_bias[...]
            logits = logits + (bias if logit_ids is None else jnp.take(bias, logit_ids)).astype(jnp.float32)
        logits = _capped(logits, cfg.final_softcap)
    return ForwardOutputs(resid, normed.astype(jnp.float32), logits)


def prefix_forward(model: Llama, tokens) -> PrefixCache:
    """Run a shared prefix (int32 [P]) once; return its per-layer keys/values and residual sums."""
    cfg = model.config
    tokens = tokens[None]
    n = tokens.shape[1]
    positions = jnp.arange(n, dtype=jnp.int32)[None]
    valid = jnp.ones((1, n), bool)
    layer_options = _layer_options(cfg, positions)
    x = model.embed(tokens)
    graphdef, block_state = nnx.split(model.blocks)

    def body(h, layer):
        layer_state, layer_index = layer
        block = nnx.merge(graphdef, layer_state)
        rope, window_on = layer_options(layer_index)
        h, (k, v) = block(h, rope, valid, window_on=window_on)
        return h, (k[0], v[0], h[0].astype(jnp.float32).sum(0))

    _, (ks, vs, sums) = jax.lax.scan(body, x, (block_state, jnp.arange(cfg.n_layers)))
    residual_sum = jnp.concatenate([x[0].astype(jnp.float32).sum(0)[None], sums], axis=0)
    return PrefixCache(PrefixKV(ks, vs), residual_sum, jnp.asarray(n, jnp.int32))
