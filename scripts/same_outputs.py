"""Run `extract`, `probe`, `evaluate` and `acquire` on a tiny random model and print the sha256 of
every array each writes, so two checkouts can be compared byte for byte (a refactor must not change
them):

    .venv/bin/python scripts/same_outputs.py --json before.json     # on the old checkout
    .venv/bin/python scripts/same_outputs.py --compare before.json  # on the new one: exit 1 if any differ

Each command runs as its own process through the CLI, as a user would run it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VOCAB = "the film was a great charming dull terrible movie plot acting good fun".split()


def _write_dataset(path: Path, n_rows: int, seed: int) -> Path:
    import pandas as pd

    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(VOCAB, rng.integers(2, 9))) + " " for _ in range(n_rows)]
    pd.DataFrame({"text": texts, "label": rng.integers(0, 2, n_rows)}).to_parquet(path)
    return path


def _jaxprobe(*argv: str) -> None:
    cmd = [sys.executable, "-m", "jaxprobe.cli", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stderr[-2000:]}")


def run_commands(root: Path) -> dict[str, str]:
    from jaxprobe.testing import tiny_checkpoint

    model = str(tiny_checkpoint(root / "model"))
    data = str(_write_dataset(root / "data.parquet", 160, seed=1))
    common = ["--model", model, "--dataset", data, "--no-progress"]
    for split, n in (("train", 40), ("test", 30)):
        _jaxprobe("extract", *common, "--split", "train", "--n", str(n), "--seed", str(n),
                  "--template", "Review: {text}\nSentiment:", "--shard-size", "16",
                  "--out", str(root / f"store-{split}"))
    _jaxprobe("probe", "--train", f"raw={root / 'store-train'}", "--test", f"raw={root / 'store-test'}",
              "--seeds", "3", "--no-progress", "--out", str(root / "probes"))
    sizes = ["--label-words", "a,positive", "--pool-size", "60", "--test-size", "30",
             "--icl-candidates", "30"]
    _jaxprobe("evaluate", *common, *sizes, "--out", str(root / "zero"))
    _jaxprobe("evaluate", *common, "--label-words", "a,positive", "--icl", "3",
              "--subsets", str(root / "zero"), "--out", str(root / "icl"))
    _jaxprobe("acquire", "--target", str(root / "zero"), "--surrogate", str(root / "icl"),
              "--runs", "64", "--size", "30", "--no-progress", "--out", str(root / "acquire"))
    hashes = {}
    for path in sorted(root.rglob("*.npy")):
        rel = str(path.relative_to(root))
        if rel.startswith("model") or "checkpoints" in rel.split(os.sep):
            continue
        hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the hashes here")
    parser.add_argument("--compare", help="compare with hashes written earlier; exit 1 if any differ")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hashes = run_commands(Path(tmp))
    for rel, digest in hashes.items():
        print(f"{digest[:16]}  {rel}")
    if args.json:
        Path(args.json).write_text(json.dumps(hashes, indent=1) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = sorted(k for k in before.keys() | hashes.keys() if before.get(k) != hashes.get(k))
        print(f"{len(hashes)} arrays, {len(differ)} differ" + (": " + ", ".join(differ) if differ else ""))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
