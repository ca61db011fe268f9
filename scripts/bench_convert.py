#!/usr/bin/env python
"""Conversion's time and host memory on a generated HF model (random bf16 weights, two safetensors
shards), against the model's size and its largest stacked parameter (the bound conversion aims at).

The conversion runs in a fresh process that first converts a tiny model (so that imports, the JAX
runtime and Orbax's thread pools are in place: a fixed allowance), then reports: the conversion's
time, the peak of numpy's allocations (tracemalloc, which sees every numpy array), and the peak of
resident memory (anonymous + file-backed, the memory-mapped safetensors pages included, sampled
every 10 ms) above what the process held before it.

Run: .venv/bin/python scripts/bench_convert.py [--d-model 1024 --layers 24 --d-ff 4096 --vocab 32000]
(the defaults: about 0.44 B parameters, the figure in docs/scale.md)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading, time, tracemalloc
from jaxprobe.convert import convert
convert(sys.argv[3], sys.argv[4], progress=False)  # a tiny model first: imports, runtime, Orbax's pools
def rss():
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(("RssAnon", "RssFile")))
base, peak, done = rss(), [0], threading.Event()
def sample():  # resident memory every 10 ms (ru_maxrss would include the start-up)
    while not done.wait(0.01):
        peak[0] = max(peak[0], rss())
sampler = threading.Thread(target=sample)
sampler.start()
tracemalloc.start()
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], progress=False)
seconds = time.perf_counter() - t
done.set()
sampler.join()
print(json.dumps({"seconds": seconds, "numpy_peak": tracemalloc.get_traced_memory()[1], "rss_base": base,
                  "rss_peak": max(peak[0], rss())}))
"""


def make_model(folder: Path, d_model: int, layers: int, d_ff: int, vocab: int, heads: int) -> dict:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=d_model, num_hidden_layers=layers, intermediate_size=d_ff,
                                      vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=heads,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{n_params * 2 // 2 // 2**20 + 1}MB")  # two shards
    from jaxprobe.testing import tiny_tokenizer

    tiny_tokenizer(320).save_pretrained(folder)
    return {"params": n_params}


def measure(src: Path, out: Path) -> dict:
    from jaxprobe.testing import make_hf_model

    tiny = Path(tempfile.mkdtemp())
    make_hf_model(tiny / "hf")
    child = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(tiny / "hf"), str(tiny / "ckpt")],
                           capture_output=True, text=True)
    shutil.rmtree(tiny)
    if child.returncode:
        raise RuntimeError(child.stderr[-2000:])
    return json.loads(child.stdout.strip().splitlines()[-1])


def largest_stack_bytes(out: Path) -> tuple[int, int]:
    """(largest parameter, all parameters) of a converted checkpoint, in bytes as stored."""
    import numpy as np

    from jaxprobe.checkpoint import load_config, load_source
    from jaxprobe.model import param_shapes

    itemsize = 2 if load_source(out)["dtype"] == "bfloat16" else 4
    sizes = [math.prod(s) * itemsize for s in param_shapes(load_config(out)).values()]
    return max(sizes), int(np.sum(sizes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "hf", Path(tmp) / "ckpt"
        made = make_model(src, args.d_model, args.layers, args.d_ff, args.vocab, args.heads)
        got = measure(src, out)
        largest, total = largest_stack_bytes(out)
    gb = 1e9
    print(f"model: {made['params'] / 1e9:.2f} B parameters, bf16 output {total / gb:.2f} GB, largest stacked "
          f"parameter {largest / gb:.3f} GB")
    print(f"conversion: {got['seconds']:.1f} s; numpy peak {got['numpy_peak'] / gb:.3f} GB "
          f"({got['numpy_peak'] / largest:.2f}x the largest parameter); resident memory peak "
          f"{got['rss_peak'] / gb:.2f} GB, {(got['rss_peak'] - got['rss_base']) / gb:.2f} GB above the "
          f"{got['rss_base'] / gb:.2f} GB the process held before "
          f"({(got['rss_peak'] - got['rss_base']) / largest:.2f}x the largest parameter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
