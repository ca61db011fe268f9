"""The import rules of docs/architecture.md, read from the source with `ast`: the data walks
forward (text -> tokens -> forward -> store / logits -> probes / acquisition -> report), so no
part reaches back to one that comes before it in a way the rules forbid."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxprobe"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))

# module (dotted, under jaxprobe) -> what it must never import (dotted prefixes, under jaxprobe)
MODEL_SIDE = ("model", "runner", "batching", "convert", "hf_mapping", "gguf_files", "source_paths",
              "checkpoint", "sharding", "extract", "evaluate", "experiments", "cli")
FORBIDDEN = {
    "active": MODEL_SIDE,                    # arrays in, arrays out
    "probes": MODEL_SIDE + ("active",),      # trainers on arrays
    "report": MODEL_SIDE + ("probes", "active.sweep", "active.sampler"),  # results dicts in, files out
    "store": MODEL_SIDE + ("probes", "active"),
    "model": ("runner", "convert", "hf_mapping", "gguf_files", "source_paths", "checkpoint", "store", "extract", "evaluate", "probes", "active", "cli"),
    "files": tuple(m for m in ("model", "runner", "store", "probes", "active", "cli", "data", "prompts")),
    "errors": ("",),                         # imports nothing of ours
    "sources": ("",),
}


def _name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import of the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "jaxprobe":
            # `from jaxprobe import x`: x must be a submodule, not a name of the package's own
            found += [(f"jaxprobe.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno))
    return found


def _ours(module: str) -> str | None:
    return module[len("jaxprobe."):] if module.startswith("jaxprobe.") else None


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_forbidden_imports(path):
    name = _name(path)
    rules = [banned for owner, banned in FORBIDDEN.items() if name == owner or name.startswith(owner + ".")]
    for module, line in _imports(path):
        ours = _ours(module)
        if ours is None:
            continue
        for banned in (b for rule in rules for b in rule):
            assert not (banned == "" or ours == banned or ours.startswith(banned + ".")), \
                f"jaxprobe/{path.relative_to(PACKAGE)}:{line} imports jaxprobe.{ours}"


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_nothing_inside_imports_the_package_itself(path):
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    for module, line in _imports(path):
        assert module != "jaxprobe", f"{path.name}:{line}: `import jaxprobe` inside the package"
        ours = _ours(module)
        if ours is not None and "." not in ours:
            assert ours in submodules, f"{path.name}:{line}: `from jaxprobe import {ours}` is not a submodule"


def test_argparse_only_in_cli():
    users = [p.relative_to(PACKAGE) for p in MODULES
             if any(m == "argparse" for m, _ in _imports(p)) and p.name != "cli.py"]
    assert users == []


def test_the_rules_can_fail(tmp_path):
    """The checker itself: a forbidden import in a file is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from jaxprobe.runner import load_model\n    from jaxprobe import model\n")
    assert {m for m, _ in _imports(bad)} >= {"jaxprobe.runner", "jaxprobe.model"}


def test_the_command_line_starts_without_jax():
    """`jaxprobe --help` and argument errors answer at once: the parsers import no JAX or model."""
    import subprocess
    import sys

    code = "import sys, jaxprobe.cli; print(sorted(m for m in ('jax', 'flax', 'torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
