"""The activation store with an injected fake activation function (no model): layout, resume after
an interruption, refusal to mix settings, and one-line errors for damaged or bad stores."""

import hashlib
import json

import numpy as np
import pytest

import jaxprobe
from jaxprobe import store
from jaxprobe.errors import UserError

N_POINTS, D = 3, 4
PROMPTS = [f"prompt number {i} " * (i % 3 + 1) for i in range(10)]
LABELS = [i % 2 for i in range(10)]
ROWS = list(range(100, 110))
SETTINGS = {"model": "fake", "template": "raw", "positions": "last"}


def fake_activations(texts):
    """Deterministic per-text vectors, so any shard split gives the same numbers."""
    out = []
    for t in texts:
        seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
        out.append(np.random.default_rng(seed).standard_normal((N_POINTS, D), dtype=np.float32))
    return np.stack(out)


class CountingCompute:
    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, texts):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt  # what a Ctrl-C mid-run looks like to the writer
        self.calls += 1
        return fake_activations(texts)


def write(out, compute=fake_activations, settings=SETTINGS, prompts=PROMPTS, **kw):
    return store.write_store(out, prompts=prompts, labels=LABELS, sample_indices=ROWS,
                             settings=settings, n_hook_points=N_POINTS, d_model=D, compute=compute,
                             shard_size=4, progress=False, log=lambda _: None, **kw)


def test_write_and_open(tmp_path):
    out = write(tmp_path / "s", token_counts=[5] * 10, describe={"model": {"name": "fake"}})
    opened = jaxprobe.open_activations(out)
    acts, labels, manifest = opened
    assert isinstance(acts, np.memmap)
    np.testing.assert_array_equal(acts, fake_activations(PROMPTS))
    np.testing.assert_array_equal(labels, LABELS)
    assert labels.dtype == np.int64
    assert opened.prompts() == PROMPTS
    np.testing.assert_array_equal(np.load(out / "sample_indices.npy"), ROWS)
    assert manifest["complete"] and manifest["shape"] == [10, N_POINTS, D]
    assert manifest["settings"]["template"] == "raw" and manifest["model"]["name"] == "fake"
    assert manifest["hook_points"] == [0, 1, 2] and "hook point N+1" in manifest["layer_convention"]
    assert manifest["jaxprobe_version"] == jaxprobe.__version__
    assert not (out / "shards").exists()
    np.testing.assert_array_equal(opened.layers([2, 0]), acts[:, [2, 0]])


def test_interrupted_run_resumes_bit_identical(tmp_path):
    reference = write(tmp_path / "whole")
    first = CountingCompute(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "resumed", compute=first)
    assert sorted(p.name for p in (tmp_path / "resumed" / "shards").iterdir()) == [
        "part-00000.npy", "part-00001.npy"]
    with pytest.raises(UserError, match="unfinished store .2 of 3 shards"):
        jaxprobe.open_activations(tmp_path / "resumed")
    second = CountingCompute()
    write(tmp_path / "resumed", compute=second)
    assert second.calls == 1  # only the missing shard was computed
    assert ((tmp_path / "resumed" / "activations.npy").read_bytes()
            == (reference / "activations.npy").read_bytes())
    third = CountingCompute()
    write(tmp_path / "resumed", compute=third)  # complete: nothing to do
    assert third.calls == 0


def test_different_settings_are_refused_and_nothing_changes(tmp_path):
    out = write(tmp_path / "s")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"other settings \(template: stored 'raw', asked 'x'\)"):
        write(out, settings={**SETTINGS, "template": "x"})
    with pytest.raises(UserError, match="prompts_sha256"):
        write(out, prompts=PROMPTS[::-1])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no manifest.json"):
        write(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_truncated_shard_names_the_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "s", compute=CountingCompute(fail_after=2))
    shard = tmp_path / "s" / "shards" / "part-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"part-00001.npy: truncated or corrupt"):
        write(tmp_path / "s")
    assert (tmp_path / "s" / "shards" / "part-00000.npy").is_file()


def test_truncated_or_missing_store_files(tmp_path):
    out = write(tmp_path / "s")
    data = (out / "activations.npy").read_bytes()
    (out / "activations.npy").write_bytes(data[:-7])
    with pytest.raises(UserError, match=r"activations.npy: truncated or corrupt"):
        jaxprobe.open_activations(out)
    (out / "activations.npy").unlink()
    with pytest.raises(UserError, match=r"activations.npy: file not found"):
        jaxprobe.open_activations(out)
    with pytest.raises(UserError, match=r"nowhere: no such file or folder"):
        jaxprobe.open_activations(tmp_path / "nowhere")
    with pytest.raises(UserError, match="not a jaxprobe activation store"):
        jaxprobe.open_activations(tmp_path)


def test_non_finite_activations(tmp_path):
    def nan_for_item_6(texts):
        acts = fake_activations(texts)
        if PROMPTS[6] in texts:
            acts[texts.index(PROMPTS[6]), 1, 2] = np.nan
        return acts

    with pytest.raises(UserError, match=r"sample item 6 \(source row 106\)"):
        write(tmp_path / "s", compute=nan_for_item_6)
    assert (tmp_path / "s" / "shards" / "part-00000.npy").is_file()  # earlier work kept

    out = write(tmp_path / "t")
    acts = np.load(out / "activations.npy")
    acts[8, 2, 0] = np.inf
    np.save(out / "activations.npy", acts)
    with pytest.raises(UserError, match=r"activations.npy: NaN or inf in the activations of row 8"):
        jaxprobe.open_activations(out).layers([2])
    jaxprobe.open_activations(out).layers([0, 1])  # the other hook points are fine
    with pytest.raises(UserError, match=r"has no hook point 3 \(it has hook points 0..2\)"):
        jaxprobe.open_activations(out).layers([3])


def test_manifest_is_plain_json(tmp_path):
    out = write(tmp_path / "s", settings={**SETTINGS, "layers": (1, 2), "n_seed": np.int64(3)})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["layers"] == [1, 2] and manifest["settings"]["n_seed"] == 3
    write(out, settings={**SETTINGS, "layers": (1, 2), "n_seed": np.int64(3)})  # same after round trip
