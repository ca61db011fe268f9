"""Old name of `jaxprobe.runner` (with `batching` and `cpu`), kept for one release."""

from jaxprobe.moved import forward

__getattr__ = forward(__name__, "jaxprobe.batching", "jaxprobe.cpu", "jaxprobe.runner")  # defining modules first
