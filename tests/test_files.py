"""A full disk and a read-only folder, without a tmpfs: the free-space check is given a tiny quota,
and OS errors are injected where root would ignore file modes. Each is one line naming the folder,
earlier results stay intact, no temp file is left, and the rerun finishes as if nothing happened."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from jaxprobe import files
from jaxprobe.cli import main
from jaxprobe.testing import tiny_job


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_ckpt):
    return tiny_job(tmp_path_factory.mktemp("files"), tiny_ckpt, 40, seed=4)


def _extract(job, out):
    return ["extract", "--model", job["model"], "--dataset", job["data"], "--n", "16", "--shard-size", "8",
            "--no-progress", "--out", str(out)]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def _temp_files(folder) -> list:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_disk_too_full_to_merge_keeps_the_shards_and_the_rerun_finishes(job, capsys, monkeypatch):
    reference = job["root"] / "reference"
    assert main(_extract(job, reference)) == 0
    out = job["root"] / "quota"
    with monkeypatch.context() as m:
        m.setattr(files, "free_bytes", lambda folder: 1024)  # a 1 KiB quota
        assert main(_extract(job, out)) == 2
    line = _error_line(capsys)
    assert f"cannot merge into {out / 'activations.npy'}: it needs" in line and "the shards are intact" in line
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00000.npy", "part-00001.npy"]
    assert not (out / "activations.npy").exists() and not _temp_files(out)
    assert main(_extract(job, out)) == 0  # space freed: the rerun merges what was computed
    assert (out / "activations.npy").read_bytes() == (reference / "activations.npy").read_bytes()


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "the disk is full"),
                                          (errno.EROFS, "the file system is read-only"),
                                          (errno.EACCES, "permission denied")])
def test_a_write_that_fails_is_one_line_and_leaves_no_temp_file(job, capsys, monkeypatch, code, reason):
    out = job["root"] / f"failing-{code}"
    real_replace = os.replace
    calls = []

    def replace(src, dst):  # the third file written fails as it would land
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code), str(dst))
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", replace)
        assert main(_extract(job, out)) == 2
    assert _error_line(capsys).endswith(f"cannot write in {out}: {reason} (files written before are intact)")
    assert not _temp_files(out)
    files.load_json_object(out / "manifest.json")  # whole, as written before the failure
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix == ".npy"}
    assert kept  # the files written before the failing one
    assert main(_extract(job, out)) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in kept} == kept  # intact, not rewritten
    assert (out / "activations.npy").read_bytes() == (job["root"] / "reference" / "activations.npy").read_bytes()


def test_a_read_only_output_folder_is_refused_before_anything_is_written(job, capsys, monkeypatch):
    out = job["root"] / "read-only"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(files.os, "open", read_only)
        assert main(_extract(job, out)) == 2
    assert _error_line(capsys) == (f"jaxprobe extract: error: cannot write in {out}: the file system is "
                                   "read-only (files written before are intact)")
    assert list(out.iterdir()) == []


def test_a_full_disk_under_orbax_is_one_line(job, capsys, monkeypatch):
    """Writes jaxprobe does not make itself (Orbax's sweep checkpoints) meet the CLI's net."""
    from jaxprobe.sweep_checkpoint import SweepCheckpoint

    evaluate = ["evaluate", "--model", job["model"], "--dataset", job["data"], "--label-words", "a,positive",
                "--pool-size", "20", "--test-size", "0", "--icl-candidates", "4", "--no-progress"]
    assert main([*evaluate, "--out", str(job["root"] / "evaluation")]) == 0
    out = job["root"] / "acquire-full"

    def full(self, step, state, meta=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory / str(step)))

    monkeypatch.setattr(SweepCheckpoint, "save", full)
    acquire = ["acquire", "--target", str(job["root"] / "evaluation"), "--acquisition", "iid", "--estimator",
               "mean", "--true-risk", "pool", "--runs", "128", "--size", "5", "--chunk-runs", "64", "--checkpoint-every", "0",
               "--no-progress", "--out", str(out)]
    assert main(acquire) == 2
    line = _error_line(capsys)
    assert line.startswith("jaxprobe acquire: error: cannot write ") and "No space left on device" in line
    assert (out / "acquire.json").is_file() and not (out / "summary.json").exists()
    monkeypatch.undo()
    assert main(acquire) == 0 and np.load(out / "estimates.npy").shape == (5, 128)
