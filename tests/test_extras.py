"""torch and jax are optional extras: `import lossdsl` never imports them, and a bridge whose
framework is missing says which extra to install."""
import json
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


def test_frameworks_are_optional():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == []
    assert abs(got["value"] - 0.6931471805599453) < 1e-6        # bce(0, 1) = -log σ(0) = log 2
    assert "pip install 'lossdsl[torch]'" in got["errors"]["lossdsl.torch"]
    assert "pip install 'lossdsl[jax]'" in got["errors"]["lossdsl.jax"]
