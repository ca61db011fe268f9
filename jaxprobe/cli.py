"""`jaxprobe` command line: one sub-command per job.

Each feature module registers its own sub-commands through `add_commands(subparsers)` and sets
`func` on its parser; this file only wires them together and turns `UserError` into one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jaxprobe.errors import UserError

# Modules that contribute sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "jaxprobe.convert",     # convert, info
    "jaxprobe.demo",        # demo
    "jaxprobe.probing",     # extract, probe, probe-experiment
    "jaxprobe.active.cli",  # evaluate, acquire, active-experiment
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxprobe",
        description="Read the inside of LLaMA-family models with JAX: per-layer activations, "
                    "probes on them, and active testing of a model's loss.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `jaxprobe COMMAND --help` for each command's options.\n"
               "Multi-host: set JAXPROBE_DISTRIBUTED=1 (with JAX's coordinator environment "
               "variables) to call jax.distributed.initialize() before anything else.")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host runs; reads "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or the "
                             "cluster's own variables)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # feature not built yet
                continue
            raise
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.distributed or os.environ.get("JAXPROBE_DISTRIBUTED") == "1":
        import jax

        jax.distributed.initialize()
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"jaxprobe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxprobe {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
