"""lossdsl: losses written as math become stable, fused kernels with readable gradients.

    import lossdsl
    f = lossdsl.load("focal")
    v, (gz,) = f.value_and_grad(z, y, gamma=1.0)
"""
from .api import Loss, compile, compile_file, load, names
from .errors import (ArgumentError, CacheWarning, CompileError, DomainError, LossError, LossNameError,
                     LossSyntaxError, LossTypeError)
from . import printing

__all__ = ["Loss", "compile", "compile_file", "load", "names", "printing", "LossError", "CompileError",
           "LossSyntaxError", "LossNameError", "LossTypeError", "ArgumentError", "DomainError",
           "CacheWarning"]
__version__ = "0.1.0"
