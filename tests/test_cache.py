"""Kernels are cached on disk: a second process loads them without compiling anything."""
import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, time, numpy as np, lossdsl
    t0 = time.perf_counter()
    f = lossdsl.load("cross_entropy")
    v, (g,) = f.value_and_grad(np.random.randn(8, 5).astype(np.float32), np.arange(8) % 5)
    k = f.kernel("float32")
    print(json.dumps({"hits": sum(k.stats.cache_hits.values()), "misses": sum(k.stats.cache_misses.values()),
                      "seconds": time.perf_counter() - t0, "value": float(v)}))
""")


def run(cache):
    env = dict(os.environ, LOSSDSL_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_cache(tmp_path):
    first = run(tmp_path)
    assert first["misses"] >= 1 and first["hits"] == 0      # compiled, and stored
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*"))   # numba's index of the cached kernel
    second = run(tmp_path)
    assert second["misses"] == 0 and second["hits"] >= 1    # loaded, nothing compiled
    assert abs(second["value"] - first["value"]) < 10       # the same kernel ran (random inputs)
