"""Sharding as a table: logical parameter/activation axes -> mesh axes of a ('data', 'model') mesh.

Switching between data parallelism and tensor parallelism is a change of mesh shape, not of model
code. A dimension that the mesh axis does not divide evenly (e.g. 3 KV heads on 8 devices) stays
replicated rather than failing: correctness first, the table says what is preferred.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprobe import processes

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
    devices = jax.devices()[: shape[0] * shape[1]]
    processes.check_mesh_spans_every_process(devices)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _mesh_sizes(mesh_shape: tuple[int, int]):
    """Something with a mesh's `.shape` mapping, for planning without devices."""
    import types

    return types.SimpleNamespace(shape=dict(zip(MESH_AXES, mesh_shape)))


def weight_bytes_per_device(cfg, mesh_shape: tuple[int, int], dtype_bytes: int,
                            rules: ShardingRules = DEFAULT_RULES) -> int:
    """Bytes of model weights each device holds on a (data, model) mesh: what the rules shard over
    'model' is divided, the rest replicated (every 'data' replica holds a whole copy)."""
    from jaxprobe.model import PARAM_AXES, param_shapes

    mesh = _mesh_sizes(mesh_shape)
    total = 0
    for path, shape in param_shapes(cfg).items():
        spec = rules.spec(PARAM_AXES[path], shape, mesh)
        split = 1
        for axis in spec:
            if axis is not None:
                split *= mesh.shape[axis]
        total += math.prod(shape) // split * dtype_bytes
    return total


def replicated_on_model_axis(cfg, mesh_shape: tuple[int, int], rules: ShardingRules = DEFAULT_RULES) -> list[str]:
    """The parameters a mesh's model axis cannot split (a size it does not divide), which every
    device then holds whole: `["blocks.attn.wqkv (kv_heads 8)", ...]`."""
    from jaxprobe.model import PARAM_AXES, param_shapes

    if mesh_shape[1] == 1:
        return []
    mesh = _mesh_sizes(mesh_shape)
    table = dict(rules.rules)
    notes = []
    for path, shape in param_shapes(cfg).items():
        spec = rules.spec(PARAM_AXES[path], shape, mesh)
        for name, size, axis in zip(PARAM_AXES[path], shape, spec):
            if table.get(name) == "model" and axis is None:
                notes.append(f"{'.'.join(path)} ({name} {size})")
    return notes


def accelerator_mesh_shape(cfg, n_devices: int, device_bytes: int, dtype_bytes: int,
                           rules: ShardingRules = DEFAULT_RULES) -> tuple[int, int]:
    """The default (data, model) mesh on GPUs/TPUs: the smallest model axis (a divisor of the device
    count) whose share of the weights fits in half a device's memory (the rest is for activations),
    every remaining device on data. A model that fits nowhere gets every device on model."""
    for model in (m for m in range(1, n_devices + 1) if n_devices % m == 0):
        if weight_bytes_per_device(cfg, (n_devices // model, model), dtype_bytes, rules) <= device_bytes // 2:
            return n_devices // model, model
    return 1, n_devices
