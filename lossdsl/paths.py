"""The one place that knows where the grammar, the library and the cache live.

Installed wheels carry the grammar and the library inside the package (pyproject
force-include); a source checkout has them at the top level of the repository.
"""
import os
import tempfile
from contextlib import suppress
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _find(name):
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lossdsl: cannot find the {name}/ folder next to {_HERE}")


GRAMMAR = _find("grammar") / "lossdsl.lark"
LIBRARY = _find("library")


def cache_dir():
    """``$LOSSDSL_CACHE_DIR``, else the user's cache dir (jit.py says what it holds)."""
    env = os.environ.get("LOSSDSL_CACHE_DIR")
    if env:
        return Path(os.path.abspath(env))    # numba locates its cache from the module's path
    root = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(root) / "lossdsl"


def write_atomic(path, data):
    """Write ``data`` (bytes) to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(exist_ok=True)     # `lossdsl cache --clear` may have removed it meanwhile
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)     # mkstemp's 0600 would hide a shared cache from others
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
