"""Old home of `load_evaluation` and `check_same_rows` (now `jaxprobe.active.inputs`; the command
itself is `jaxprobe.evaluate`), kept for one release."""

from jaxprobe.moved import forward

__getattr__ = forward(__name__, "jaxprobe.active.inputs")
