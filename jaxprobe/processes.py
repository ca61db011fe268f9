"""Several JAX processes (hosts, or one process per GPU): starting the distributed runtime, moving
host arrays into and out of programs whose devices span processes, and the rule that one process
decides and writes.

Every process runs the same command on the same inputs, so each computes the same batch plan and
the same host batches; programs then see one global array per input. Process 0 alone reads and
writes output folders: its decisions (resume from which shard, refuse which folder) reach the
others through `decided`, so they run the same programs in the same order, and a refusal ends
every process with the same one-line error.

Nothing here imports JAX at module level: the command line uses `is_writer` before JAX starts.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, TypeVar

from jaxprobe.errors import UserError

T = TypeVar("T")


def start(coordinator: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
    """`jax.distributed.initialize` from the arguments, else JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, else a cluster JAX detects (SLURM, Open MPI, Kubernetes).
    On CPU the collectives go through gloo, so two local processes work (and are tested)."""
    import jax

    def env_int(name: str) -> int | None:
        value = os.environ.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise UserError(f"{name}={value!r} is not an integer") from None

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else env_int("JAX_PROCESS_ID")
    if (num_processes is None) != (process_id is None):
        raise UserError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, on a cluster JAX "
                        "detects: SLURM, Open MPI, Kubernetes)")
    if process_id is not None and not 0 <= process_id < num_processes:
        raise UserError(f"JAX_PROCESS_ID={process_id} is outside 0..{num_processes - 1}")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not start the distributed runtime: {first} (give "
                        "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run "
                        "under SLURM / Open MPI / Kubernetes)") from None


def count() -> int:
    """Number of JAX processes (1 when JAX is not started or not distributed)."""
    if "jax" not in sys.modules:
        return 1
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """True in the one process that reads and writes output folders (process 0)."""
    if count() == 1:
        return True
    import jax

    return jax.process_index() == 0


def decided(decide: Callable[[], T], *, what: str = "deciding") -> T:
    """`decide()` run by process 0 alone, its JSON-able result (or its UserError) given to every
    process: what the file system says, as process 0 sees it, is what every process acts on.
    The others wait for as long as it takes (a model's conversion can take an hour); should
    process 0 fail otherwise, they stop with one line naming `what` it was doing."""
    if count() == 1:
        return decide()
    key = _next_key()
    outcome: dict[str, Any] = {}
    if is_writer():
        try:
            outcome = {"value": decide()}
        except UserError as e:
            outcome = {"error": str(e)}
        except BaseException as e:
            _publish(key, {"failed": f"{type(e).__name__} in process 0 while {what}"})
            raise
        _publish(key, outcome)
    else:
        outcome = _receive(key, what)
    if "failed" in outcome:
        raise UserError(outcome["failed"] + " (see its output)")
    if "error" in outcome:
        raise UserError(outcome["error"])
    return outcome["value"]


_sequence = [0]  # every process makes the same calls in the same order: the n-th key is shared
_WAIT_MS = 60_000  # one wait on the key-value store; waiting goes on until process 0 answers


def _next_key() -> str:
    _sequence[0] += 1
    return f"jaxprobe/decided/{_sequence[0]}"


def _client():
    """The distributed runtime's client (its key-value store carries the decisions: no device
    collective, so no gloo or NCCL timeout while process 0 works); None when JAX found its
    processes without `jax.distributed.initialize` (then a device collective carries them)."""
    from jax._src import distributed  # the client Orbax's multihost helpers use too

    return distributed.global_state.client


def _publish(key: str, outcome: dict) -> None:
    client = _client()
    if client is not None:
        client.key_value_set(key, json.dumps(outcome))
    else:
        _broadcast(outcome)


def _receive(key: str, what: str) -> dict:
    client = _client()
    if client is None:
        return _broadcast({})
    while True:
        try:
            return json.loads(client.blocking_key_value_get(key, _WAIT_MS))
        except Exception as e:  # the client raises its own runtime error type
            if "DEADLINE_EXCEEDED" in str(e):
                continue  # process 0 is still at it
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"process 0 stopped while {what}: {first}") from None


def _broadcast(value: Any) -> Any:
    """Process 0's JSON-able `value`, on every process, through a device collective."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_writer() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data[:size]
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())


def to_global(array, sharding):
    """A host array every process holds alike, as the global array `sharding` places (numpy as it
    is in one process: jit moves it)."""
    if count() == 1:
        return array
    import jax

    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(value):
    """A program's output as one numpy array on every process, whichever devices hold it."""
    import numpy as np

    if value.is_fully_addressable or value.is_fully_replicated:
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def check_mesh_spans_every_process(devices) -> None:
    """A mesh must hold a device of every process: a process with none would wait in a collective
    that never comes (a hang of the runtime's timeout, then a crash)."""
    if count() == 1:
        return
    import jax

    present = {d.process_index for d in devices}
    missing = sorted(set(range(jax.process_count())) - present)
    if missing:
        raise UserError(f"the mesh's {len(devices)} device(s) leave out process {missing[0]} of "
                        f"{jax.process_count()}; a mesh must span every process (use all "
                        f"{jax.device_count()} devices, e.g. --mesh {jax.device_count()},1)")
