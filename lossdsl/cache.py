"""``lossdsl cache``: what the kernel cache holds, clearing it, pruning what an older compiler left.

Only names lossdsl writes are touched (``k_<sha>.py``, numba's ``__pycache__/k_<sha>.*``,
``index/<sha>``, the grammar's ``parser_<sha>.pickle``, and temp files of those names), so a
directory shared with other files, or one that is not lossdsl's at all, keeps everything else.
"""
import os
import re
from contextlib import suppress

from . import jit
from .lower import parser_file_name

_TEMP = r"(\..+\.tmp)?"          # paths.write_atomic's temp names: FILE.<random>.tmp
_TOP = re.compile(rf"({jit.MODULE_NAME.pattern}\.py|parser_[0-9a-f]{{24}}\.pickle)" + _TEMP)
_PYCACHE = re.compile(jit.MODULE_NAME.pattern + r"\..+")
_INDEX = re.compile(jit.INDEX_NAME.pattern + _TEMP)


def _files(base):
    """lossdsl's files under ``base``: {path: size}."""
    found = {}
    for sub, pattern in (("", _TOP), ("__pycache__", _PYCACHE), ("index", _INDEX)):
        with suppress(OSError):
            for entry in os.scandir(base / sub):
                if entry.is_file(follow_symlinks=False) and pattern.fullmatch(entry.name):
                    with suppress(OSError):
                        found[base / sub / entry.name] = entry.stat(follow_symlinks=False).st_size
    return found


def _entries(base):
    """{index path: (module name, fingerprint) or None for one lossdsl cannot read}."""
    out = {}
    for path in _files(base):
        if path.parent.name == "index" and jit.INDEX_NAME.fullmatch(path.name):
            try:
                out[path] = jit.index_entry(path)
            except OSError:
                out[path] = None
    return out


def _module_of(path):
    """The module name a lossdsl file belongs to (k_<sha>), or None for an index file."""
    m = jit.MODULE_NAME.match(path.name)
    return m[0] if m else None


def _remove(paths, sizes):
    """Delete ``paths``; (files, bytes) actually removed."""
    files = size = 0
    for p in paths:
        with suppress(FileNotFoundError):
            os.unlink(p)
            files, size = files + 1, size + sizes[p]
    return files, size


def _tidy(base):
    """Remove index/ and __pycache__/ when nothing is left in them (a running process makes
    them again on its next write)."""
    for sub in ("index", "__pycache__"):
        with suppress(OSError):
            (base / sub).rmdir()


def info(base=None):
    """{'path', 'exists', 'kernels', 'files', 'bytes', 'entries', 'stale'} of the cache."""
    base = jit.cache_dir() if base is None else base
    files, entries = _files(base), _entries(base)
    current = jit._fingerprint()
    return {"path": base, "exists": base.is_dir(),
            "kernels": sum(p.parent == base and p.suffix == ".py" for p in files),
            "files": len(files), "bytes": sum(files.values()), "entries": len(entries),
            "stale": sum(e is None or e[1] != current for e in entries.values())}


def clear(base=None):
    """Delete every lossdsl file of the cache; (files, bytes) removed."""
    base = jit.cache_dir() if base is None else base
    files = _files(base)
    removed = _remove(files, files)
    _tidy(base)
    return removed


def prune(base=None):
    """Delete index entries of other compilers (or unreadable), then every module (and numba's
    files for it) that no remaining entry names; (files, bytes) removed. A module still in use
    elsewhere (a CUDA module, say) is written again on its next use."""
    base = jit.cache_dir() if base is None else base
    current = jit._fingerprint()
    files, entries = _files(base), _entries(base)
    keep = {e[0] for e in entries.values() if e is not None and e[1] == current}
    doomed = [p for p, e in entries.items() if e is None or e[1] != current]
    doomed += [p for p in files if p.parent.name != "index" and _module_of(p) not in keep
               and p.name != parser_file_name()]
    removed = _remove(doomed, files)
    _tidy(base)
    return removed
