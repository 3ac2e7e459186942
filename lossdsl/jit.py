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

from .paths import GRAMMAR

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


def _fingerprint():
    """The compiler's own code: a kernel indexed under an older compiler is not reused."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        h = hashlib.sha256()
        here = Path(__file__).resolve().parent
        for path in sorted(here.glob("*.py")) + [GRAMMAR]:
            h.update(path.read_bytes())
        _FINGERPRINT = h.hexdigest()
    return _FINGERPRINT


_FINGERPRINT = None


def _index_path(key):
    text = "\x00".join(map(str, key)) + "\x00" + _fingerprint()
    return cache_dir() / "index" / hashlib.sha256(text.encode()).hexdigest()[:32]


def load_indexed(key):
    """The module recorded for ``key`` (a loss's texts, dtype, target), or None: this skips the
    whole symbolic pipeline in a second process."""
    try:
        source = (cache_dir() / (_index_path(key).read_text().strip() + ".py")).read_text()
    except OSError:
        return None
    return load_module(source)


def load_module(source, key=None):
    """Import the module whose text is ``source`` (written to the cache on first use);
    with ``key``, record it so that ``load_indexed(key)`` finds it."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    name = f"k_{digest}"
    if key is not None:
        index = _index_path(key)
        index.parent.mkdir(exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(name)
        os.replace(tmp, index)
    if digest in _loaded:
        return _loaded[digest]
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
