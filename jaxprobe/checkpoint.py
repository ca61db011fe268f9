"""The jaxprobe checkpoint folder: `config.json`, `source.json`, tokenizer files, and `params/`,
an Orbax checkpoint of the model's NNX parameter state as a pure dict. Parameters restore straight
into their sharded layout (abstract targets carry `NamedSharding`s)."""

from __future__ import annotations

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


def save_checkpoint(out: Path, cfg: LlamaConfig, params: dict[tuple[str, ...], np.ndarray],
                    source: dict) -> None:
    """Write a checkpoint folder; `params` is consumed (its arrays move to the checkpoint)."""
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    # Orbax copies numpy leaves before writing, but not jax arrays: moving each array in turn
    # (and dropping the numpy one, which the caller hands over) keeps one copy of the model.
    cpu = jax.local_devices(backend="cpu")[0]
    for path in list(params):
        params[path] = jax.device_put(params.pop(path), cpu)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", _nest(params))
        ckptr.wait_until_finished()
    save_json(out / "source.json", source)
    save_json(out / "config.json", cfg.to_dict())  # written last: its presence marks a whole checkpoint


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
        return ckptr.restore(Path(path).absolute() / "params", _nest(abstract))
