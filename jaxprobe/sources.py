"""Where a model comes from: the name of the embedded default (SmolLM2-135M-Instruct, shipped in a
PyPI wheel). Kept free of JAX so that configs and the command line can name it cheaply."""

DEFAULT_MODEL = "smollm2-135m"
