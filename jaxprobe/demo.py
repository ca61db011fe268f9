"""`jaxprobe demo`: the quick end-to-end look at the embedded default model.

Converts SmolLM2-135M-Instruct (once), then for a few sentences prints the model's top next
tokens and the norm of the residual stream at the last token, layer by layer.
"""

from __future__ import annotations

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


def _cmd_demo(args) -> int:
    run_demo(args.model)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="a quick look at the default model (next tokens, layer norms)",
                              description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="model source or checkpoint (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
