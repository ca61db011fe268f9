"""jaxprobe: per-layer activations, probes and active testing for LLaMA-family models in JAX."""

__version__ = "0.1.0"

from jaxprobe.cpu import use_one_cpu_device_per_core  # noqa: E402

use_one_cpu_device_per_core()  # before anything starts JAX: one CPU device per core


def __getattr__(name):
    # Lazy so `import jaxprobe` stays cheap and the CLI's --help does not start JAX.
    if name in ("load_model", "LanguageModel"):
        from jaxprobe import runner

        return getattr(runner, name)
    if name == "open_activations":
        from jaxprobe.store import open_activations

        return open_activations
    raise AttributeError(f"module 'jaxprobe' has no attribute {name!r}")
