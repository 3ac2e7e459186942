"""Load generated kernel modules through files named by the hash of their source.

numba's ``cache=True`` needs a real file (numba issue 3501: no locator for code built by exec),
so each module is written once under the cache directory as ``k_<sha>.py`` and imported from
there; a second process finds the file and numba's on-disk cache next to it, and compiles
nothing. The directory is ``$LOSSDSL_CACHE_DIR``, else the user's cache dir.
"""
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

_loaded = {}


def cache_dir():
    env = os.environ.get("LOSSDSL_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        root = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
        base = Path(root) / "lossdsl"
    base.mkdir(parents=True, exist_ok=True)
    return base


def load_module(source):
    """Import the module whose text is ``source`` (written to the cache on first use)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    if digest in _loaded:
        return _loaded[digest]
    name = f"k_{digest}"
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)            # atomic: concurrent processes never see half a file
    spec = importlib.util.spec_from_file_location(f"lossdsl_kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    _loaded[digest] = module
    return module
