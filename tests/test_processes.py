"""Two local JAX processes (gloo collectives on 127.0.0.1), as a multi-host run: the same command
in both gives the arrays of one process on the same mesh, process 0 alone writes, a refusal ends
both with the same line, and a mesh that leaves a process out is one line, not a hang."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaxprobe.testing import tiny_job

# Process 1 runs under an audit hook that reports every write-like event under the output root:
# it must report none (process 0 decides and writes).
WATCHED_RUN = textwrap.dedent("""
    import os, sys
    root = os.environ["WATCH_ROOT"]
    events = {"open", "os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "os.rmdir",
              "shutil.rmtree", "os.truncate"}
    wrote = []
    def hook(event, args):
        if event not in events or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(args[0])
        if not os.path.abspath(path).startswith(root):
            return
        if event == "open" and not (isinstance(args[1], str) and any(c in args[1] for c in "wax+")) and \\
                not (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            return
        wrote.append(f"{event} {path}")
    sys.addaudithook(hook)
    from jaxprobe.cli import main
    code = main(sys.argv[1:])
    for line in wrote:
        print("WROTE", line, file=sys.stderr)
    sys.exit(code)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXPROBE_CPU_DEVICES")}
    env.update(JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    return env


def run_two(argv: list[str], watch: Path, devices_per_process: int = 1, timeout: int = 150):
    """Both processes' (exit code, stderr); process 1's stderr lists what it wrote under `watch`."""
    port = _free_port()
    procs = []
    for pid in (0, 1):
        env = {**_env(devices_per_process), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid), "WATCH_ROOT": str(watch)}
        code = ["-c", WATCHED_RUN] if pid == 1 else ["-m", "jaxprobe.cli"]
        procs.append(subprocess.Popen([sys.executable, *code, "--distributed", *map(str, argv)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, err))
    return results


def run_one(argv: list[str], devices: int) -> None:
    done = subprocess.run([sys.executable, "-m", "jaxprobe.cli", *map(str, argv)], env=_env(devices),
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    return tiny_job(tmp_path_factory.mktemp("processes"), tiny_ckpt, 60, seed=5)


def _extract(setup, out, *extra):
    return ["extract", "--model", setup["model"], "--dataset", setup["data"], "--n", "20", "--shard-size", "8",
            "--batch-size", "4", "--no-progress", "--out", out, *extra]


def _wrote(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("WROTE")]


@pytest.mark.parametrize("mesh, per_process", [("2,1", 1), ("1,2", 1), (None, 2)])
def test_extract_in_two_processes_equals_one_process(setup, mesh, per_process):
    root = setup["root"]
    name = f"{mesh or 'default'}-{per_process}".replace(",", "x")
    mesh_flag = ["--mesh", mesh] if mesh else []
    run_one(_extract(setup, root / f"one-{name}", *mesh_flag), devices=2 * per_process)
    (code0, err0), (code1, err1) = run_two(_extract(setup, root / f"two-{name}", *mesh_flag), watch=root,
                                           devices_per_process=per_process)
    assert code0 == 0 and code1 == 0, (err0[-1500:], err1[-1500:])
    assert not _wrote(err1), _wrote(err1)
    for f in ("activations.npy", "labels.npy", "sample_indices.npy", "prompts.jsonl"):
        assert (root / f"two-{name}" / f).read_bytes() == (root / f"one-{name}" / f).read_bytes(), f
    one = json.loads((root / f"one-{name}" / "manifest.json").read_text())
    two = json.loads((root / f"two-{name}" / "manifest.json").read_text())
    assert one["settings"] == two["settings"]


def test_a_half_written_store_resumes_in_two_processes(setup):
    root = setup["root"]
    whole = root / "resume-whole"
    run_one(_extract(setup, whole), devices=2)
    half = root / "resume-half"
    shutil.copytree(whole, half)
    acts = np.load(half / "activations.npy")
    (half / "activations.npy").unlink()
    (half / "shards").mkdir()
    np.save(half / "shards" / "part-00000.npy", acts[:8])  # one of three shards finished
    manifest = json.loads((half / "manifest.json").read_text())
    (half / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (code0, err0), (code1, err1) = run_two(_extract(setup, half), watch=root)
    assert code0 == 0 and code1 == 0, (err0[-1500:], err1[-1500:])
    assert not _wrote(err1)
    assert (half / "activations.npy").read_bytes() == (whole / "activations.npy").read_bytes()


def test_a_model_converted_on_first_use_is_converted_by_process_0_alone(setup, monkeypatch):
    """An HF folder as --model: process 0 converts it into $JAXPROBE_HOME while process 1 waits,
    then both load it (process 0 converts in a one-process child: Orbax would wait for 1)."""
    from jaxprobe.testing import make_hf_model

    root = setup["root"]
    make_hf_model(root / "hf-model", num_attention_heads=4, num_key_value_heads=2)
    home = root / "home"
    monkeypatch.setenv("JAXPROBE_HOME", str(home))
    argv = _extract(setup, root / "from-hf")
    argv[argv.index("--model") + 1] = str(root / "hf-model")
    (code0, err0), (code1, err1) = run_two(argv, watch=home / "checkpoints")
    assert code0 == 0 and code1 == 0, (err0[-1500:], err1[-1500:])
    assert not _wrote(err1), _wrote(err1)
    converted = [p for p in (home / "checkpoints").iterdir() if p.name.startswith("hf-model-")]
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    assert (root / "from-hf" / "activations.npy").is_file()


def test_a_refused_first_use_conversion_ends_both_processes_with_one_line(setup, monkeypatch):
    """A truncated safetensors file as --model: process 0's refusal reaches process 1, which
    waited for the conversion (before, process 1 died in a gloo timeout with a traceback)."""
    from jaxprobe.testing import make_hf_model

    root = setup["root"]
    model = root / "truncated-hf"
    make_hf_model(model, num_attention_heads=4, num_key_value_heads=2)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setenv("JAXPROBE_HOME", str(root / "home-truncated"))
    argv = _extract(setup, root / "from-truncated")
    argv[argv.index("--model") + 1] = str(model)
    for code, err in run_two(argv, watch=root / "home-truncated"):
        assert code == 2 and "Traceback" not in err, err[-1500:]
        assert "model.safetensors: not a readable safetensors file" in err.splitlines()[-1]


# Process 0 decides slowly (past several of the key-value store's waits), then fails with a bug.
SLOW_THEN_BROKEN = textwrap.dedent("""
    import sys, time
    from jaxprobe import processes
    from jaxprobe.errors import UserError
    processes.start()
    processes._WAIT_MS = 500
    print("decided", processes.decided(lambda: time.sleep(2) or 42, what="sleeping"), flush=True)
    try:
        processes.decided(lambda: 1 / 0, what="dividing")
    except UserError as e:
        print("refused:", e, flush=True)
""")


def test_the_others_wait_for_a_slow_decision_and_hear_of_a_failure():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_THEN_BROKEN], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**_env(1), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                                           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)})
             for pid in (0, 1)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 1 and "ZeroDivisionError" in err0, err0[-1500:]
    assert procs[1].returncode == 0, err1[-1500:]
    assert out1.splitlines() == ["decided 42", "refused: ZeroDivisionError in process 0 while dividing "
                                 "(see its output)"]


def test_evaluate_in_two_processes_equals_one_process(setup):
    root = setup["root"]
    argv = ["evaluate", "--model", setup["model"], "--dataset", setup["data"], "--label-words", "a,positive",
            "--pool-size", "16", "--test-size", "8", "--icl-candidates", "8", "--icl", "2", "--no-progress"]
    run_one([*argv, "--out", root / "eval-one"], devices=2)
    (code0, err0), (code1, err1) = run_two([*argv, "--out", root / "eval-two"], watch=root)
    assert code0 == 0 and code1 == 0, (err0[-1500:], err1[-1500:])
    assert not _wrote(err1)
    for f in ("pool/logits.npy", "test/logits.npy", "pool/indices.npy"):
        assert (root / "eval-two" / f).read_bytes() == (root / "eval-one" / f).read_bytes(), f


def test_a_refusal_ends_both_processes_with_one_line(setup):
    root = setup["root"]
    other = root / "other-settings"
    run_one(_extract(setup, other), devices=2)
    results = run_two(_extract(setup, other, "--positions", "mean"), watch=root)
    for code, err in results:
        assert code == 2 and "Traceback" not in err, err[-1500:]
        assert "holds an activation store made with other settings (positions" in err.splitlines()[-1]


def test_a_mesh_that_leaves_out_a_process_is_one_line(setup):
    results = run_two(_extract(setup, setup["root"] / "small-mesh", "--mesh", "1,1"), watch=setup["root"])
    for code, err in results:
        assert code == 2 and "Traceback" not in err, err[-1500:]
        assert "leave out process 1 of 2; a mesh must span every process" in err.splitlines()[-1]
    assert not (setup["root"] / "small-mesh").exists()


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"}, "JAX_PROCESS_ID=5 is outside 0..1"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({}, "could not start the distributed runtime"),
])
def test_a_runtime_that_cannot_start_is_one_line(setup, env, message):
    base = {k: v for k, v in _env(1).items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                    "JAX_PROCESS_ID", "SLURM_", "OMPI_"))}
    done = subprocess.run([sys.executable, "-m", "jaxprobe.cli", "--distributed", "info", setup["model"]],
                          env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert message in done.stderr.strip().splitlines()[-1]
