"""The kernel cache: a second process compiles nothing; damaged, missing or foreign files, an
unwritable directory and concurrent processes and threads never fail a call; ``lossdsl cache``.

Every test uses its own cache directory under tmp_path. In-process tests forget what this
process loaded (``fresh``) so that the next call really reads the disk.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import lossdsl
from lossdsl import api, jit, lower
from lossdsl.cli import main

X = np.linspace(-2, 3, 11).astype(np.float32)
Y = np.cos(np.arange(11)).astype(np.float32)


def fresh(cache_dir, monkeypatch):
    """Point lossdsl at ``cache_dir`` and forget every kernel this process has loaded."""
    monkeypatch.setenv("LOSSDSL_CACHE_DIR", str(cache_dir))
    jit._loaded.clear()
    jit._usable_dirs.clear()
    jit._broken_dirs.clear()
    api._load_cached.cache_clear()
    api._library_definition.cache_clear()     # parsed again: the parser file is read or written
    lower.parser.cache_clear()
    for name in [m for m in sys.modules if m.startswith("lossdsl_kernels.")]:
        del sys.modules[name]


def call_mse(dtype=np.float32):
    """mse's value and gradient, checked against numpy; (cache hits, misses) of its kernel."""
    f = lossdsl.load("mse")
    x, y = X.astype(dtype), Y.astype(dtype)
    v, (g,) = f.value_and_grad(x, y)
    np.testing.assert_allclose(v, np.mean((x - y) ** 2), rtol=1e-6)
    np.testing.assert_allclose(g, 2 * (x - y) / x.size, rtol=1e-6)
    stats = f.kernel(np.dtype(dtype).name).stats
    return sum(stats.cache_hits.values()), sum(stats.cache_misses.values())


def cache_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, lossdsl.CacheWarning)]


def snapshot(root):
    """{relative path: bytes} of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A cache holding mse's float32 kernel: its module, numba's index and data, lossdsl's index."""
    base = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as mp:
        fresh(base, mp)
        assert call_mse() == (0, 1)
    return base


# --------------------------------------------------------------------------- damaged files

def damaged_file(base, kind):
    pattern = {"module": "k_*.py", "nbi": "__pycache__/*.nbi", "nbc": "__pycache__/*.nbc", "index": "index/*"}
    (path,) = base.glob(pattern[kind])
    return path


def garbage(path):
    path.write_bytes(np.random.default_rng(0).bytes(300))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [garbage, truncate, os.unlink])
@pytest.mark.parametrize("kind", ["module", "nbi", "nbc", "index"])
def test_damaged_or_missing_file_is_rebuilt(warm, tmp_path, monkeypatch, kind, damage):
    base = tmp_path / "cache"
    shutil.copytree(warm, base)
    path = damaged_file(base, kind)
    damage(path)
    fresh(base, monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call_mse()
    said = cache_warnings(record)
    # a missing file of numba's or a missing index entry is an ordinary cache miss; a missing
    # module that the index names, and every damaged file, is one warning that names it
    if damage is os.unlink and kind != "module":
        assert said == []
    else:
        assert len(said) == 1 and path.name in said[0], said
    fresh(base, monkeypatch)                              # healed: the next process just loads
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert call_mse() == (1, 0)
    assert cache_warnings(record) == []


def test_foreign_files_are_left_alone(warm, tmp_path, monkeypatch):
    base = tmp_path / "cache"
    shutil.copytree(warm, base)
    foreign = {"notes.txt": b"mine", "k_notahash.py": b"x = 1", "index/README": b"?",
               "__pycache__/tool.cpython-311.pyc": b"\0"}
    for name, data in foreign.items():
        (base / name).write_bytes(data)
    fresh(base, monkeypatch)
    assert call_mse() == (1, 0)
    assert main(["cache", "--prune"]) == 0 and main(["cache", "--clear"]) == 0
    assert snapshot(base) == foreign


@pytest.mark.parametrize("damage", [garbage, truncate])
def test_damaged_parser_file_is_built_again(warm, tmp_path, monkeypatch, damage):
    """The grammar's parser tables (a pickle lark wrote) load from the cache; a damaged file is
    built again and replaced, and parses the same."""
    base = tmp_path / "cache"
    shutil.copytree(warm, base)
    path = base / lower.parser_file_name()
    text = "loss sq\n  input x\n  target y : real\n  loss = (x - y)^2\n"
    want = lower.parser().parse(text)
    damage(path)
    bad = path.read_bytes()
    fresh(base, monkeypatch)
    assert lower.parser().parse(text) == want
    assert path.read_bytes() != bad                          # written again

    def no_build(*args, **kwargs):
        raise AssertionError("the parser was built, not loaded")
    monkeypatch.setattr(lower.Lark, "__init__", no_build)
    fresh(base, monkeypatch)
    assert lower.parser().parse(text) == want                # and that file loads


# --------------------------------------------------------------------------- unwritable cache

def one_warning_two_kernels():
    """Two kernels (float32, float64) computed right with one warning between them, and no disk
    cache of numba's: given a module whose __pycache__ it cannot write, numba would cache in
    ~/.cache/numba instead (or raise where it cannot write there either)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert call_mse(np.float32)[0] == 0 and call_mse(np.float64)[0] == 0
    said = cache_warnings(record)
    assert len(said) == 1 and "compiling kernels in memory" in said[0], said
    assert lossdsl.load("mse").kernel("float32").stats.cache_path is None


@pytest.mark.parametrize("where", ["under-a-file", "a-file"])
def test_cache_path_that_is_a_file_compiles_in_memory(tmp_path, monkeypatch, where):
    """A real unwritable path (tests run as root: chmod does not stop them)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fresh(blocker / "cache" if where == "under-a-file" else blocker, monkeypatch)
    one_warning_two_kernels()
    assert snapshot(tmp_path) == {"file": b"not a directory"}


def test_read_only_cache_compiles_in_memory_and_changes_nothing(warm, tmp_path, monkeypatch):
    """Read-only simulated: the writability probe fails with EROFS, as on a read-only mount."""
    base = tmp_path / "cache"
    shutil.copytree(warm, base)
    before = snapshot(base)

    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system", str(directory))
    monkeypatch.setattr(jit, "_probe", read_only)
    fresh(base, monkeypatch)
    one_warning_two_kernels()
    assert snapshot(base) == before


def test_full_disk_compiles_in_memory(tmp_path, monkeypatch):
    """Full disk simulated: every file lossdsl writes fails with ENOSPC (the probe still passes)."""
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(jit, "_write_atomic", full)
    fresh(tmp_path, monkeypatch)
    one_warning_two_kernels()
    assert not list(tmp_path.rglob("k_*"))


def test_numba_cannot_save_its_cache(tmp_path, monkeypatch):
    """Full disk simulated for numba's own files only: the kernel stays in memory."""
    from numba.core.caching import IndexDataCacheFile

    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(IndexDataCacheFile, "_save_index", full)
    fresh(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert call_mse() == (0, 1)
    said = cache_warnings(record)
    assert len(said) == 1 and "No space left" in said[0], said


# --------------------------------------------------------------------------- races

def test_threads_share_one_cold_cache(tmp_path, monkeypatch):
    fresh(tmp_path, monkeypatch)
    start, results = threading.Barrier(8), []

    def work():
        start.wait()
        f = lossdsl.load("mse")
        v, (g,) = f.value_and_grad(X, Y)
        results.append((float(v), g.tobytes()))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert cache_warnings(record) == []
    assert len(results) == 8 and len(set(results)) == 1
    np.testing.assert_allclose(results[0][0], np.mean((X - Y) ** 2), rtol=1e-6)
    assert len(list(tmp_path.glob("k_*.py"))) == 1


WORKER = textwrap.dedent("""
    import json, warnings, numpy as np, lossdsl
    warnings.simplefilter("error", lossdsl.CacheWarning)
    x, y = np.linspace(-2, 3, 11).astype(np.float32), np.cos(np.arange(11)).astype(np.float32)
    f = lossdsl.load("mse")
    v, (g,) = f.value_and_grad(x, y)
    s = f.kernel("float32").stats
    print(json.dumps({"hits": sum(s.cache_hits.values()), "misses": sum(s.cache_misses.values()),
                      "value": float(v), "grad": g.tolist()}))
""")


def processes(cache_dir, n):
    """Run WORKER in ``n`` processes at once on ``cache_dir``; their outputs."""
    env = dict(os.environ, LOSSDSL_CACHE_DIR=str(cache_dir), NUMBA_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_processes_share_one_cold_cache_then_a_later_one_compiles_nothing(tmp_path, monkeypatch):
    racers = processes(tmp_path, 4)
    assert all(r["value"] == racers[0]["value"] and r["grad"] == racers[0]["grad"] for r in racers)
    np.testing.assert_allclose(racers[0]["value"], np.mean((X - Y) ** 2), rtol=1e-6)
    np.testing.assert_allclose(racers[0]["grad"], 2 * (X - Y) / X.size, rtol=1e-6)
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*"))    # numba's index of the kernel
    assert not [p for p in tmp_path.rglob("*") if "tmp" in p.name]  # no temp file left behind
    fresh(tmp_path, monkeypatch)                                    # a later process, in effect:
    assert call_mse() == (1, 0)                                     # loaded, nothing compiled


# --------------------------------------------------------------------------- lossdsl cache

def cli(capsys, *argv):
    rc = main(["cache", *argv])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    return out


def test_cli_info_prune_clear(warm, tmp_path, monkeypatch, capsys):
    base = tmp_path / "cache"
    shutil.copytree(warm, base)
    fresh(base, monkeypatch)
    # what an older compiler left: an index entry under another fingerprint, its module, numba's files
    old = b"# an older kernel\n"
    name = f"k_{jit._digest(old)}"
    (base / f"{name}.py").write_bytes(old)
    (base / "__pycache__" / f"{name}.kernel-9.py311.nbi").write_bytes(b"old")
    (base / "index" / ("0" * 32)).write_text(f"{name}\n{'0' * 64}\n")
    (base / f"parser_{'0' * 24}.pickle").write_bytes(b"another grammar's")
    size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())

    out = cli(capsys)
    assert out.splitlines()[0] == str(base)
    assert "kernels: 2" in out and f"({size} bytes)" in out and "2 entries, 1 from other compilers" in out
    assert cli(capsys, "--info") == out

    out = cli(capsys, "--prune")
    assert "removed 4 files" in out
    assert not list(base.rglob(f"{name}*")) and len(list(base.glob("k_*.py"))) == 1
    assert [p.name for p in base.glob("parser_*")] == [lower.parser_file_name()]   # the current one kept
    assert call_mse() == (1, 0)                       # the current kernel survived, still cached

    out = cli(capsys, "--clear")
    assert "removed 5 files" in out and snapshot(base) == {}
    assert "kernels: 0" in cli(capsys)
    fresh(base, monkeypatch)
    assert call_mse() == (0, 1)                       # rebuilt from nothing


def test_cli_info_does_not_create_the_directory(tmp_path, monkeypatch, capsys):
    fresh(tmp_path / "none", monkeypatch)
    assert "not created yet" in cli(capsys) and "removed 0 files" in cli(capsys, "--clear")
    assert not (tmp_path / "none").exists()


def test_a_generated_module_names_the_shared_helpers_it_was_built_with():
    """numba's cache of a kernel holds the code of the helpers it imports from cpu_runtime.py and
    checks only the generated module's file: that file names the helpers' hash, so new helpers
    make a new module (and a new cache entry), never a stale kernel."""
    import hashlib
    from pathlib import Path
    digest = hashlib.sha256((Path(lossdsl.__file__).parent / "cpu_runtime.py").read_bytes()).hexdigest()[:16]
    for name in ("bce", "cross_entropy", "ntxent"):
        src = lossdsl.load(name).source("cpu", "float32")
        assert "from lossdsl.cpu_runtime import " in src and f"cpu_runtime.py {digest}" in src
        assert "def _dot(" not in src and "def _swap_threads(" not in src
