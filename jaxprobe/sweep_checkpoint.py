"""A thin wrapper over Orbax's CheckpointManager for resumable sweeps (probe training, LURE runs).

Each save is step-indexed and atomic (Orbax writes to a temp folder and renames), keeps the last
`max_to_keep` steps, and stores a JSON side-car (`meta`) next to the array state: what a resumed
run must agree with (configuration, seeds, chunk layout). Kept thin so a switch to orbax v1 is
local to this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np


def _as_orbax_leaf(x: Any) -> Any:
    # Orbax rejects numpy scalar leaves; 0-d arrays are fine.
    return np.asarray(x) if isinstance(x, np.generic) else x


class SweepCheckpoint:
    """Step-indexed checkpoints of a pytree of arrays plus a JSON dict of metadata."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._opened = None

    @property
    def _manager(self):
        # Opened on first use: a sweep that ends before its first save (most short ones) never
        # imports Orbax or creates the folder.
        if self._opened is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                                   enable_async_checkpointing=False)
            self._opened = ocp.CheckpointManager(self.directory, options=options)
        return self._opened

    def latest_step(self) -> int | None:
        if not self.directory.is_dir():
            return None
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps()) if self.directory.is_dir() else []

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        import orbax.checkpoint as ocp

        state = jax.tree.map(_as_orbax_leaf, state)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})))
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restore `step` into the structure, shapes, dtypes (and shardings) of `like`."""
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda x: ocp.utils.to_shape_dtype_struct(_as_orbax_leaf(x)), like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def restore_meta(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        if self._opened is not None:
            self._opened.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
