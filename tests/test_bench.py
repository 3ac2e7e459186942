"""``lossdsl bench`` (lossdsl/bench.py): it runs, its table has every available peer, and the
numpy references it times compute what lossdsl computes. No timing assertions."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import lossdsl
from lossdsl import bench, peers
from lossdsl.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def test_every_library_loss_has_a_workload_and_peers():
    assert {w.loss for w in bench.WORKLOADS} == set(lossdsl.names())
    assert set(peers.NUMPY) == set(lossdsl.names())
    assert set(peers.torch_peers()) == set(lossdsl.names())
    assert any(w.tiny for w in bench.WORKLOADS)


def test_bench_mse_prints_a_table_with_every_available_peer(capsys):
    rc, out, err = run(capsys, "bench", "mse", "--size", "small", "--repeat", "1")
    assert rc == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| loss |"))
    peers = bench.available_peers()
    assert "numpy" in peers
    for col in ["lossdsl ms"] + [f"{p} ms" for p in peers] + ["memcpy ms", "best peer / lossdsl",
                                                              "value rel. diff"]:
        assert f"| {col} |" in header + " |", col
    row = next(line for line in out.splitlines() if line.startswith("| mse |")).split("|")[1:-1]
    assert len(row) == header.count("|") - 1
    assert row[1].strip() == "2^18" and all(c.strip() not in ("", "-") for c in row)
    assert "numba" in out and "MISMATCH" not in out


def test_bench_out_rewrites_the_cpu_report_and_keeps_the_gpu_section(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "compile_times", lambda: (0.1, 1.0, 0.2))     # two fresh processes otherwise
    out = tmp_path / "RESULTS.md"
    gpu = "## GPU\n\nProduced by `python benchmarks/gpu_check.py` on a GPU.\n\n| loss | ms |\n"
    out.write_text("# CPU benchmark results\n\nan older table\n\n" + gpu)
    rc, _, err = run(capsys, "bench", "mse", "--size", "small", "--repeat", "1", "--out", str(out))
    assert rc == 0, err
    text = out.read_text()
    assert "an older table" not in text and "| mse |" in text
    assert text.endswith("\n" + gpu) and text.count("## GPU") == 1
    assert bench.joined("# new\n", bench.sections("# old, no GPU section\n")[1]) == "# new\n"


@pytest.mark.parametrize("argv, msg", [(["bench"], "NAME or --all"), (["bench", "mse", "--all"], "NAME or --all"),
                                       (["bench", "msee"], "did you mean 'mse'"),
                                       (["bench", "mse", "--repeat", "0"], "--repeat")])
def test_bench_usage_errors(capsys, argv, msg):
    rc, out, err = run(capsys, *argv)
    assert rc == 1 and msg in err and out == ""


CASES = [("cross_entropy", {"label_smoothing": 0.1}), ("focal", {}), ("huber", {}), ("multiclass_hinge", {}),
         ("triplet", {}), ("vae_elbo", {}), ("ntxent", {})]


@pytest.mark.parametrize("name, params", CASES, ids=[c[0] for c in CASES])
def test_numpy_reference_matches_lossdsl(name, params):
    """Value and every gradient of the timed numpy reference against lossdsl's kernel."""
    w = next(w for w in bench.workloads(name) if w.params == params and not w.tiny)
    _, arrays = w.arrays("small", "float32")
    v, grads = lossdsl.load(name).value_and_grad(*arrays, **params)
    rv, rgrads = peers.numpy_value_and_grad(name, *arrays, **params)
    assert np.asarray(rv).dtype == np.float32
    np.testing.assert_allclose(float(rv), float(v), rtol=1e-5)
    assert len(rgrads) == len(grads)
    for g, rg in zip(grads, rgrads):
        assert rg.dtype == np.float32 and rg.shape == g.shape
        np.testing.assert_allclose(rg, g, rtol=1e-3, atol=1e-5 * np.abs(g).max())


def test_import_lossdsl_bench_imports_no_framework():
    code = "import sys, lossdsl.bench; print(sorted(m for m in ('torch', 'jax', 'optax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
