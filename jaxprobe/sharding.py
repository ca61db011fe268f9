"""Sharding as a table: logical parameter/activation axes -> mesh axes of a ('data', 'model') mesh.

Switching between data parallelism and tensor parallelism is a change of mesh shape, not of model
code. A dimension that the mesh axis does not divide evenly (e.g. 3 KV heads on 8 devices) stays
replicated rather than failing: correctness first, the table says what is preferred.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "model")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """logical axis name -> mesh axis name (or None = replicated)."""

    rules: tuple[tuple[str, str | None], ...] = (
        ("batch", "data"),
        ("vocab", "model"),
        ("heads", "model"),
        ("kv_heads", "model"),
        ("ffn", "model"),
        ("embed", None),
        ("layer", None),
        ("head_dim", None),
        ("qkv", None),
        ("gate_up", None),
        ("seq", None),
    )

    def __post_init__(self):
        names = [k for k, _ in self.rules]
        if len(names) != len(set(names)):
            raise ValueError(f"a logical axis appears twice in the sharding rules: {names}")

    def spec(self, axes: tuple[str, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
        table = dict(self.rules)
        out, used = [], set()
        for name, size in zip(axes, shape):
            mesh_axis = table.get(name)
            if mesh_axis is not None and mesh_axis in used:
                raise ValueError(f"axes {axes} map two dimensions to mesh axis {mesh_axis!r}")
            if mesh_axis is None or size % mesh.shape[mesh_axis]:
                out.append(None)
            else:
                out.append(mesh_axis)
                used.add(mesh_axis)
        return P(*out)

    def sharding(self, axes, shape, mesh) -> NamedSharding:
        return NamedSharding(mesh, self.spec(tuple(axes), tuple(shape), mesh))


DEFAULT_RULES = ShardingRules()


def make_mesh(shape: tuple[int, int] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'model') mesh over the first data x model local devices; default: all devices on
    'data'.

    Axis types are given explicitly (Auto): jit's in/out shardings place the arrays and XLA
    propagates the rest, which needs no per-op annotations in the model.
    """
    n = jax.device_count()
    shape = shape or (n, 1)
    if shape[0] < 1 or shape[1] < 1 or shape[0] * shape[1] > n:
        raise ValueError(f"mesh shape {shape} needs {shape[0] * shape[1]} devices; {n} are visible")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=jax.devices()[: shape[0] * shape[1]])
