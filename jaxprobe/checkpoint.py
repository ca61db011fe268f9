"""The jaxprobe checkpoint folder: `config.json`, `source.json`, tokenizer files, and `params/`,
an Orbax checkpoint of the model's NNX parameter state as a pure dict. Parameters restore straight
into their sharded layout (abstract targets carry `NamedSharding`s)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.files import save_json
from jaxprobe.model import PARAM_AXES, LlamaConfig, param_shapes

# The parameter layout a checkpoint's `params/` holds, recorded in its source.json. 1: separate
# wq/wk/wv and w_gate/w_up (before 2026-11-24); 2: fused `wqkv` and `w_gate_up` (model.py).
PARAM_LAYOUT = 2


class StaleCheckpoint(UserError):
    """A checkpoint written with an older parameter layout: convert its source again."""


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
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", _nest(params))
        ckptr.wait_until_finished()
    save_json(out / "source.json", {**source, "param_layout": PARAM_LAYOUT})
    save_json(out / "config.json", cfg.to_dict())  # written last: its presence marks a whole checkpoint


def is_checkpoint(path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "params").is_dir()


def load_config(path) -> LlamaConfig:
    p = Path(path)
    if not is_checkpoint(p):
        raise UserError(f"{p} is not a jaxprobe checkpoint (no config.json + params/); "
                        f"create one with `jaxprobe convert SRC --out {p}`")
    return LlamaConfig.from_dict(json.loads((p / "config.json").read_text()))


def load_source(path) -> dict:
    f = Path(path) / "source.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def param_layout(path) -> int:
    """The parameter layout a checkpoint holds (1 if it predates the record)."""
    return int(load_source(path).get("param_layout", 1))


def load_params(path, cfg: LlamaConfig, mesh, rules, dtype) -> dict:
    """Restore the parameter dict, each leaf placed with its sharding from the rules table."""
    import orbax.checkpoint as ocp

    layout = param_layout(path)
    if layout != PARAM_LAYOUT:
        src = load_source(path).get("path", "SRC")
        raise StaleCheckpoint(f"{path} holds parameter layout {layout}, written by an older jaxprobe; this one "
                              f"reads layout {PARAM_LAYOUT}: convert again (jaxprobe convert {src} --out NEW_DIR)")
    shapes = param_shapes(cfg)
    abstract = {p: jax.ShapeDtypeStruct(s, dtype, sharding=rules.sharding(PARAM_AXES[p], s, mesh))
                for p, s in shapes.items()}
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(Path(path).absolute() / "params", _nest(abstract))
