"""Running a converted model over texts: tokenising, length-bucketed batching, a shared-prefix
key/value cache, and the jitted, sharded forward pass. `jaxprobe.load_model` is the entry point.

    lm = jaxprobe.load_model("smollm2-135m")
    acts = lm.activations(["a review", "another"])   # [n, n_layers + 1, d_model], last real token
    logits = lm.logits(["a review"])                 # [n, vocab] next-token logits
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprobe import checkpoint
from jaxprobe.cpu import cpu_devices_wanted, usable_cores
from jaxprobe.errors import UserError
from jaxprobe.model import ForwardOutputs, Llama, LlamaConfig, PrefixCache, forward, prefix_forward
from jaxprobe.sharding import DEFAULT_RULES, ShardingRules, make_mesh

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
POSITIONS = ("last", "mean")


def cache_dir() -> Path:
    return Path(os.environ.get("JAXPROBE_CACHE", Path.home() / ".cache" / "jaxprobe"))


def _enable_compilation_cache() -> None:
    # Recompiling the same shapes in every process costs seconds; XLA can keep them on disk.
    try:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception:  # noqa: BLE001 - an optional speed-up, never a reason to fail
        pass


# On a CPU host jaxprobe asks JAX for one device per core and splits each batch's rows over them
# (the mesh's 'data' axis), each device's Eigen matmuls on one thread. XLA's default, one CPU device
# whose matmuls are shared out over every core, makes the cores meet inside each of SmolLM2's small
# matmuls: on the reference CPU (2 cores) the forward benchmark's realistic batch-8 job ran 1.04-1.22x
# faster split over two single-threaded devices (median 1.08x; 4 runs of 5-10 alternating pairs), a
# fixed 8 x 288 batch 1.05-1.06x (30 pairs), with Eigen's threads left on only 1.05x. Every device
# holds its own copy of the weights, so the default mesh uses no more devices than copies fit in
# half the host's memory (`cpu_data_devices`). `import jaxprobe` asks for the devices (`jaxprobe.cpu`).


def cpu_data_devices(n_devices: int, param_bytes: int, host_bytes: int) -> int:
    """How many CPU devices the default mesh puts on 'data': all, or as many copies of the weights
    as fit in half the host's memory (at least one)."""
    return max(1, min(n_devices, int(0.5 * host_bytes) // max(param_bytes, 1)))


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not limit


# XLA's CPU backend hands f32 matmuls to YNNPACK by default. On the reference CPU (2 cores,
# AVX-512, x86-64) its oneDNN matmuls run SmolLM2's forward pass fastest, 2-5% over Eigen's
# (median of 10-30 alternations per shape), which beat YNNPACK's by 10-13%.
# XLA takes one library per program. JAXPROBE_CPU_MATMUL (onednn, eigen, ynnpack) fixes the choice.
CPU_MATMUL_OPTIONS = {
    "ynnpack": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}
# XLA cannot write oneDNN programs to its on-disk compilation cache, so every process compiles
# them anew (2.5 s more than loading an Eigen program from disk, for SmolLM2's forward). A program
# shape gets oneDNN only when its planned work is long enough for the ~3% to repay that:
# 2e13 FLOPs, about 100 s at 200 GFLOP/s.
ONEDNN_MIN_FLOPS = 2e13
warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry.*onednn")


def cpu_matmul_library(planned_flops: float = 0.0) -> str:
    """The CPU matmul library for a program that will run `planned_flops` in this process:
    JAXPROBE_CPU_MATMUL if set; else oneDNN on x86-64 (the only place jaxlib ships it) when the
    work repays its uncached compile, Eigen otherwise."""
    choice = os.environ.get("JAXPROBE_CPU_MATMUL", "").strip().lower()
    if choice:
        if choice not in CPU_MATMUL_OPTIONS:
            raise UserError(f"JAXPROBE_CPU_MATMUL={choice!r}: expected one of {', '.join(CPU_MATMUL_OPTIONS)}")
        return choice
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if x86 and planned_flops >= ONEDNN_MIN_FLOPS else "eigen"


# XLA's CPU backend rewrites every reduction over more than 32 elements into a reduce-window pass
# and a reduce (pairwise summation, for accuracy), and fuses neither with its neighbours. In
# attention that is softmax's row max and row sum: turning the rewrite off halves attention's time
# and makes SmolLM2's forward 7-11% faster (median of 10 alternations, Eigen and oneDNN alike), and
# moves its activations by at most 5e-6. All its reductions are fp32 rows of at most a few
# thousand elements, where one pass loses nothing that matters (the parity tests hold it to HF).
CPU_FORWARD_OPTIONS = {"xla_disable_hlo_passes": "tree_reduction_rewriter"}


def compiler_options(mesh, library: str | None = None, rows_split: bool = True) -> dict | None:
    """XLA options for forward programs on this mesh: on CPU, the matmul library (default: the
    choice for a short program), `CPU_FORWARD_OPTIONS`, and single-threaded Eigen matmuls when the
    program splits its rows over at least one device per core; nothing elsewhere."""
    if all(d.platform == "cpu" for d in mesh.devices.flat):
        options = {**CPU_MATMUL_OPTIONS[library or cpu_matmul_library()], **CPU_FORWARD_OPTIONS}
        if rows_split and mesh.devices.size > 1 and mesh.devices.size >= usable_cores():
            options["xla_cpu_multi_thread_eigen"] = False
        return options
    return None


def forward_flops(cfg: LlamaConfig, rows: int, length: int) -> float:
    """Matmul FLOPs of one forward pass over a [rows, length] batch (blocks only, causal attention)."""
    d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    weights = d * hd * (2 * h + 2 * kv) + 3 * d * f
    attention = 2 * h * hd * length * (length + 1) / 2  # QK^T and PV over the visible keys
    return cfg.n_layers * rows * (2 * weights * length + 2 * attention)


def bucket_length(n: int) -> int:
    """Pad lengths to a coarse grid (multiples of 8 up to 64, of 16 up to 128, then ~12% steps) so
    a run over varied lengths compiles a handful of shapes, with little padding."""
    n = int(n)
    if n <= 64:
        return max(8, -(-n // 8) * 8)
    if n <= 128:
        return -(-n // 16) * 16
    step = 1 << max(4, (n // 8).bit_length() - 1)
    return -(-n // step) * step


# What one more batch costs beyond its tokens, in tokens: a forward pass copies every layer's
# weights out of the stacked arrays once whatever the batch, and oneDNN also reorders each weight
# on every call. For SmolLM2 on the reference CPU a fit over 11 batch shapes gives 87 ms (Eigen)
# to 133 ms (oneDNN) a batch at 0.90 ms a token: 96-147 tokens' worth.
BATCH_OVERHEAD_TOKENS = 128

# What one more batch shape costs a run beyond its batches: a program to trace, lower and load from
# XLA's disk cache (0.15-0.5 s a shape for SmolLM2 here) or, the first time, to compile (about 2.2
# s). The planner counts the low end, 0.15 s of forward work at about 200 GFLOP/s, in FLOPs so
# that it weighs little against a large model's tokens: about 140 tokens of SmolLM2, 1 of a 13B
# model. Twice that also merged batches of different lengths and ran the warm forward benchmark's
# batch-8 job 3-5% slower (two runs of 5 and 8 alternating pairs); this much, 0.976x (6 pairs).
SHAPE_OVERHEAD_FLOPS = 3e10


def shape_overhead_tokens(cfg: LlamaConfig) -> float:
    """`SHAPE_OVERHEAD_FLOPS` in tokens of this model's forward pass."""
    return SHAPE_OVERHEAD_FLOPS / forward_flops(cfg, 1, 1)


# A batch of texts shorter than the run's longest may hold more than batch_size rows: as many as
# fit in the tokens of batch_size rows at the longest text's bucketed length, or in
# MIN_BATCH_TOKENS, whichever is more (with a shared prefix, every row counts it too), and at most
# MAX_ROWS_FACTOR x batch_size. Short texts then run in larger matmuls and fewer batches pay the
# fixed cost: SST-2 validation (24 tokens a sentence) at batch size 8 runs in 21 batches instead of
# 109, 1.33x faster (median of 4 alternating pairs), activations within 1e-7 of their norm.
# 2,048 tokens is far below what a batch of long texts needs, for any model this runs.
MAX_ROWS_FACTOR = 8
MIN_BATCH_TOKENS = 2048


def batch_row_counts(batch_size: int, multiple: int = 1) -> list[int]:
    """The row counts a batch may have: batch_size, its halves and its doublings up to
    MAX_ROWS_FACTOR x batch_size (a few compiled shapes, not one per remainder), each rounded up
    to a multiple of the data axis."""
    counts = {max(1, batch_size >> k) for k in range(batch_size.bit_length())}
    counts |= {batch_size << k for k in range(1, MAX_ROWS_FACTOR.bit_length())}
    return sorted({-(-c // multiple) * multiple for c in counts})


def padded_rows(n_texts: int, batch_size: int, multiple: int = 1) -> int:
    """The rows a batch of n_texts texts is padded to: the least allowed row count that holds them."""
    return min(c for c in batch_row_counts(batch_size, multiple) if c >= n_texts)


def plan_batches(lengths: Sequence[int], batch_size: int, multiple: int = 1, prefix_length: int = 0,
                 overhead_tokens: float = BATCH_OVERHEAD_TOKENS, shape_tokens: float = 0.0) -> list[list[int]]:
    """Split texts (by token count) into batches, longest first, with the least padded work: cuts
    between length-sorted texts are chosen by dynamic programming to minimise the sum over batches
    of overhead_tokens + rows * bucket_length(longest), plus shape_tokens for every batch whose
    shape (rows, length) differs from the batch before it (a program to trace and load or compile;
    see `SHAPE_OVERHEAD_FLOPS`). A batch's rows are one of `batch_row_counts`, so unused rows count
    as padding too. A batch holds at most batch_size texts (rounded up to the data axis), or more
    while rows * (its length + prefix_length) stays within the token budget (see
    `MIN_BATCH_TOKENS`), so no batch needs much more memory than the first. Returns lists of
    indices into `lengths`."""
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    counts = batch_row_counts(batch_size, multiple)
    plain_rows = padded_rows(batch_size, batch_size, multiple)  # batch_size rows, as the data axis pads them
    rows_for = np.array([0] + [padded_rows(k, batch_size, multiple) for k in range(1, counts[-1] + 1)])
    count_index = np.searchsorted(counts, rows_for)  # which of `counts` k texts are padded to
    padded_length = np.array([bucket_length(lengths[i]) for i in order] + [0])
    budget = max(batch_size * (padded_length[0] + prefix_length), MIN_BATCH_TOKENS)
    # best[j]: least cost of the first j sorted texts, cut[j] where its last batch starts and
    # new[j] whether that batch's shape was new. best_same[j, c]: the same, among plans whose last
    # batch has counts[c] rows and the length of text j's bucket, so a batch starting at text j
    # can have its shape for free (lengths are sorted: a shape can only recur in a row).
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=int)
    new = np.ones(n + 1, dtype=bool)
    best_same = np.full((n + 1, len(counts)), np.inf)
    cut_same = np.zeros((n + 1, len(counts)), dtype=int)
    new_same = np.ones((n + 1, len(counts)), dtype=bool)
    for j in range(1, n + 1):
        k = np.arange(1, min(counts[-1], j) + 1)
        i = j - k  # the batch of sorted texts i..j-1, whose longest is text i
        rows, length, c = rows_for[k], padded_length[i], count_index[k]
        fits = (rows <= plain_rows) | (rows * (length + prefix_length) <= budget)
        as_new, as_same = best[i] + shape_tokens, best_same[i, c]
        is_new = as_new <= as_same
        cost = np.where(fits, np.minimum(as_new, as_same) + overhead_tokens + rows * length, np.inf)
        m = int(np.argmin(cost))  # among equal costs, the fewest texts
        best[j], cut[j], new[j] = cost[m], i[m], is_new[m]
        # the cheapest plan per row count among those whose last batch the next text's may repeat
        match = np.flatnonzero((length == padded_length[j]) & fits)
        if match.size:
            match = match[np.argsort(cost[match], kind="stable")]
            c_match, first = np.unique(c[match], return_index=True)
            win = match[first]
            best_same[j, c_match], cut_same[j, c_match], new_same[j, c_match] = cost[win], i[win], is_new[win]
    batches, j, same = [], n, None  # same: the row-count index the batch ending at j must have
    while j > 0:
        i, is_new = (cut[j], new[j]) if same is None else (cut_same[j, same], new_same[j, same])
        batches.append(order[i:j])
        same = None if is_new else int(count_index[j - i])
        j = int(i)
    return batches[::-1]


def longest_common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    if not seqs:
        return []
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return list(first[:n])


def _readable_prefix(ids: Sequence[Sequence[int]]) -> list[int]:
    """The common prefix, cut so that every sequence keeps at least one token after it."""
    if not ids:
        return []
    return longest_common_prefix(ids)[: max(0, min(len(r) for r in ids) - 1)]


class LanguageModel:
    """A loaded model with its tokenizer, placed on a device mesh. See the module docstring."""

    def __init__(self, model: Llama, tokenizer, *, name: str, mesh, rules: ShardingRules = DEFAULT_RULES):
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.name = name
        self.mesh = mesh
        self.rules = rules
        self.graphdef, self.state = nnx.split(model)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self._fingerprint: str | None = None
        self._programs: dict = {}

    # ---------------------------------------------------------------- identity

    @property
    def n_hook_points(self) -> int:
        return self.config.n_layers + 1

    @property
    def hook_point_names(self) -> list[str]:
        return ["embed"] + [f"blocks.{i}.resid_post" for i in range(self.config.n_layers)]

    @property
    def fingerprint(self) -> str:
        """sha256 over the config and per-tensor float64 sums of the weights: equal means same model."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            sums = jax.tree.map(lambda x: float(jnp.sum(x.astype(jnp.float32))), nnx.to_pure_dict(self.state))
            h.update(json.dumps(sums, sort_keys=True).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ---------------------------------------------------------------- tokens

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Whole texts with the tokenizer's default special tokens (SmolLM2: none; Llama-2: BOS)."""
        if isinstance(texts, str):
            raise UserError("expected a list of texts, got a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"text {i} is a {type(t).__name__}, not a string")
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        for i, row in enumerate(ids):
            if not row:
                raise UserError(f"text {i} is empty after tokenisation ({texts[i][:40]!r})")
        return [list(r) for r in ids]

    def common_prefix(self, texts: Sequence[str]) -> list[int]:
        """Longest common token prefix of the whole-text tokenisations, leaving at least one token
        of every text after it (the read position must be in the batch part)."""
        return _readable_prefix(self.tokenize(texts))

    # ---------------------------------------------------------------- compiled programs

    def _batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, P("data", *([None] * (ndim - 1))))

    def _program(self, *, pooling: str, residual: bool, all_logits: bool, has_ids: bool, has_prefix: bool,
                 library: str | None = None):
        key = (pooling, residual, all_logits, has_ids, has_prefix, library)
        if key in self._programs:
            return self._programs[key]
        graphdef = self.graphdef

        def run(state, tokens, positions, valid, read_index, logit_ids, prefix):
            model = nnx.merge(graphdef, state)
            return forward(model, tokens, positions, valid, read_index, pooling=pooling,
                           residual=residual, logit_ids=logit_ids, all_logits=all_logits, prefix=prefix)

        row2, row1 = self._batch_sharding(2), self._batch_sharding(1)
        replicated = NamedSharding(self.mesh, P())
        outs = ForwardOutputs(self._batch_sharding(3) if residual else None, row2,
                              row2 if (all_logits or has_ids) else None)
        program = jax.jit(
            run,
            in_shardings=(self._param_shardings(), row2, row2, row2, row1,
                          replicated if has_ids else None, replicated if has_prefix else None),
            out_shardings=outs, compiler_options=compiler_options(self.mesh, library))
        self._programs[key] = program
        return program

    def _param_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.state)

    @functools.cached_property
    def _prefix_program(self):
        graphdef = self.graphdef
        replicated = NamedSharding(self.mesh, P())

        def run(state, tokens):
            return prefix_forward(nnx.merge(graphdef, state), tokens)

        # every device computes the same prefix, so Eigen keeps its threads
        return jax.jit(run, in_shardings=(self._param_shardings(), replicated), out_shardings=replicated,
                       compiler_options=compiler_options(self.mesh, rows_split=False))

    def prefix_cache(self, prefix_tokens: Sequence[int]) -> PrefixCache:
        return self._prefix_program(self.state, jnp.asarray(prefix_tokens, jnp.int32))

    # ---------------------------------------------------------------- the main entry

    def run(self, texts: Sequence[str], *, activations: bool = True, token_ids: Sequence[int] | None = None,
            all_logits: bool = False, positions: str = "last", batch_size: int = 8,
            max_length: int | None = None, prefix_tokens: Sequence[int] | str | None = None,
            progress: bool = False) -> dict[str, np.ndarray]:
        """One forward pass per batch; returns {"activations": [n, L+1, D], "final_norm": [n, D],
        "logits": [n, K or vocab]} (those requested), in input order, float32."""
        if positions not in POSITIONS:
            raise UserError(f"positions must be one of {POSITIONS}, not {positions!r}")
        if batch_size < 1:
            raise UserError(f"batch size must be positive, not {batch_size}")
        ids = self.tokenize(texts)
        n = len(ids)
        max_length = max_length or self.config.max_position
        if isinstance(prefix_tokens, str):
            if prefix_tokens != "auto":
                raise UserError(f"prefix_tokens must be None, 'auto' or a token list, not {prefix_tokens!r}")
            prefix = _readable_prefix(ids)
        else:
            prefix = list(prefix_tokens or [])
        for i, row in enumerate(ids):
            if prefix and (len(row) <= len(prefix) or row[: len(prefix)] != prefix):
                raise UserError(f"text {i} does not start with the shared prefix's {len(prefix)} tokens "
                                f"(or has nothing after it)")
            if len(row) > max_length:
                if prefix:
                    raise UserError(f"text {i} has {len(row)} tokens, over max_length={max_length}; "
                                    f"truncation would cut the shared prefix")
                ids[i] = row[-max_length:]  # keep the end: the read position is the last token
        suffixes = [row[len(prefix):] for row in ids]

        out: dict[str, np.ndarray] = {}
        if activations:
            out["activations"] = np.zeros((n, self.n_hook_points, self.config.d_model), np.float32)
        out["final_norm"] = np.zeros((n, self.config.d_model), np.float32)
        want_logits = token_ids is not None or all_logits
        if want_logits:
            k = self.config.vocab_size if token_ids is None else len(token_ids)
            out["logits"] = np.zeros((n, k), np.float32)
        if n == 0:
            return out
        logit_ids = None
        if token_ids is not None:
            token_ids = [int(t) for t in token_ids]
            bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
            logit_ids = jnp.asarray(token_ids, jnp.int32)

        cache = self.prefix_cache(prefix) if prefix else None
        data_size = self.mesh.shape["data"]
        # longest first: a batch too large for memory fails at once, not at the end
        batches = plan_batches([len(r) for r in suffixes], batch_size, data_size, len(prefix),
                               shape_tokens=shape_overhead_tokens(self.config))
        shapes = [(padded_rows(len(rows), batch_size, data_size), bucket_length(max(len(suffixes[i]) for i in rows)))
                  for rows in batches]
        shape_flops: dict[tuple[int, int], float] = {}
        for shape in shapes:
            shape_flops[shape] = shape_flops.get(shape, 0.0) + forward_flops(self.config, *shape)
        programs = {shape: self._program(pooling=positions, residual=activations,
                                         all_logits=all_logits and token_ids is None, has_ids=logit_ids is not None,
                                         has_prefix=cache is not None, library=cpu_matmul_library(flops))
                    for shape, flops in shape_flops.items()}

        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="forward", unit="text", disable=not progress, dynamic_ncols=True)
        n_tokens, t0 = 0, time.perf_counter()
        for rows, shape in zip(batches, shapes):
            batch = _pad_batch([suffixes[i] for i in rows], len(prefix), shape)
            res = programs[shape](self.state, *batch, logit_ids, cache)
            take = len(rows)
            if activations:
                out["activations"][rows] = np.asarray(res.residual)[:take]
            out["final_norm"][rows] = np.asarray(res.final_norm)[:take]
            if want_logits:
                out["logits"][rows] = np.asarray(res.logits)[:take]
            n_tokens += sum(len(ids[i]) for i in rows)
            bar.update(take)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):,.0f} tok/s")
        bar.close()
        return out

    def activations(self, texts: Sequence[str], *, positions: str = "last", batch_size: int = 8,
                    max_length: int | None = None, prefix_tokens=None, progress: bool = False) -> np.ndarray:
        """float32 [n_texts, n_layers + 1, d_model]: index 0 = embeddings, i + 1 = block i output."""
        return self.run(texts, activations=True, positions=positions, batch_size=batch_size,
                        max_length=max_length, prefix_tokens=prefix_tokens, progress=progress)["activations"]

    def logits(self, texts: Sequence[str], *, token_ids: Sequence[int] | None = None, batch_size: int = 8,
               max_length: int | None = None, prefix_tokens=None, progress: bool = False) -> np.ndarray:
        """float32 next-token logits at each text's last token: [n, vocab], or [n, K] for token_ids."""
        return self.run(texts, activations=False, token_ids=token_ids, all_logits=token_ids is None,
                        batch_size=batch_size, max_length=max_length, prefix_tokens=prefix_tokens,
                        progress=progress)["logits"]


def _pad_batch(rows: list[list[int]], offset: int, shape: tuple[int, int] | None = None):
    """Right-pad a batch to shape (n_rows, length), filler rows after the real ones; by default
    the rows as they are and the bucketed length of the longest.

    Returns tokens, positions, valid, read_index (int32/bool numpy arrays)."""
    b, t = shape or (len(rows), bucket_length(max(len(r) for r in rows)))
    tokens = np.zeros((b, t), np.int32)
    valid = np.zeros((b, t), bool)
    lengths = np.ones((b,), np.int32)
    for j, r in enumerate(rows):
        tokens[j, : len(r)] = r
        valid[j, : len(r)] = True
        lengths[j] = len(r)
    valid[len(rows):, 0] = True  # filler rows: one real token so nothing is empty
    positions = np.broadcast_to(np.arange(offset, offset + t, dtype=np.int32), (b, t)).copy()
    return tokens, positions, valid, lengths - 1


# -------------------------------------------------------------------- loading


def _converted_path(src: str, dtype: str) -> Path:
    """Where an HF folder / GGUF / the default model is converted to on first use."""
    from jaxprobe.convert import DEFAULT_MODEL, resolve_source

    kind, path = resolve_source(src)
    if str(src).lower() in (DEFAULT_MODEL, "smollm2", "default"):
        repo_ckpt = Path(__file__).resolve().parent.parent / "checkpoints"
        base = repo_ckpt if repo_ckpt.is_dir() and os.access(repo_ckpt, os.W_OK) else cache_dir() / "checkpoints"
        return base / (DEFAULT_MODEL if dtype == "float32" else f"{DEFAULT_MODEL}-{dtype}")
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{dtype}".encode()).hexdigest()[:12]
    return cache_dir() / "checkpoints" / f"{path.stem}-{tag}"


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer. With a tokenizer.json (every fast tokenizer) the generic fast
    class reads it without AutoTokenizer's model-class lookup, which imports torch (seconds)."""
    if (Path(folder) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_model(src: str | os.PathLike = "smollm2-135m", *, dtype: str = "float32",
               mesh_shape: tuple[int, int] | None = None, rules: ShardingRules = DEFAULT_RULES) -> LanguageModel:
    """Load a model for reading activations and logits.

    src: a folder written by `jaxprobe convert`, an HF folder (config.json + safetensors), a llama
    .gguf file, or "smollm2-135m" (the embedded default). Sources that are not converted yet are
    converted once (checkpoints/ or ~/.cache/jaxprobe/checkpoints) and reused afterwards.
    dtype: "float32" (default; fastest on CPUs without bf16 units) or "bfloat16".
    mesh_shape: (data, model) device counts; default all devices on 'data' (on a CPU host, one device
    per core: see `jaxprobe.cpu`; as many as copies of the weights fit in half its
    memory).
    """
    from jaxprobe.convert import DEFAULT_MODEL, convert

    if dtype not in _DTYPES:
        raise UserError(f"dtype must be one of float32, bfloat16; not {dtype!r}")
    cpu_devices_wanted()  # a bad JAXPROBE_CPU_DEVICES stops here, with its value
    _enable_compilation_cache()
    src = str(src)
    if checkpoint.is_checkpoint(src):
        path = Path(src)
        name = DEFAULT_MODEL if path.name.startswith(DEFAULT_MODEL) else path.name
    else:
        path = _converted_path(src, "float32")
        name = DEFAULT_MODEL if src.lower() in (DEFAULT_MODEL, "smollm2", "default") else Path(src).stem
        current = checkpoint.is_checkpoint(path) and checkpoint.param_layout(path) == checkpoint.PARAM_LAYOUT
        if not current:
            if path.exists():  # a conversion killed half-way, or one in an older layout: start again
                import shutil

                shutil.rmtree(path)
            print(f"converting {src} -> {path} (once)")
            convert(src, path)
    cfg = checkpoint.load_config(path)
    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=_DTYPES[dtype], rngs=nnx.Rngs(0)))
    if mesh_shape is None and jax.default_backend() == "cpu":
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract)))
        mesh_shape = (cpu_data_devices(jax.device_count(), param_bytes, _host_memory_bytes()), 1)
    try:
        mesh = make_mesh(mesh_shape)
    except ValueError as e:
        raise UserError(str(e)) from None
    params = checkpoint.load_params(path, cfg, mesh, rules, _DTYPES[dtype])
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    tokenizer = load_tokenizer(path / "tokenizer")
    return LanguageModel(model, tokenizer, name=name, mesh=mesh, rules=rules)
