"""Load generated kernel modules through a disk cache that heals itself.

numba's ``cache=True`` needs a real file (numba issue 3501: no locator for code built by exec),
so each module is written once under the cache directory as ``k_<sha>.py`` and run from there;
a second process finds the file and numba's on-disk cache next to it, and compiles nothing.
The directory is ``$LOSSDSL_CACHE_DIR``, else the user's cache dir. It holds

    k_<sha256(text)[:24]>.py          a generated module, named by the hash of its text
    __pycache__/k_<sha>.*.nbi/.nbc    numba's index and compiled code for it
    index/<sha256(key, compiler)[:32]>  "k_<sha>\\n<compiler fingerprint>\\n": the module of a
                                      loss, so a second process skips the symbolic pipeline
    parser_<sha256(grammar)[:24]>.pickle  the grammar's parser tables (lower.parser)

Nothing read from it is trusted: a module must match the hash in its name, an index entry its
format and the compiler, and numba's files are loaded by a load that may fail. A damaged file is
deleted with one ``CacheWarning`` and rebuilt; the call succeeds. Every write is atomic (a temp
name, then ``os.replace``), so concurrent processes and threads never read half a file. A
directory that cannot be written degrades, with one warning, to compiling in memory.
"""
import hashlib
import os
import re
import sys
import tempfile
import threading
import types
import warnings
from contextlib import suppress
from pathlib import Path

from numba.core import caching
from numba.core.dispatcher import Dispatcher

from .errors import CacheWarning
from .paths import GRAMMAR, cache_dir
from .paths import write_atomic as _write_atomic

MODULE_NAME = re.compile(r"k_[0-9a-f]{24}")
INDEX_NAME = re.compile(r"[0-9a-f]{32}")
_INDEX_TEXT = re.compile(rb"(k_[0-9a-f]{24})\n([0-9a-f]{64})\n")

_lock = threading.RLock()   # one thread at a time reads, writes and runs modules
_loaded = {}                # digest -> module, in this process
_usable_dirs = set()        # cache dirs checked writable in this process
_broken_dirs = set()        # cache dirs that are not: kernels compile in memory (warned once)


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


def _digest(data):
    return hashlib.sha256(data).hexdigest()[:24]


def _warn(message):
    """One CacheWarning, attributed to the caller's line outside lossdsl, its kernels and numba."""
    level, frame = 2, sys._getframe(1)
    while frame.f_back and frame.f_globals.get("__name__", "").startswith(("lossdsl", "numba")):
        level, frame = level + 1, frame.f_back
    warnings.warn(f"lossdsl: {message}", CacheWarning, stacklevel=level)


def _unlink(*paths):
    """Delete what exists of ``paths``; a file another process removed first is no error."""
    for p in paths:
        with suppress(OSError):
            os.unlink(p)


def _numba_files(base, name):
    """numba's index and data files for module ``name`` (and Python's, from older lossdsl)."""
    return list((base / "__pycache__").glob(f"{name}.*"))


def _discard_module(base, name):
    _unlink(base / f"{name}.py", *_numba_files(base, name))


def _probe(directory):
    """Raise OSError where ``directory`` cannot take a new file (read-only, full, no permission).
    numba makes the same check and, where it fails, silently caches in ~/.cache/numba instead."""
    tempfile.TemporaryFile(dir=directory).close()


def _usable():
    """The cache directory, ready to write, or None: then this process compiles in memory."""
    base = cache_dir()
    key = str(base)
    if key in _broken_dirs:
        return None
    if key not in _usable_dirs:
        try:
            for d in (base, base / "index", base / "__pycache__"):
                d.mkdir(parents=True, exist_ok=True)
            _probe(base / "__pycache__")
        except OSError as e:
            _give_up(base, e)
            return None
        _usable_dirs.add(key)
    return base


def _give_up(base, error):
    if str(base) not in _broken_dirs:
        _broken_dirs.add(str(base))
        _warn(f"kernel cache {base} cannot be written ({error}); compiling kernels in memory "
              f"for this process")


def _index_path(base, key):
    text = "\x00".join(map(str, key)) + "\x00" + _fingerprint()
    return base / "index" / hashlib.sha256(text.encode()).hexdigest()[:32]


def index_entry(path):
    """(module name, compiler fingerprint) recorded in index file ``path``, or None when the
    file is not one lossdsl wrote. Raises OSError where it cannot be read."""
    m = _INDEX_TEXT.fullmatch(Path(path).read_bytes())
    return (m[1].decode(), m[2].decode()) if m else None


def load_indexed(key):
    """The module recorded for ``key`` (a loss's texts, dtype, target), or None: this skips the
    whole symbolic pipeline in a second process."""
    with _lock:
        base = _usable()
        if base is None:
            return None
        index = _index_path(base, key)
        name = _indexed_name(index)
        if name is None:
            return None
        data = _module_bytes(base, name)
        if data is None:
            _unlink(index)          # it names a module that is gone
            return None
        return _loaded.get(name[2:]) or _run(name, data.decode(), base)


def _indexed_name(index):
    """The module name in index file ``index``, or None; a damaged entry is deleted."""
    try:
        entry = index_entry(index)
    except FileNotFoundError:
        return None
    except OSError as e:
        entry = e
    if isinstance(entry, tuple) and entry[1] == _fingerprint():
        return entry[0]
    problem = entry if isinstance(entry, OSError) else "not written by this compiler"
    _warn(f"discarded unreadable index entry {index} ({problem})")
    _unlink(index)
    return None


def _module_bytes(base, name):
    """The text of module ``name`` if it matches the hash in its name, else None; a missing or
    damaged module is deleted with numba's files for it."""
    path = base / f"{name}.py"
    try:
        data = path.read_bytes()
        problem = None if _digest(data) == name[2:] else "its text does not match its name"
    except OSError as e:
        problem = e
    if problem is None:
        return data
    _warn(f"discarded cached kernel {path} ({problem}); rebuilding it")
    _discard_module(base, name)
    return None


def load_module(source, key=None):
    """Import the module whose text is ``source`` (written to the cache on first use);
    with ``key``, record it so that ``load_indexed(key)`` finds it."""
    data = source.encode()
    name = f"k_{_digest(data)}"
    with _lock:
        base = _usable()
        if base is not None:
            try:
                _store(base, name, data)
                if key is not None:
                    _write_atomic(_index_path(base, key), f"{name}\n{_fingerprint()}\n".encode())
            except OSError as e:        # full disk, or the directory went away under us
                _give_up(base, e)
                base = None
        return _loaded.get(name[2:]) or _run(name, source, base)


def _store(base, name, data):
    """Make ``base/name.py`` hold ``data``, replacing a damaged copy and numba's files for it."""
    path = base / f"{name}.py"
    try:
        on_disk = path.read_bytes()
    except FileNotFoundError:
        on_disk = None
    if on_disk == data:
        return
    if on_disk is not None:
        _warn(f"replaced damaged cached kernel {path}")
        _unlink(*_numba_files(base, name))
    _write_atomic(path, data)


def _run(name, source, base):
    """Execute module ``name`` from its file under ``base`` (numba caches it there), or, with no
    usable directory, from memory with numba's disk cache off (it would otherwise write to
    ~/.cache/numba, or fail). Python's own .pyc is not used: it is one more file to trust."""
    if base is None:
        source = source.replace("cache=True", "cache=False")
        filename = f"<lossdsl {name}>"
    else:
        filename = str(base / f"{name}.py")
    module = types.ModuleType(f"lossdsl_kernels.{name}")
    module.__file__ = filename
    sys.modules[module.__name__] = module     # numba finds a cached kernel's globals by module name
    exec(compile(source, filename, "exec"), module.__dict__)
    for obj in vars(module).values():
        if isinstance(obj, Dispatcher) and isinstance(obj._cache, caching.Cache):
            obj._cache = _GuardedCache(obj._cache, base)
    _loaded[name[2:]] = module
    return module


class _GuardedCache(caching._Cache):
    """numba's disk cache for one function, unable to fail a call. numba raises whatever
    unpickling garbage raises (``ValueError: invalid literal for int()``, ``EOFError``, ...);
    here a file it cannot load is deleted with its siblings and the function compiled again,
    and a file it cannot write leaves the kernel in memory."""

    def __init__(self, inner, base):
        self._inner, self._base = inner, base

    @property
    def _files(self):
        """This function's index and data files (and numba's temp files for them)."""
        return sorted(Path(self._inner.cache_path).glob(f"{self._inner._impl.filename_base}.*"))

    @property
    def cache_path(self):
        return self._inner.cache_path

    def enable(self):
        self._inner.enable()

    def disable(self):
        self._inner.disable()

    def flush(self):
        with suppress(OSError):
            self._inner.flush()

    def load_overload(self, sig, target_context):
        try:
            return self._inner.load_overload(sig, target_context)
        except Exception as e:
            files = self._files
            _warn(f"discarded unreadable numba cache {', '.join(map(str, files))} "
                  f"({type(e).__name__}: {str(e)[:80]}); recompiling")
            _unlink(*files)
            return None

    def save_overload(self, sig, data):
        try:
            self._inner.save_overload(sig, data)
        except OSError as e:            # full disk, read-only: the rest of this process too
            self._inner.disable()
            _give_up(self._base, e)
        except Exception as e:          # numba could not serialize this one kernel
            self._inner.disable()
            _warn(f"numba could not cache a kernel of {self._inner.cache_path} ({type(e).__name__}: "
                  f"{str(e)[:80]}); it stays in memory")
