"""Names that moved in the 0.2 layout, kept working for one release: a module's `__getattr__`
forwards an old name to its new module with a one-line DeprecationWarning."""

import importlib
import warnings


def forward(old_module: str, *new_modules: str):
    """A module `__getattr__` for `old_module` that finds each name in the first of `new_modules`
    defining it."""

    def __getattr__(name):
        for new in new_modules:
            module = importlib.import_module(new)
            if name in vars(module):
                warnings.warn(f"{old_module}.{name} moved to {new}.{name}; the old name goes in the next release",
                              DeprecationWarning, stacklevel=2)
                return vars(module)[name]
        raise AttributeError(f"module {old_module!r} has no attribute {name!r}")

    return __getattr__
