"""Every CPU-specific setting: how many CPU devices jaxprobe asks JAX for (one per core), how many
copies of the weights the default mesh may hold, which matmul library a forward program uses and
the XLA options it compiles with (docs/model.md explains each choice). No JAX import here, so
`import jaxprobe` stays cheap."""

from __future__ import annotations

import os
import platform
import sys
import warnings

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


def cpu_data_devices(n_devices: int, param_bytes: int, host_bytes: int) -> int:
    """How many CPU devices the default mesh puts on 'data': all, or as many copies of the weights
    as fit in half the host's memory (at least one)."""
    return max(1, min(n_devices, int(0.5 * host_bytes) // max(param_bytes, 1)))


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not limit


# XLA's CPU backend hands f32 matmuls to YNNPACK by default. On the reference CPU (2 cores,
# AVX-512, x86-64) its oneDNN matmuls run SmolLM2's forward pass fastest, 2-5% over Eigen's
# (median of 10-30 alternations per shape), which beat YNNPACK's by 10-13%.
# XLA takes one library per program. JAXPROBE_CPU_MATMUL (onednn, eigen, ynnpack) fixes the choice.
CPU_MATMUL_OPTIONS = {
    "ynnpack": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


# XLA cannot write oneDNN programs to its on-disk compilation cache, so every process compiles
# them anew (2.5 s more than loading an Eigen program from disk, for SmolLM2's forward). A program
# shape gets oneDNN only when its planned work is long enough for the ~3% to repay that:
# 2e13 FLOPs, about 100 s at 200 GFLOP/s.
ONEDNN_MIN_FLOPS = 2e13
warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry.*onednn")


def cpu_matmul_library(planned_flops: float = 0.0) -> str:
    """The CPU matmul library for a program that will run `planned_flops` in this process:
    JAXPROBE_CPU_MATMUL if set; else oneDNN on x86-64 (the only place jaxlib ships it) when the
    work repays its uncached compile, Eigen otherwise."""
    choice = os.environ.get("JAXPROBE_CPU_MATMUL", "").strip().lower()
    if choice:
        if choice not in CPU_MATMUL_OPTIONS:
            raise UserError(f"JAXPROBE_CPU_MATMUL={choice!r}: expected one of {', '.join(CPU_MATMUL_OPTIONS)}")
        return choice
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "onednn" if x86 and planned_flops >= ONEDNN_MIN_FLOPS else "eigen"


# XLA's CPU backend rewrites every reduction over more than 32 elements into a reduce-window pass
# and a reduce (pairwise summation, for accuracy), and fuses neither with its neighbours. In
# attention that is softmax's row max and row sum: turning the rewrite off halves attention's time
# and makes SmolLM2's forward 7-11% faster (median of 10 alternations, Eigen and oneDNN alike), and
# moves its activations by at most 5e-6. All its reductions are fp32 rows of at most a few
# thousand elements, where one pass loses nothing that matters (the parity tests hold it to HF).
CPU_FORWARD_OPTIONS = {"xla_disable_hlo_passes": "tree_reduction_rewriter"}


def compiler_options(mesh, library: str | None = None, rows_split: bool = True) -> dict | None:
    """XLA options for forward programs on this mesh: on CPU, the matmul library (default: the
    choice for a short program), `CPU_FORWARD_OPTIONS`, and single-threaded Eigen matmuls when the
    program splits its rows over at least one device per core; nothing elsewhere."""
    if all(d.platform == "cpu" for d in mesh.devices.flat):
        options = {**CPU_MATMUL_OPTIONS[library or cpu_matmul_library()], **CPU_FORWARD_OPTIONS}
        if rows_split and mesh.devices.size > 1 and mesh.devices.size >= usable_cores():
            options["xla_cpu_multi_thread_eigen"] = False
        return options
    return None


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk under $JAXPROBE_HOME/xla: recompiling the same shapes in
    every process costs seconds (a probe sweep, a model's forward). Programs that compile in
    under a second are not worth the disk."""
    import jax

    from jaxprobe.files import jaxprobe_home

    try:
        jax.config.update("jax_compilation_cache_dir", str(jaxprobe_home() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception:  # noqa: BLE001 - an optional speed-up, never a reason to fail
        pass
