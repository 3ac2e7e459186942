"""lossdsl: losses written as math become stable, fused kernels with readable gradients.

    import lossdsl
    f = lossdsl.load("focal")
    v, (gz,) = f.value_and_grad(z, y, gamma=1.0)
"""
from .api import Loss, compile, compile_file, load, names
from .errors import (ArgumentError, CacheWarning, CompileError, DomainError, LossError, LossNameError,
                     LossSyntaxError, LossTypeError)

__all__ = ["Loss", "compile", "compile_file", "load", "names", "printing", "LossError", "CompileError",
           "LossSyntaxError", "LossNameError", "LossTypeError", "ArgumentError", "DomainError",
           "CacheWarning"]
__version__ = "0.1.0"


def __getattr__(name):
    """``lossdsl.printing`` on first use: it imports sympy, which a cached kernel does not need."""
    if name == "printing":
        import importlib
        return importlib.import_module(".printing", __name__)
    raise AttributeError(f"module 'lossdsl' has no attribute {name!r}")
