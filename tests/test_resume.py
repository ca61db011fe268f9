"""Nothing lost, nothing mixed: every command that writes is crashed at points drawn from a seeded
generator among all the files it writes (each atomic write, the merge of shards, each Orbax
checkpoint), always including the second write (between the first two files) and the merge, then
rerun as a user would: its outputs are then byte for byte those of an uninterrupted run.

The crash is an exception raised inside the write, in this process (fast: the compiled programs
are reused), with a stray temp file left where a killed process would leave one; tests beside
each command kill real processes with SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxprobe import cli, data, files
from jaxprobe.testing import write_tiny_dataset

KILLS_PER_COMMAND = 10
VOLATILE = {"created"}  # a store's creation time: kept from the first run on resume
NOT_RESULTS = {files.LOCK}


class Crash(BaseException):
    """What a kill looks like from inside: nothing after it runs (BaseException: no `except
    Exception` catches it)."""


class WriteCounter:
    """Counts the writes of a run through jaxprobe.files and Orbax; crashes at write number
    `crash_at`, leaving a half-written temp file behind as a killed process would."""

    def __init__(self, monkeypatch, crash_at: int | None = None):
        self.count, self.crash_at, self.merge_writes = 0, crash_at, []
        real_write = files._atomic_write

        def atomic_write(path, fill):
            self._tick(Path(path), merge=getattr(fill, "__qualname__", "").startswith("ShardedArrayWriter.merge"))
            return real_write(path, fill)

        monkeypatch.setattr(files, "_atomic_write", atomic_write)
        from jaxprobe import sweep_checkpoint

        real_save = sweep_checkpoint.SweepCheckpoint.save

        def save(checkpoint, step, state, meta=None):
            self._tick(Path(checkpoint.directory) / f"{step}")
            return real_save(checkpoint, step, state, meta)

        monkeypatch.setattr(sweep_checkpoint.SweepCheckpoint, "save", save)

    def _tick(self, path: Path, merge: bool = False):
        self.count += 1
        if merge:
            self.merge_writes.append(self.count)
        if self.count == self.crash_at:
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.killed.tmp").write_bytes(b"half")
            raise Crash


def outputs(out: Path) -> dict[str, object]:
    """Every result file: .npy and other bytes as they are, JSON without volatile keys; plots left
    out (a PNG holds nothing the arrays and JSON do not)."""
    found = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.name in NOT_RESULTS or path.suffix == ".png":
            continue
        rel = str(path.relative_to(out))
        if path.suffix == ".json":
            value = json.loads(path.read_text())
            found[rel] = {k: v for k, v in value.items() if k not in VOLATILE} if isinstance(value, dict) else value
        else:
            found[rel] = path.read_bytes()
    return found


def normalised(found: dict, out: Path, reference_out: Path) -> dict:
    """The folder's own path appears in some JSON (summary.json names its inputs): compare with
    the reference run's path in its place."""
    text = json.dumps({k: v for k, v in found.items() if k.endswith(".json")}, sort_keys=True)
    text = text.replace(str(out), str(reference_out))
    return {**{k: v for k, v in found.items() if not k.endswith(".json")}, **json.loads(text)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("resume")
    data_dir = root / "data"
    data_dir.mkdir()
    write_tiny_dataset(data_dir / "imdb_train.parquet", 80, seed=1)
    write_tiny_dataset(data_dir / "imdb_test.parquet", 60, seed=2)
    dataset = str(data_dir / "imdb_train.parquet")
    model = str(tiny_ckpt)
    common = ["--model", model, "--no-progress"]
    stores = {}
    for split, n in (("train", 24), ("test", 20)):
        stores[split] = root / f"store-{split}"
        assert cli.main(["extract", *common, "--dataset", dataset, "--n", str(n), "--seed", str(n),
                         "--out", str(stores[split])]) == 0
    evaluate = ["evaluate", *common, "--dataset", dataset, "--label-words", "a,positive"]
    assert cli.main([*evaluate, "--pool-size", "30", "--test-size", "20", "--icl-candidates", "20",
                     "--out", str(root / "zero")]) == 0
    assert cli.main([*evaluate, "--icl", "2", "--subsets", str(root / "zero"), "--out", str(root / "icl")]) == 0
    commands = {
        "extract": ["extract", *common, "--dataset", dataset, "--n", "20", "--shard-size", "8"],
        "probe": ["probe", "--train", f"raw={stores['train']}", "--test", f"raw={stores['test']}",
                  "--seeds", "2", "--no-progress"],
        "evaluate": [*evaluate, "--pool-size", "30", "--test-size", "20", "--icl-candidates", "20",
                     "--shard-size", "10"],
        "acquire": ["acquire", "--target", str(root / "zero"), "--surrogate", str(root / "icl"), "--runs", "128",
                    "--size", "10", "--chunk-runs", "64", "--threads", "1", "--checkpoint-every", "0",
                    "--no-progress"],
        "probe-experiment": ["probe-experiment", *common, "--dataset", "imdb", "--n-train", "16", "--n-test", "12",
                             "--templates", "raw", "--recipe", "logreg", "--seeds", "2"],
        "active-experiment": ["active-experiment", *common, "--dataset", dataset, "--label-words", "a,positive",
                              "--pool-size", "30", "--test-size", "20", "--icl-candidates", "20", "--icl", "2",
                              "--acquisitions", "cross-entropy", "--no-ase", "--runs", "64", "--size", "10"],
    }
    return {"root": root, "data_dir": data_dir, "commands": commands}


@pytest.mark.parametrize("command", ["extract", "probe", "evaluate", "acquire", "probe-experiment",
                                     "active-experiment"])
def test_crashed_anywhere_then_rerun_gives_the_same_bytes(setup, command, monkeypatch, capsys):
    monkeypatch.setattr(data, "DATA_DIR", setup["data_dir"])
    argv = setup["commands"][command]
    reference = setup["root"] / f"{command}-reference"
    with monkeypatch.context() as m:
        counter = WriteCounter(m)
        assert cli.main([*argv, "--out", str(reference)]) == 0
    expected = outputs(reference)
    n_writes = counter.count
    assert n_writes >= 3, f"{command} wrote only {n_writes} files"
    rng = np.random.default_rng(sorted(setup["commands"]).index(command))
    points = {2, *(counter.merge_writes[:1])}
    others = [k for k in range(1, n_writes + 1) if k not in points]
    points |= set(rng.choice(others, min(len(others), KILLS_PER_COMMAND - len(points)), replace=False).tolist())
    for k in sorted(points):
        out = setup["root"] / f"{command}-killed-at-{k}"
        with monkeypatch.context() as m:
            WriteCounter(m, crash_at=k)
            with pytest.raises(Crash):
                cli.main([*argv, "--out", str(out)])
        assert cli.main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
        got = normalised(outputs(out), out, reference)
        assert sorted(got) == sorted(normalised(expected, reference, reference)), f"killed at write {k}"
        for rel, value in normalised(expected, reference, reference).items():
            assert got[rel] == value, f"{command} killed at write {k} of {n_writes}: {rel} differs"
        assert not list(out.rglob("*.tmp")), f"killed at write {k}: a temp file was left"
    capsys.readouterr()


# ---------------------------------------------------------------- two processes at once


def test_a_second_process_into_a_held_folder_is_refused_then_proceeds(setup, tmp_path, capsys):
    """A folder another live jaxprobe process holds is refused in one line and left alone; once
    that process is gone (killed: its lock stays behind), the command runs and gives what one
    uninterrupted run gives."""
    import subprocess
    import sys

    argv = setup["commands"]["acquire"]
    out = tmp_path / "acquire"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from jaxprobe.files import claim_folder; "
        f"claim_folder({str(out)!r}, 'acquire.json', {{}}, what='x'); print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"being written by another jaxprobe run (pid {holder.pid})" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [files.LOCK]
    finally:
        holder.kill()
        holder.wait()
    assert cli.main([*argv, "--out", str(out)]) == 0
    reference = setup["root"] / "acquire-once"
    assert cli.main([*argv, "--out", str(reference)]) == 0
    assert normalised(outputs(out), out, reference) == normalised(outputs(reference), reference, reference)


def test_two_first_uses_of_a_model_convert_it_once(tmp_path):
    """Two processes loading the same not-yet-converted model at once: one converts (under a lock,
    into a temp folder renamed into place), the other waits and reuses it; both get the model."""
    import os
    import subprocess
    import sys

    from jaxprobe.testing import make_hf_model

    make_hf_model(tmp_path / "hf")
    env = {**os.environ, "JAXPROBE_HOME": str(tmp_path / "home")}
    code = ("import jaxprobe; lm = jaxprobe.load_model(sys.argv[1]); "
            "print('norm', float(abs(lm.activations(['a charming film'])).sum()))")
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; " + code, str(tmp_path / "hf")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1000:] for _, err in results]
    printed = "".join(out for out, _ in results)
    assert printed.count("converting") == 1
    norms = {line for line in printed.splitlines() if line.startswith("norm")}
    assert len(norms) == 1  # both processes read the same weights
    converted = list((tmp_path / "home" / "checkpoints").iterdir())
    assert [p.name for p in converted if not p.name.startswith(".")] and \
        not [p for p in converted if p.name.endswith(".converting")]
