"""Where a model comes from: the names of the models shipped in PyPI wheels (the default,
SmolLM2-135M-Instruct, and Gemma 3 270M). Kept free of JAX so that configs and the command line
can name them cheaply."""

DEFAULT_MODEL = "smollm2-135m"
GEMMA3_MODEL = "gemma3-270m"

# Each embedded model's name, and the other names it answers to.
EMBEDDED_MODELS = {DEFAULT_MODEL: ("smollm2", "default"), GEMMA3_MODEL: ("gemma3",)}


def embedded_model(src) -> str | None:
    """The embedded model `src` names (any case, or one of its other names), else None."""
    name = str(src).lower()
    return next((model for model, others in EMBEDDED_MODELS.items() if name == model or name in others), None)
