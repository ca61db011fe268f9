"""Reading the reference's activation pickles without torch: exact round trips of pickles torch
writes, and refusal (without execution) of anything that names another global."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

from jaxprobe.errors import UserError
from jaxprobe.refpickle import load_reference_pickle, parse_reference_name

torch = pytest.importorskip("torch")


def _write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=5)  # what the reference notebook did
    return path


def test_torch_written_pickle_round_trips_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(24, generator=generator) * 50 for _ in range(7)]
    labels = [1, 1, 0, 1, 0, 1, 0]
    path = _write(tmp_path / "train_activations_with_prompts_demo_20.pkl",
                  {"activations": vectors, "labels": labels})
    activations, got_labels = load_reference_pickle(path)
    assert activations.dtype == np.float32 and activations.shape == (7, 24)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(activations, torch.stack(vectors).numpy())
    np.testing.assert_array_equal(got_labels, labels)


def test_views_half_precision_and_tensor_labels(tmp_path):
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(5, 6, generator=generator)
    vectors = [base[2, :3], base[:3, 3], base[1, ::2], base[4, 1:4]]  # offsets and strides
    path = _write(tmp_path / "test_activations_demo_39.pkl",
                  {"activations": vectors, "labels": [torch.tensor(0), torch.tensor(1), 1, 0]})
    activations, labels = load_reference_pickle(path)
    np.testing.assert_array_equal(activations, torch.stack(vectors).numpy())
    np.testing.assert_array_equal(labels, [0, 1, 1, 0])
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        half = [v.to(dtype) for v in vectors]
        path = _write(tmp_path / "test_activations_demo_1.pkl", {"activations": half, "labels": [0, 1, 1, 0]})
        activations, _ = load_reference_pickle(path)
        np.testing.assert_array_equal(activations, torch.stack(half).float().numpy())


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "it-ran"
    path = _write(tmp_path / "train_activations_demo_10.pkl",
                  {"activations": [torch.zeros(3), _RunsShell(marker)], "labels": [0, 1]})
    with pytest.raises(UserError, match=r"train_activations_demo_10.pkl: refused to unpickle "
                                        r"global (posix|os)\.system") as info:
        load_reference_pickle(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # the same through the inner storage bytes: a forged _load_from_bytes payload
    payload = pickle.dumps(_RunsShell(marker), protocol=2)
    forged = _Forged(torch.storage._load_from_bytes, (payload,))
    path = _write(tmp_path / "test_activations_demo_10.pkl", {"activations": [forged], "labels": [0]})
    with pytest.raises(UserError, match=r"refused to unpickle global (posix|os)\.system \(inside a storage\)"):
        load_reference_pickle(path)
    assert not marker.exists()


class _Forged:
    """Pickles as `function(*args)` for any function picklable by name."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_out_of_bounds_strides_are_refused(tmp_path):
    storage = torch.arange(4, dtype=torch.float32).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    forged = _Forged(torch._utils._rebuild_tensor_v2,
                     (typed, 2, (2,), (3,), False, collections.OrderedDict()))
    path = _write(tmp_path / "train_activations_demo_3.pkl", {"activations": [forged], "labels": [1]})
    with pytest.raises(UserError, match=r"refused to unpickle a tensor reaching element 5"):
        load_reference_pickle(path)


def test_a_zero_stride_tensor_is_refused_before_memory_is_taken(tmp_path):
    """A few hundred bytes could otherwise ask for gigabytes (a billion elements, all one value)."""
    import resource

    storage = torch.arange(4, dtype=torch.float32).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    forged = _Forged(torch._utils._rebuild_tensor_v2,
                     (typed, 0, (10**9,), (0,), False, collections.OrderedDict()))
    path = _write(tmp_path / "train_activations_demo_4.pkl", {"activations": [forged], "labels": [1]})
    assert path.stat().st_size < 2000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match=r"a tensor of 1000000000 elements over a 4-element storage"):
        load_reference_pickle(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100_000  # KiB


def test_broken_files_and_layouts_are_one_line_errors(tmp_path):
    good = _write(tmp_path / "train_activations_demo_5.pkl",
                  {"activations": [torch.ones(4), torch.ones(4)], "labels": [0, 1]})
    truncated = tmp_path / "test_activations_demo_5.pkl"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(UserError, match=r"test_activations_demo_5.pkl: not a readable pickle"):
        load_reference_pickle(truncated)
    with pytest.raises(UserError, match=r"nothing.pkl: no such file"):
        load_reference_pickle(tmp_path / "nothing.pkl")
    ragged = _write(tmp_path / "a.pkl", {"activations": [torch.ones(4), torch.ones(3)], "labels": [0, 1]})
    with pytest.raises(UserError, match=r"a.pkl: row 1: activation has 3 values, row 0 has 4"):
        load_reference_pickle(ragged)
    short = _write(tmp_path / "b.pkl", {"activations": [torch.ones(4)], "labels": [0, 1]})
    with pytest.raises(UserError, match=r"b.pkl: 1 activations but 2 labels"):
        load_reference_pickle(short)
    wrong = _write(tmp_path / "c.pkl", {"acts": [], "labels": []})
    with pytest.raises(UserError, match=r"c.pkl: expected a dict with 'activations' and 'labels'"):
        load_reference_pickle(wrong)


def test_reference_names():
    assert parse_reference_name("x/train_activations_demo_10.pkl") == ("train", False, 10)
    assert parse_reference_name("test_activations_with_prompts_demo_39.pkl") == ("test", True, 39)
    with pytest.raises(UserError, match=r"no layer suffix"):
        parse_reference_name("train_activations_demo.pkl")
    with pytest.raises(UserError, match=r"not a reference activation pickle name"):
        parse_reference_name("activations.npy")
