"""How many CPU devices jaxprobe asks JAX for: one per core (see "Model and sharding" in the README
and `jaxprobe.runtime.compiler_options`). No JAX import here, so `import jaxprobe` stays cheap."""

from __future__ import annotations

import os
import sys

from jaxprobe.errors import UserError

# Each CPU device holds a copy of the weights (the default mesh also caps them by memory).
CPU_DEVICES_MAX = 8


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_devices_wanted() -> int | None:
    """JAXPROBE_CPU_DEVICES as a device count; None when it is not set."""
    wanted = os.environ.get("JAXPROBE_CPU_DEVICES", "").strip()
    if not wanted:
        return None
    if not wanted.isdigit() or int(wanted) < 1:
        raise UserError(f"JAXPROBE_CPU_DEVICES={wanted!r}: expected a positive number of CPU devices")
    return int(wanted)


def use_one_cpu_device_per_core() -> None:
    """Ask JAX for one CPU device per usable core (at most CPU_DEVICES_MAX) before its backends start:
    through JAX_NUM_CPU_DEVICES while JAX is not imported yet (subprocesses then get the same count),
    else through jax.config. An explicit choice wins: JAXPROBE_CPU_DEVICES, XLA_FLAGS'
    --xla_force_host_platform_device_count, or jax_num_cpu_devices (JAX_NUM_CPU_DEVICES). Once JAX
    has started, its devices stay as they are."""
    try:
        count = cpu_devices_wanted()
    except UserError:
        return  # load_model says so, where the CLI turns it into one line
    jax = sys.modules.get("jax")
    if count is None:
        chosen = os.environ.get("JAX_NUM_CPU_DEVICES") or (jax is not None and jax.config.jax_num_cpu_devices != -1)
        if chosen or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
            return
        count = min(usable_cores(), CPU_DEVICES_MAX)
    if jax is None:
        os.environ["JAX_NUM_CPU_DEVICES"] = str(count)
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX already runs (the caller computed something first): keep its devices
        pass
