"""`jaxprobe demo`: the main job, end to end, on the embedded default model.

1. Converts SmolLM2-135M-Instruct (once) and, for a few sentences, prints the top next tokens and
   the norm of the residual stream at the last token, layer by layer.
2. `jaxprobe probe-experiment`: the probing reference experiment (IMDB, 100 train / 300 test, raw
   and 5-shot templates, every layer, two probe recipes, 10 seeds) -> runs/probe-experiment.
3. `jaxprobe active-experiment`: the active-testing SST-2 experiment (zero-shot and 50-shot
   targets, 50-shot surrogate, CE / entropy / NLL acquisitions vs iid, LURE, ASE; 3000 runs x 400
   labels) -> runs/active-experiment.
Every stage is resumable: rerun the same command after an interruption. About 20-25 minutes on
2 CPU cores; `--quick` runs smaller versions of both experiments in a few minutes.
"""

from __future__ import annotations

import argparse

import numpy as np

SENTENCES = [
    "The capital of France is",
    "I loved this movie: the acting was wonderful and the story moving. Sentiment:",
    "I hated this movie: the acting was wooden and the plot dull. Sentiment:",
]


def run_demo(model: str = "smollm2-135m", top_k: int = 5) -> None:
    import jaxprobe

    lm = jaxprobe.load_model(model)
    print(f"model {lm.name}: {lm.config.n_layers} layers, d_model {lm.config.d_model}, "
          f"{lm.config.n_params:,} parameters, fingerprint {lm.fingerprint}")
    out = lm.run(SENTENCES, activations=True, all_logits=True)
    norms = np.linalg.norm(out["activations"], axis=-1)  # [n, L+1]
    for text, logits, layer_norms in zip(SENTENCES, out["logits"], norms):
        top = np.argsort(-logits)[:top_k]
        probs = np.exp(logits[top] - logits.max()) / np.exp(logits - logits.max()).sum()
        print(f"\n{text!r}")
        print("  next token: " + ", ".join(f"{lm.tokenizer.decode([t])!r} {p:.2f}" for t, p in zip(top, probs)))
        print("  |resid| by hook point (embed, blocks.0 .. blocks.%d):" % (lm.config.n_layers - 1))
        print("  " + " ".join(f"{x:.0f}" for x in layer_norms))


QUICK_PROBING = ["--n-train", "40", "--n-test", "60", "--seeds", "3", "--out", "runs/probe-experiment-quick"]
QUICK_ACTIVE = ["--pool-size", "300", "--test-size", "200", "--icl-candidates", "200", "--icl", "10",
                "--runs", "1000", "--size", "100", "--out", "runs/active-experiment-quick"]


def _cmd_demo(args) -> int:
    from jaxprobe.cli import main

    run_demo(args.model)
    stages = []
    if not args.skip_probing:
        stages.append(["probe-experiment", "--model", args.model] + (QUICK_PROBING if args.quick else []))
    if not args.skip_active:
        stages.append(["active-experiment", "--model", args.model] + (QUICK_ACTIVE if args.quick else []))
    for argv in stages:
        print(f"\n=== jaxprobe {' '.join(argv)}", flush=True)
        status = main(argv)
        if status:
            return status
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job end to end: a look at the model, then the probing and "
                                   "active-testing experiments", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model source or checkpoint (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller experiments (a few minutes in all)")
    p.add_argument("--skip-probing", action="store_true", help="leave out probe-experiment")
    p.add_argument("--skip-active", action="store_true", help="leave out active-experiment")
    p.set_defaults(func=_cmd_demo)
