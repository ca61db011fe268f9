#!/usr/bin/env python
"""The GPU path, checked and timed in one run (for a lent GPU; see docs/scale.md and docs/performance.md).

1. parity: tiny random models of several families, loaded in float32 on the GPU (fp32 matmuls, not
   TF32), against HF transformers in float32 on the CPU: the largest difference of any layer's
   last-token state and of the logits; in bfloat16, the relative error against that float32 run
   with the blocked attention and with cuDNN's.
2. speed: a synthetic Llama model (random bf16 weights, converted by jaxprobe) over the same
   random-token texts: HF transformers (PyTorch bf16, SDPA attention, output_hidden_states=True,
   batches in input order padded to the longest) against jaxprobe's `activations` with each
   attention kernel. Cold = the first call (compiles included); warm = the median of the next ones.
3. the planner's per-shape cost: the first call of a new batch shape minus a warm call.
4. memory: the device's bytes in use after loading against sharding.weight_bytes_per_device.

Run: python scripts/bench_gpu.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPEED_MODELS = {  # HF LlamaConfig fields; vocab kept small so conversion stays quick
    "llama-1b-shape": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=8192, vocab_size=32000),
    "llama2-7b-shape-8-layers": dict(hidden_size=4096, num_hidden_layers=8, num_attention_heads=32,
                                     num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
}
PARITY_VARIANTS = ["gqa-tied", "mistral-window-8", "gemma2-softcap", "gemma3-interleaved", "phi-partial-rotary",
                   "qwen3-gqa-qk-norm"]


START = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - START:6.1f} s]", *a, flush=True)


def random_texts(n: int, rng, lo: int, hi: int) -> list[str]:
    words = ["movie", "film", "great", "dull", "plot", "acting", "the", "a", "was", "and", "not", "story",
             "charming", "terrible", "money", "back", "scene", "actor", "loved", "hated"]
    return [" ".join(rng.choice(words, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def parity(root: Path) -> list[dict]:
    import torch

    import jaxprobe
    from jaxprobe.convert import convert
    from jaxprobe.testing import HF_VARIANTS, make_hf_model

    texts = random_texts(6, np.random.default_rng(0), 5, 60)
    rows = []
    for name in PARITY_VARIANTS:
        folder = root / name
        model = make_hf_model(folder / "hf", **HF_VARIANTS[name])
        convert(folder / "hf", folder / "ckpt", progress=False)
        lm32 = jaxprobe.load_model(folder / "ckpt", dtype="float32")
        res = lm32.run(texts, activations=True, all_logits=True, batch_size=8)
        worst_state = worst_logit = 0.0
        for i, ids in enumerate(lm32.tokenize(texts)):
            with torch.no_grad():
                out = model(torch.tensor([ids]), output_hidden_states=True)
            hs = np.stack([h[0, -1].numpy() for h in out.hidden_states[:-1]])
            worst_state = max(worst_state, float(np.abs(res["activations"][i, :-1] - hs).max()))
            worst_logit = max(worst_logit, float(np.abs(res["logits"][i] - out.logits[0, -1].numpy()).max()))
        row = dict(variant=name, fp32_max_state_diff=worst_state, fp32_max_logit_diff=worst_logit)
        lm16 = jaxprobe.load_model(folder / "ckpt", dtype="bfloat16")
        ref = res["activations"]
        for kernel in (None, "cudnn"):
            lm16.fused_attention = kernel
            try:
                got = lm16.run(texts, activations=True, batch_size=8)["activations"]
                row[f"bf16_rel_err_{kernel or 'blocked'}"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            except Exception as e:  # noqa: BLE001 - a kernel that does not run is a result too
                row[f"bf16_rel_err_{kernel or 'blocked'}"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        log(json.dumps(row))
        rows.append(row)
    return rows


def hf_last_token_states(model, batches, device):
    import torch

    out = []
    for ids in batches:
        length = max(len(x) for x in ids)
        tokens = torch.zeros((len(ids), length), dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        with torch.no_grad():
            hs = model.model(tokens.to(device), attention_mask=mask.to(device), output_hidden_states=True).hidden_states
        last = mask.sum(1).to(device) - 1
        rows = torch.arange(len(ids), device=device)
        out.append(torch.stack([h[rows, last] for h in hs], 1).float().cpu().numpy())
    return np.concatenate(out)


def speed(root: Path, name: str, fields: dict, n_texts: int, batch_size: int, reps: int) -> dict:
    import jax
    import torch
    import transformers

    import jaxprobe
    from jaxprobe.convert import convert
    from jaxprobe.sharding import weight_bytes_per_device
    from jaxprobe.testing import tiny_tokenizer

    folder = root / name.split()[0]
    config = transformers.LlamaConfig(max_position_embeddings=4096, **fields)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(folder / "hf")
    tiny_tokenizer(2000).save_pretrained(folder / "hf")
    save_s = time.perf_counter() - t
    log(f"{name}: HF model made and saved in {save_s:.1f} s")
    t = time.perf_counter()
    convert(folder / "hf", folder / "ckpt", progress=False)
    convert_s = time.perf_counter() - t
    log(f"{name}: converted in {convert_s:.1f} s")
    jax.clear_caches()
    stats0 = jax.devices()[0].memory_stats() or {}
    lm = jaxprobe.load_model(folder / "ckpt", dtype="bfloat16")
    stats1 = jax.devices()[0].memory_stats() or {}
    predicted = weight_bytes_per_device(lm.config, (1, 1), 2)
    row = dict(model=name, params_b=lm.config.n_params / 1e9, hf_save_s=save_s, convert_s=convert_s,
               weights_bytes_predicted=predicted,
               weights_bytes_in_use=stats1.get("bytes_in_use", 0) - stats0.get("bytes_in_use", 0))

    rng = np.random.default_rng(1)
    texts = random_texts(n_texts, rng, 150, 600)
    ids = lm.tokenize(texts)
    n_tokens = sum(len(x) for x in ids)
    row.update(n_texts=n_texts, n_tokens=n_tokens, batch_size=batch_size)

    batches = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    hf_times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize(); t = time.perf_counter()
        hf = hf_last_token_states(model, batches, "cuda")
        torch.cuda.synchronize(); hf_times.append(time.perf_counter() - t)
    row["hf_cold_s"], row["hf_warm_s"] = hf_times[0], statistics.median(hf_times[1:])
    log(f"{name}: HF {hf_times}")
    del model
    torch.cuda.empty_cache()

    for kernel in ("cudnn", None):
        key = kernel or "blocked"
        lm.fused_attention = kernel
        times = []
        try:
            for _ in range(reps + 1):
                t = time.perf_counter()
                acts = lm.activations(texts, batch_size=batch_size, progress=False)
                times.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001
            row[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"{name} {key}: {row[f'{key}_error']}")
            continue
        row[f"{key}_cold_s"], row[f"{key}_warm_s"] = times[0], statistics.median(times[1:])
        log(f"{name}: jaxprobe {key} {times}")
        row[f"{key}_vs_hf_warm"] = row["hf_warm_s"] / row[f"{key}_warm_s"]
        row[f"{key}_rel_diff_vs_hf"] = float(np.linalg.norm(acts - hf) / np.linalg.norm(hf))

    # the planner's per-shape cost: a batch of a length no earlier call had, cold then warm
    lm.fused_attention = "cudnn" if "cudnn_warm_s" in row else None
    odd = random_texts(batch_size, rng, 700, 701)
    t = time.perf_counter(); lm.activations(odd, batch_size=batch_size, progress=False); cold = time.perf_counter() - t
    t = time.perf_counter(); lm.activations(odd, batch_size=batch_size, progress=False); warm = time.perf_counter() - t
    row.update(new_shape_cold_s=cold, new_shape_warm_s=warm)
    from jaxprobe.batching import forward_flops
    row["tflops_warm_best"] = forward_flops(lm.config, 1, 1) * n_tokens / min(
        row.get(f"{k}_warm_s", 1e9) for k in ("cudnn", "blocked")) / 1e12
    log(json.dumps(row))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the first speed model, fewer texts")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="override the speed models' layer count")
    ap.add_argument("--texts", type=int, default=None, help="texts per speed run (default 256; 64 with --quick)")
    args = ap.parse_args(argv)

    import jax
    import torch
    log(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__}, cuda {torch.cuda.is_available()}")
    results = {"devices": [str(d) for d in jax.devices()]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results["parity"] = [] if args.skip_parity else parity(root)
        models = list(SPEED_MODELS.items())[:1 if args.quick else None]
        if args.layers:
            models = [(f"{name} ({args.layers} layers)", {**fields, "num_hidden_layers": args.layers})
                      for name, fields in models]
        n_texts = args.texts or (64 if args.quick else 256)
        results["speed"] = [speed(root, name, fields, n_texts, 32, args.reps) for name, fields in models]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    log("\nparity (fp32 on GPU vs HF fp32 on CPU; bf16 rel. error vs that fp32 run):")
    for r in results["parity"]:
        log("  " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    log("\nspeed (seconds; ratio = HF warm time / jaxprobe warm time):")
    for r in results["speed"]:
        log("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
