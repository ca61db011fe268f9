#!/usr/bin/env python
"""Print docs/scale.md's table: weight memory per device of Llama-2 7B/13B/70B at each mesh and
dtype, from `jaxprobe.sharding.weight_bytes_per_device` (the function load_model plans with).

    .venv/bin/python scripts/scale_table.py
"""

from jaxprobe.model import LlamaConfig
from jaxprobe.sharding import replicated_on_model_axis, weight_bytes_per_device

MODELS = {  # the published Llama-2 configs
    "Llama-2-7B": LlamaConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                              head_dim=128, d_ff=11008),
    "Llama-2-13B": LlamaConfig(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                               head_dim=128, d_ff=13824),
    "Llama-2-70B": LlamaConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               head_dim=128, d_ff=28672),
}
MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (8, 1)]


def main() -> None:
    print("| model | parameters | " + " | ".join(f"mesh {d},{m}" for d, m in MESHES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in MESHES) + " |")
    for name, cfg in MODELS.items():
        for dtype, size in (("bf16", 2), ("fp32", 4)):
            cells = []
            for mesh in MESHES:
                gib = weight_bytes_per_device(cfg, mesh, size) / 2**30
                cells.append(f"{gib:.1f} GiB" + (" *" if replicated_on_model_axis(cfg, mesh) else ""))
            print(f"| {name} {dtype} | {cfg.n_params / 1e9:.2f} B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
