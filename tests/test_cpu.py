"""CPU settings (jaxprobe/cpu.py): one device per core, how many weight copies the default mesh
holds, the matmul library and the XLA options each program gets."""

import os
import subprocess
import sys

import pytest

from jaxprobe import cpu
from jaxprobe.errors import UserError
from jaxprobe.sharding import make_mesh


def _device_count_in_new_process(env_extra, code="import jaxprobe.runner, jax; print(jax.device_count())"):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXPROBE_CPU_DEVICES", "JAX_NUM_CPU_DEVICES")}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_one_cpu_device_per_core_unless_chosen_otherwise():
    assert _device_count_in_new_process({}) == str(min(cpu.usable_cores(), cpu.CPU_DEVICES_MAX))
    assert _device_count_in_new_process({"JAXPROBE_CPU_DEVICES": "3"}) == "3"
    assert _device_count_in_new_process({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}) == "5"
    assert _device_count_in_new_process({"JAX_NUM_CPU_DEVICES": "4"}) == "4"
    # `import jaxprobe` first, JAX used before the runner module is imported: still one per core
    early = ("import jaxprobe, jax; jax.numpy.ones(1).block_until_ready(); import jaxprobe.runner; "
             "print(jax.device_count())")
    assert _device_count_in_new_process({}, early) == str(min(cpu.usable_cores(), cpu.CPU_DEVICES_MAX))
    # JAX already running when jaxprobe is imported: its single device stays, nothing fails
    started = "import jax; jax.numpy.ones(1).block_until_ready(); import jaxprobe.runner; print(jax.device_count())"
    assert _device_count_in_new_process({}, started) == "1"
    bad = ("import jaxprobe.runner as rt\ntry:\n    rt.load_model('x')\nexcept rt.UserError as e:\n    print(e)")
    assert _device_count_in_new_process({"JAXPROBE_CPU_DEVICES": "two"}, bad) == \
        "JAXPROBE_CPU_DEVICES='two': expected a positive number of CPU devices"


def test_default_cpu_mesh_holds_as_many_weight_copies_as_fit_in_half_the_memory():
    gib = 1 << 30
    assert cpu.cpu_data_devices(2, gib // 2, 24 * gib) == 2
    assert cpu.cpu_data_devices(8, 5 * gib, 24 * gib) == 2   # 12 GiB hold two copies of 5 GiB
    assert cpu.cpu_data_devices(8, 52 * gib, 24 * gib) == 1  # too large for even one: still one device


def test_cpu_forward_programs_split_over_every_core_run_eigen_single_threaded(monkeypatch):
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)  # the reference CPU, whatever runs the test
    eight, one = make_mesh((8, 1)), make_mesh((1, 1))
    assert cpu.compiler_options(eight, "eigen")["xla_cpu_multi_thread_eigen"] is False
    assert "xla_cpu_multi_thread_eigen" not in cpu.compiler_options(eight, "eigen", rows_split=False)
    assert "xla_cpu_multi_thread_eigen" not in cpu.compiler_options(one, "eigen")
    monkeypatch.setattr(cpu, "usable_cores", lambda: 16)  # fewer devices than cores: Eigen keeps threads
    assert "xla_cpu_multi_thread_eigen" not in cpu.compiler_options(eight, "eigen")


def test_cpu_matmul_library_pays_for_onednn_only_on_long_work(monkeypatch):
    monkeypatch.delenv("JAXPROBE_CPU_MATMUL", raising=False)
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    assert cpu.cpu_matmul_library(0.0) == "eigen"  # short: Eigen, whose compile XLA caches on disk
    assert cpu.cpu_matmul_library(cpu.ONEDNN_MIN_FLOPS) == "onednn"
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert cpu.cpu_matmul_library(1e18) == "eigen"  # jaxlib ships oneDNN on x86-64 only
    monkeypatch.setenv("JAXPROBE_CPU_MATMUL", "YNNPACK")
    assert cpu.cpu_matmul_library(0.0) == "ynnpack"
    monkeypatch.setenv("JAXPROBE_CPU_MATMUL", "mkl")
    with pytest.raises(UserError, match="JAXPROBE_CPU_MATMUL='mkl'"):
        cpu.cpu_matmul_library(0.0)
