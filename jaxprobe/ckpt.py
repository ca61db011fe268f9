"""Old name of `jaxprobe.sweep_checkpoint`, kept for one release."""

from jaxprobe.moved import forward

__getattr__ = forward(__name__, "jaxprobe.sweep_checkpoint")
