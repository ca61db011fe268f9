"""Weight conversion: HF safetensors folders and GGUF files -> a jaxprobe checkpoint folder.

A checkpoint folder holds `config.json` (our `LlamaConfig`), `params/` (an Orbax checkpoint of the
model's NNX parameter state), `source.json` (where it came from) and `tokenizer/`, so later
runs need neither torch nor the source. Conversion streams tensor by tensor into the stacked
parameter arrays (one copy of the model in host memory) and fails loudly, in one line, on an
unknown key, a missing key, a shape that disagrees with the config, or a config field we do not
implement. What it reads with: `source_paths` (where a source's files are), `hf_mapping` (HF
config and tensor names -> ours) and `gguf_files` (GGUF metadata, tensors and tokenizer).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.files import (
    check_empty_folder,
    claim_empty_folder,
    load_json_object,
    release_folder,
)
from jaxprobe.gguf_files import gguf_config, gguf_tokenizer, iter_gguf, open_gguf
from jaxprobe.hf_mapping import HF_LAYER, hf_config_to_llama, hf_tensor_names, hf_to_ours, target_param
from jaxprobe.model import LlamaConfig, param_shapes
from jaxprobe.moved import forward
from jaxprobe.source_paths import TOKENIZER_FILES, resolve_source

# names that lived here before source_paths, hf_mapping and gguf_files: kept for one release
__getattr__ = forward(__name__, "jaxprobe.source_paths", "jaxprobe.hf_mapping", "jaxprobe.gguf_files")

# --------------------------------------------------------------------------------------------
# HF safetensors: (HF name, numpy array in torch layout), one tensor at a time.


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
        reader = open_gguf(path)
        cfg = gguf_config(reader, str(path))
        tensors = iter_gguf(reader, cfg)
        save_tokenizer = lambda d: gguf_tokenizer(reader).save_pretrained(d)  # noqa: E731

    # Tensors by name: safetensors memory-mapped (no byte read yet), GGUF's dequantized. Every
    # name is checked before anything is written; then each parameter is filled, written and
    # dropped in turn, so host memory holds one stacked parameter, not the model.
    sources = dict(tensors)
    shapes = param_shapes(cfg)
    targets = {name: target_param(cfg, name) for name in sources}
    for name, target in targets.items():
        layer = HF_LAYER.fullmatch(name)
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
