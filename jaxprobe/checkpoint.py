"""The jaxprobe checkpoint folder: `config.json`, `source.json`, tokenizer files, and `params/`,
an Orbax checkpoint of the model's NNX parameter state as a pure dict. Parameters restore straight
into their sharded layout (abstract targets carry `NamedSharding`s)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import jax
import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.files import load_json_object, save_json
from jaxprobe.model import PARAM_AXES, LlamaConfig, param_shapes


def _nest(flat: dict[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def save_checkpoint(out: Path, cfg: LlamaConfig,
                    params: Mapping[tuple[str, ...], np.ndarray] | Iterable[tuple[tuple[str, ...], np.ndarray]],
                    source: dict) -> None:
    """Write a checkpoint folder, one parameter at a time: `params` (a dict, or pairs made one by
    one by a generator) is consumed, so host memory holds about one parameter, never the model.

    Each parameter goes into Orbax's partial save of params/ (finalized at the end), handed over
    without Orbax's defensive copy; config.json, written last, marks the folder whole."""
    from orbax.checkpoint.experimental import v1 as ocp
    from orbax.checkpoint.experimental.v1 import partial

    out = Path(out).absolute()
    if isinstance(params, Mapping):
        params = _popped(params if isinstance(params, dict) else dict(params))
    context = ocp.Context()
    context.memory.deepcopy_host_arrays = False  # each array is ours and is dropped once written
    with context:
        for path, array in params:
            partial.save(out / "params", _nest({path: np.ascontiguousarray(array)}))
            del array
        partial.finalize(out / "params")
    save_json(out / "source.json", source)
    save_json(out / "config.json", cfg.to_dict())  # written last: its presence marks a whole checkpoint


def _popped(params: dict) -> Iterator:
    while params:
        path = next(iter(params))
        yield path, params.pop(path)


def params_tree(path: Path) -> Path:
    """Where a checkpoint's parameter tree is: params/state (written one parameter at a time) or
    params itself (checkpoints written whole, before)."""
    staged = Path(path).absolute() / "params" / "state"
    return staged if staged.is_dir() else Path(path).absolute() / "params"


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "params").is_dir()


def load_config(path) -> LlamaConfig:
    p = Path(path)
    if not is_checkpoint(p):
        raise UserError(f"{p} is not a jaxprobe checkpoint (no config.json + params/); "
                        f"create one with `jaxprobe convert SRC --out {p}`")
    try:
        return LlamaConfig.from_dict(load_json_object(p / "config.json"))
    except ValueError as e:
        raise UserError(f"{p / 'config.json'}: {e} (convert the model again)") from None


def load_source(path) -> dict:
    f = Path(path) / "source.json"
    return load_json_object(f) if f.is_file() else {}


def load_params(path, cfg: LlamaConfig, mesh, rules, dtype) -> dict:
    """Restore the parameter dict, each leaf placed with its sharding from the rules table."""
    import orbax.checkpoint as ocp

    shapes = param_shapes(cfg)
    abstract = {p: jax.ShapeDtypeStruct(s, dtype, sharding=rules.sharding(PARAM_AXES[p], s, mesh))
                for p, s in shapes.items()}
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(params_tree(path), _nest(abstract))
