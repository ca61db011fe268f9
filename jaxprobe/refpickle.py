"""Read the reference notebook's activation pickles without torch and without running their code.

The reference (specs/probing.md section 1.6) saved `{"activations": [float32 tensor [d], ...],
"labels": [int, ...]}` with a plain `pickle.dump`, to files named
`{train,test}_activations[_with_prompts]_demo_{L}.pkl`. A torch tensor pickles as

    torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())
    storage = torch.storage._load_from_bytes(<bytes of a legacy torch.save of the storage>)

and those bytes are five pickles in a row (magic number, protocol version, system info, the
storage's persistent id `('storage', torch.FloatStorage, key, location, numel, None)`, the list of
storage keys) followed by each storage's element count (int64) and raw bytes.

Unpickling calls whatever globals a file names, so a pickle can run any code. Here every pickle
goes through an unpickler whose `find_class` knows only those three globals (and the
`torch.*Storage` names inside the storage bytes), each replaced by a numpy re-implementation;
any other global is refused with a `UserError` naming the file and the global, before it is
called.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.errors import UserError

_NAME = re.compile(r"^(?P<split>train|test)_activations(?P<prompts>_with_prompts)?_demo"
                   r"(?:_(?P<layer>\d+))?\.pkl$")

# torch's legacy `torch.save` header (torch/serialization.py: MAGIC_NUMBER, PROTOCOL_VERSION)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class -> numpy dtype of its elements (bfloat16 handled apart: numpy has none)
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Refused(Exception):
    """A pickle asked for something outside the allow-list; becomes a UserError naming the file."""


def parse_reference_name(path: str | Path) -> tuple[str, bool, int]:
    """(split, with_prompts, layer) from a reference file name, e.g.
    `train_activations_with_prompts_demo_20.pkl` -> ("train", True, 20)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise UserError(f"{path}: not a reference activation pickle name; expected "
                        f"{{train,test}}_activations[_with_prompts]_demo_{{LAYER}}.pkl")
    if match["layer"] is None:
        raise UserError(f"{path}: the name has no layer suffix (the OPT-175B originals); rename it "
                        f"to ..._demo_95.pkl, the layer it holds (decoder.layers.95.fc2)")
    return match["split"], match["prompts"] is not None, int(match["layer"])


# ------------------------------------------------------------------------------------------------
# numpy stand-ins for the three globals a reference pickle may name
# ------------------------------------------------------------------------------------------------

class _Storage:
    """A torch storage's elements as a flat numpy array."""

    def __init__(self, values: np.ndarray):
        self.values = values


def _empty_ordered_dict(*args: Any) -> dict:
    # Only ever called with no arguments, as the tensor's (empty) backward hooks.
    if args:
        raise _Refused("collections.OrderedDict with contents")
    return collections.OrderedDict()


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2, returning a numpy copy. Checks every index stays inside
    the storage before striding over it (as_strided itself would read past the end)."""
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor whose storage is not a plain storage")
    if backward_hooks:
        raise _Refused("a tensor with backward hooks")
    if not (isinstance(storage_offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(v, int) for v in size + stride)):
        raise _Refused("a tensor with malformed size/stride")
    if storage_offset < 0 or any(v < 0 for v in size + stride):
        raise _Refused("a tensor with negative size, stride or offset")
    values = storage.values
    if 0 in size:
        return np.zeros(size, values.dtype)
    if math.prod(size) > values.size:  # zero or overlapping strides: memory the file cannot justify
        raise _Refused(f"a tensor of {math.prod(size)} elements over a {values.size}-element storage")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= values.size:
        raise _Refused(f"a tensor reaching element {last} of a {values.size}-element storage")
    view = np.lib.stride_tricks.as_strided(values[storage_offset:], shape=size,
                                           strides=tuple(s * values.itemsize for s in stride),
                                           writeable=False)
    return np.array(view)


def _load_from_bytes(data: Any) -> _Storage:
    """torch.storage._load_from_bytes: parse a legacy (non-zip) torch.save of one storage."""
    if not isinstance(data, bytes):
        raise _Refused("storage bytes that are not bytes")
    if data.startswith(b"PK"):
        raise _Refused("a storage saved in torch's zip format (the reference used the legacy one)")
    stream = io.BytesIO(data)
    if _inner_load(stream) != _LEGACY_MAGIC:
        raise _Refused("storage bytes without torch's legacy magic number")
    if _inner_load(stream) != _LEGACY_PROTOCOL:
        raise _Refused("storage bytes of an unknown torch protocol version")
    sys_info = _inner_load(stream)
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    declared: dict[str, tuple[Any, int]] = {}  # storage key -> (dtype, numel)

    def persistent_load(pid: Any) -> str:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise _Refused(f"persistent id {pid!r:.60}")
        _, dtype, key, _location, numel, view_metadata = pid
        if view_metadata is not None:
            raise _Refused("a storage view (pre-1.0 torch format)")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _Refused("a malformed storage record")
        declared.setdefault(key, (dtype, numel))
        return key

    root_key = _inner_load(stream, persistent_load=persistent_load, storage_types=True)
    keys = _inner_load(stream)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and set(keys) == set(declared) and root_key in declared):
        raise _Refused("storage bytes whose key list does not match their records")
    storages = {}
    for key in keys:
        dtype, numel = declared[key]
        header = stream.read(8)
        if len(header) != 8:
            raise _Refused("storage bytes that end early (truncated file?)")
        (count,) = struct.unpack("<q" if little_endian else ">q", header)
        if count != numel:
            raise _Refused(f"a storage of {count} elements declared as {numel}")
        storages[key] = _storage_values(stream, dtype, numel, little_endian)
    return _Storage(storages[root_key])


def _storage_values(stream: io.BytesIO, dtype: Any, numel: int, little_endian: bool) -> np.ndarray:
    if dtype == "bfloat16":
        raw = stream.read(2 * numel)
        if len(raw) != 2 * numel:
            raise _Refused("storage bytes that end early (truncated file?)")
        # bfloat16 is the top half of a float32
        halves = np.frombuffer(raw, np.dtype(np.uint16).newbyteorder("<" if little_endian else ">"))
        return (halves.astype(np.uint32) << 16).view(np.float32)
    element = np.dtype(dtype).newbyteorder("<" if little_endian else ">")
    raw = stream.read(element.itemsize * numel)
    if len(raw) != element.itemsize * numel:
        raise _Refused("storage bytes that end early (truncated file?)")
    return np.frombuffer(raw, element).astype(element.newbyteorder("="))


# ------------------------------------------------------------------------------------------------
# The restricted unpicklers
# ------------------------------------------------------------------------------------------------

_OUTER_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("collections", "OrderedDict"): _empty_ordered_dict,
}


class _OuterUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _OUTER_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refused(f"global {module}.{name}")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r:.60}")


class _InnerUnpickler(pickle.Unpickler):
    """The pickles inside a storage's bytes: only `torch.<Type>Storage` names (mapped to dtypes)."""

    def __init__(self, stream, *, persistent_load=None, storage_types=False):
        super().__init__(stream)
        self._persistent = persistent_load
        self._storage_types = storage_types

    def find_class(self, module: str, name: str) -> Any:
        if self._storage_types and module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _Refused(f"global {module}.{name} (inside a storage)")

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise _Refused(f"persistent id {pid!r:.60}")
        return self._persistent(pid)


def _inner_load(stream: io.BytesIO, *, persistent_load=None, storage_types=False) -> Any:
    return _InnerUnpickler(stream, persistent_load=persistent_load,
                           storage_types=storage_types).load()


# ------------------------------------------------------------------------------------------------
# The public reader
# ------------------------------------------------------------------------------------------------

def load_reference_pickle(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(activations float32 [n, d], labels int64 [n]) from one reference pickle, torch-free.

    Refuses (UserError, one line naming the file) anything but the reference's layout: a dict
    with equal-length lists "activations" (1-D float tensors of one length) and "labels" (0/1
    integers, or 0-d integer tensors), and any pickle that names a global outside the allow-list.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _OuterUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a reference pickle") from None
    except _Refused as e:
        raise UserError(f"{path}: refused to unpickle {e}: only torch tensors are rebuilt "
                        f"(this file could run code)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, UnicodeDecodeError, MemoryError) as e:
        raise UserError(f"{path}: not a readable pickle (truncated or corrupt?): "
                        f"{type(e).__name__}: {str(e)[:120]}") from None
    return _check_layout(obj, path)


def _check_layout(obj: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict) or not {"activations", "labels"} <= set(obj):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: expected a dict with 'activations' and 'labels', found {keys}")
    activations, labels = obj["activations"], obj["labels"]
    if not isinstance(activations, (list, tuple)) or not isinstance(labels, (list, tuple)):
        raise UserError(f"{path}: 'activations' and 'labels' must be lists")
    if len(activations) != len(labels):
        raise UserError(f"{path}: {len(activations)} activations but {len(labels)} labels")
    if not activations:
        raise UserError(f"{path}: holds no examples")
    width = None
    for row, vector in enumerate(activations):
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype.kind != "f":
            what = (f"shape {vector.shape} {vector.dtype}" if isinstance(vector, np.ndarray)
                    else type(vector).__name__)
            raise UserError(f"{path}: row {row}: activation is {what}, expected a 1-D float tensor")
        if width is None:
            width = vector.shape[0]
        elif vector.shape[0] != width:
            raise UserError(f"{path}: row {row}: activation has {vector.shape[0]} values, "
                            f"row 0 has {width}")
    out_labels = np.empty(len(labels), np.int64)
    for row, label in enumerate(labels):
        value = label.item() if isinstance(label, np.ndarray) and label.ndim == 0 else label
        if not isinstance(value, (int, np.integer)):
            raise UserError(f"{path}: row {row}: label {value!r:.40} is not an integer")
        out_labels[row] = value
    return np.stack(activations).astype(np.float32, copy=False), out_labels
