#!/usr/bin/env python
"""Run every benchmark once and write docs/performance.md from what they print.

Each benchmark script runs in its own process (its compilations, threads and devices do not leak
into the next one); its output is shown as it comes and kept. The file gets a header naming the
machine, the versions and the date, then per benchmark what it measures, the exact command line
and the summary it printed. A benchmark that fails is written down as failed and the rest still
run. The machine should be otherwise quiet: the scripts alternate their two sides and report
medians, but a shared CPU still drifts.

    .venv/bin/python scripts/bench_all.py                        # all seven, into docs/performance.md
    .venv/bin/python scripts/bench_all.py --only probe,acquire --out /tmp/performance.md
    .venv/bin/python scripts/bench_all.py --dry-run              # print the commands, run nothing
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    script: str
    args: tuple[str, ...]  # the settings docs/performance.md's figures were measured with
    about: str             # what it measures and what its figures mean (markdown)


BENCHMARKS = (
    Benchmark("forward", "Forward pass: jaxprobe against HF transformers", "bench_forward.py",
              ("--n", "96", "--reps", "5", "--batch-sizes", "8,32"),
              "SmolLM2-135M, last-token activations of all 31 hook points for IMDB test reviews cut to "
              "their last 200 words; HF is PyTorch `LlamaModel` with `output_hidden_states=True`, fp32, "
              "on the same cores. *Same work*: identical pre-padded batches on both sides, paired batch "
              "by batch, jaxprobe with the matmul library a long job gets (oneDNN). *Realistic*: each "
              "side batches its own way (HF: data order, pad to longest; jaxprobe: `lm.activations` "
              "as it is), whole runs paired; the ratio is the median of the per-pair ratios. tok/s "
              "count real tokens. GFLOP/s count useful matmul FLOPs (same work: the padded work both "
              "sides do; realistic: real tokens only), against a 2048^2 fp32 matmul peak sampled in "
              "the same run: *sustained* (the best library's median rate) and *best* (the fastest "
              "single matmul). jaxprobe is timed once its batch shapes are compiled."),
    Benchmark("forward-gemma3", "Forward pass on Gemma 3 270M: jaxprobe against HF transformers", "bench_forward.py",
              ("--model", "gemma3-270m", "--n", "48", "--reps", "3", "--batch-sizes", "8,32"),
              "The same two comparisons on the second embedded model, Gemma 3 270M (Q4_K_M GGUF, "
              "dequantised to fp32; 18 blocks, d_model 640, 4 query heads and 1 KV head of 256 dims): "
              "all 19 hook points; HF is PyTorch `Gemma3TextModel` from the same GGUF (`gguf_file=`). "
              "Its 168M embedding parameters are a table lookup, so the matmul work per token is close "
              "to SmolLM2's."),
    Benchmark("probe", "Probe sweep: one jitted program against the reference's PyTorch loop",
              "bench_probe.py", (),
              "The `vector-mlp` recipe on every hook point x template x seed (31 x 2 x 10 = 620 "
              "probes, d = 576, 100 train / 300 test rows of random activations). jaxprobe trains "
              "them all in one jitted program; the reference trains one probe at a time in PyTorch "
              "(timed on a few and scaled, at its best thread count). GFLOP/s against a 2048^2 fp32 "
              "matmul peak measured in the same run."),
    Benchmark("probe-process", "A small probe job as whole processes: `jaxprobe probe` against a PyTorch script",
              "bench_probe.py", ("--whole-process", "--repeats", "3"),
              "One reference-style pickle pair (100 train / 300 test rows x 5,120 features, as the "
              "reference's LLaMA-2-13B pickles), `--recipe vector-mlp --seeds 30`, timed as whole "
              "processes: imports, reading the pickles, compilation, training, results and plot. "
              "The other side is `scripts/torch_probe_pickle.py`, the reference's loop in a plain "
              "PyTorch script on the same files. jaxprobe is timed once with an empty compilation "
              "cache and then warm (the cache persists under `$JAXPROBE_HOME/xla`)."),
    Benchmark("acquire", "LURE sweeps: the vectorised sampler against a NumPy loop of the reference",
              "bench_acquire.py", (),
              "Cross-entropy acquisition + LURE, 3,000 runs x 400 labels, clip 0.1, on synthetic "
              "logits at pool sizes N = 872, 2,000, 10,000. Ours: wall time of the whole sweep after "
              "compilation (best of 2). Reference: a straightforward NumPy loop, one run at a time, "
              "timed on a few runs and scaled to 3,000. The reference notebook itself took 30 min "
              "53 s at N = 10,000."),
    Benchmark("prefix", "Prefix cache: untruncated 5-shot extraction with and without it",
              "bench_extract_prefix.py", (),
              "`vector-5shot-untruncated` prompts for 24 IMDB test reviews (about 633 tokens each, "
              "466 of them shared) on SmolLM2, all hook points, with and without the shared-prefix "
              "key/value cache, in one process; each path runs once to compile and is then timed. "
              "The largest difference is given relative to the largest activation."),
    Benchmark("evaluate", "Label-token evaluation: `evaluate`'s 50-shot pass against the reference's way",
              "bench_evaluate.py", (),
              "16 SST-2 pool prompts with 50 in-context examples (about 1,200 tokens each) on "
              "SmolLM2. The reference runs one whole prompt per forward pass with full-vocabulary "
              "logits; `evaluate` runs the shared prefix once, batches the queries and computes only "
              "the K label logits. Same prompts, one process, each path compiled first."),
)

INTRO = """\
# Performance

What each benchmark measures, the command that measured it, and the current figures. Compare
ratios more than absolute speeds: the development machine is a shared CPU whose speed drifts by
about +-20% over minutes, so every benchmark alternates its two sides and reports medians or bests.
History lives in git (`git log -p docs/performance.md`); this file holds the current figures only.
Regenerate it with `scripts/bench_all.py` (`--dry-run` prints the commands).
"""


def command(bench: Benchmark) -> list[str]:
    return [sys.executable, str(Path("scripts") / bench.script), *bench.args]


def shown(cmd: list[str]) -> str:
    """The command as a reader would type it in the repository root."""
    exe = Path(cmd[0])
    if exe.is_relative_to(ROOT):
        exe = exe.relative_to(ROOT)
    return shlex.join([str(exe), *cmd[1:]])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        out = ""
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    return names[0] if names else (platform.processor() or platform.machine())


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "torch", "numpy"))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"- Machine: {cpu_model()}, {cores} cores usable ({platform.system()} {platform.machine()}); "
            f"load average {os.getloadavg()[0]:.1f} at the start\n"
            f"- Versions: {versions}, Python {platform.python_version()}\n"
            f"- Date: {date}\n")


def run(cmd: list[str]) -> tuple[int, str]:
    """Run one benchmark, echoing its stdout as it comes; its stderr (progress bars) passes through."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines).strip("\n")


def section(bench: Benchmark, cmd: list[str], status: int, output: str) -> str:
    result = "" if status == 0 else f"**Failed** (exit status {status}); what it printed:\n\n"
    return (f"## {bench.title}\n\n{textwrap.fill(bench.about, 100)}\n\n`{shown(cmd)}`\n\n{result}"
            f"```text\n{output}\n```\n")


GPU_HEADER = "\n## On a lent GPU"


def kept_gpu_sections(path: Path) -> str:
    """The GPU figures (scripts/bench_gpu.py, run when a session is lent one) cannot be measured
    again on the CPU machine that regenerates this file: they are carried over as they are."""
    text = path.read_text() if path.exists() else ""
    return text[text.index(GPU_HEADER):] if GPU_HEADER in text else ""


def main() -> int:
    names = [b.name for b in BENCHMARKS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(names), help="comma-separated subset of: %(default)s")
    p.add_argument("--out", default=str(ROOT / "docs" / "performance.md"), help="(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    args = p.parse_args()
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"--only {','.join(unknown)}: choose from {','.join(names)}")
    benches = [b for b in BENCHMARKS if b.name in chosen]

    if args.dry_run:
        for bench in benches:
            print(shown(command(bench)))
        return 0
    header = machine()
    sections, failed = [], []
    for bench in benches:
        cmd = command(bench)
        print(f"\n=== {bench.name}: {shown(cmd)}", flush=True)
        status, output = run(cmd)
        if status != 0:
            failed.append(bench.name)
        sections.append(section(bench, cmd, status, output))
    Path(args.out).write_text(INTRO + "\n" + header + "\n" + "\n".join(sections) + kept_gpu_sections(Path(args.out)))
    print(f"\nwrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
