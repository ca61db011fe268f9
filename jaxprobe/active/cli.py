"""The active-testing commands: `evaluate` (a model's label-token logits), `acquire` (LURE sweeps
over acquisition functions) and `active-experiment` (the paper's SST-2 experiment in one command)."""

from __future__ import annotations

import importlib


def add_commands(subparsers) -> None:
    from jaxprobe.active.evaluate import add_evaluate_command

    add_evaluate_command(subparsers)
    for module, register in (("jaxprobe.active.acquire", "add_acquire_command"),
                             ("jaxprobe.active.experiment", "add_experiment_command")):
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # not written yet
                continue
            raise
        getattr(loaded, register)(subparsers)
