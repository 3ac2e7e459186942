"""What importing lossdsl costs: torch and jax are optional extras (`import lossdsl` never imports
them, and a bridge whose framework is missing says which extra to install); a kernel found in the
cache is loaded and run without the symbolic pipeline (no sympy)."""
import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
import numpy as np
import lossdsl
v = lossdsl.load("bce")(np.zeros(3, np.float32), np.ones(3, np.float32))
loaded = sorted(m for m in ("torch", "jax", "jaxlib", "optax") if m in sys.modules)
sys.modules["torch"] = None          # as if not installed
sys.modules["jax"] = None
errors = {}
for bridge in ("lossdsl.torch", "lossdsl.jax"):
    try:
        __import__(bridge)
        errors[bridge] = None
    except ImportError as e:
        errors[bridge] = str(e)
print(json.dumps({"loaded": loaded, "errors": errors, "value": float(v)}))
"""


def _run(script, env=None):
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_frameworks_are_optional():
    got = _run(SCRIPT)
    assert got["loaded"] == []
    assert abs(got["value"] - 0.6931471805599453) < 1e-6        # bce(0, 1) = -log σ(0) = log 2
    assert "pip install 'lossdsl[torch]'" in got["errors"]["lossdsl.torch"]
    assert "pip install 'lossdsl[jax]'" in got["errors"]["lossdsl.jax"]


CACHED = r"""
import json, sys
import numpy as np
import lossdsl
f = lossdsl.load("focal")
v, (g,) = f.value_and_grad(np.array([-2.0, 0.5], np.float32), np.array([1.0, 0.0], np.float32))
print(json.dumps({"sympy": "sympy" in sys.modules, "value": float(v)}))
"""


def test_cached_kernel_needs_no_sympy(tmp_path):
    env = dict(os.environ, LOSSDSL_CACHE_DIR=str(tmp_path))
    first = _run(CACHED, env)          # compiles: the symbolic pipeline runs
    second = _run(CACHED, env)         # loads the kernel from the cache
    assert first["sympy"] and not second["sympy"]
    assert second["value"] == first["value"]
