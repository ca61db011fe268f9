"""Names that moved in the new layout still work for one release, each with one warning naming
the new place."""

import pytest


@pytest.mark.parametrize("old, name, new", [
    ("jaxprobe.runtime", "plan_batches", "jaxprobe.batching"),
    ("jaxprobe.runtime", "compiler_options", "jaxprobe.cpu"),
    ("jaxprobe.runtime", "load_model", "jaxprobe.runner"),
    ("jaxprobe.active.acquire", "run_sweep", "jaxprobe.active.sweep"),
    ("jaxprobe.active.evaluate", "load_evaluation", "jaxprobe.active.inputs"),
    ("jaxprobe.ckpt", "SweepCheckpoint", "jaxprobe.sweep_checkpoint"),
])
def test_old_names_forward_with_a_warning(old, name, new):
    import importlib

    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no_such_name"):
        getattr(importlib.import_module(old), "no_such_name")
