"""`lossdsl plot`: curves from the compiled kernels, as a PNG and as numbers."""
from __future__ import annotations

import csv
import math
import sys

import pytest

from lossdsl.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def rows(path):
    with open(path) as fh:
        r = csv.reader(fh)
        return next(r), [[float(x) for x in row] for row in r]


def test_plot_focal_writes_a_png(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'lossdsl[plot]')")
    png = tmp_path / "f.png"
    rc, out, err = run(capsys, "plot", "focal", "-o", str(png))
    assert rc == 0 and err == "" and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_focal_csv_is_the_papers_figure(capsys, tmp_path):
    """No options: loss against p_t for γ = 0, 0.5, 1, 2, 5, α = 1 (Lin et al., Figure 1)."""
    path = tmp_path / "f.csv"
    rc, out, err = run(capsys, "plot", "focal", "--csv", str(path))
    assert rc == 0 and err == ""
    head, data = rows(path)
    assert head == ["gamma", "alpha", "p_t", "loss", "d loss / d z"]
    assert sorted({r[0] for r in data}) == [0, 0.5, 1, 2, 5]
    for gamma, alpha, p, loss, grad in data[::37]:
        assert alpha == 1 and 0 < p < 1
        assert loss == pytest.approx(-(1 - p) ** gamma * math.log(p), rel=1e-12, abs=1e-300)
        # d/dz of -(1 - σ)^γ log σ, σ = p
        want = -(1 - p) ** gamma * ((1 - p) - gamma * p * math.log(p))
        assert grad == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_plot_cross_entropy_against_the_targets_logit(capsys, tmp_path):
    path = tmp_path / "ce.csv"
    rc, out, err = run(capsys, "plot", "cross_entropy", "--param", "label_smoothing=0",
                       "--range=-3:3", "--csv", str(path))
    assert rc == 0
    head, data = rows(path)
    assert head == ["label_smoothing", "z[0]", "loss", "d loss / d z[0]"]
    assert data[0][1] == -3 and data[-1][1] == 3
    K = 10                                   # other logits 0
    for _, t, loss, grad in data[::20]:
        p = math.exp(t) / (math.exp(t) + K - 1)
        assert loss == pytest.approx(-math.log(p), rel=1e-12)
        assert grad == pytest.approx(p - 1, rel=1e-9, abs=1e-15)


def test_plot_huber_params_and_wrt(capsys, tmp_path):
    path = tmp_path / "h.csv"
    rc, out, err = run(capsys, "plot", "huber", "--param", "delta=1,2", "--csv", str(path))
    assert rc == 0
    head, data = rows(path)
    for delta, yhat, loss, grad in data:
        r = 0 - yhat
        want = 0.5 * r * r if abs(r) <= delta else delta * (abs(r) - 0.5 * delta)
        assert loss == pytest.approx(want, rel=1e-12, abs=1e-15)
    rc, out, err = run(capsys, "plot", "gaussian_nll", "--wrt", "logvar", "--csv", str(path))
    assert rc == 0 and rows(path)[0][-1] == "d loss / d logvar"


@pytest.mark.parametrize("argv, words", [
    (["plot", "focal", "--param", "gama=1"], ["gama", "gamma"]),
    (["plot", "focal", "--param", "gamma"], ["NAME=V1,V2"]),
    (["plot", "focal", "--range", "3:1"], ["LO < HI"]),
    (["plot", "mse", "--x", "p_t"], ["p_t"]),
    (["plot", "ntxent"], ["batch"]),
    (["plot", "bce", "--wrt", "y"], ["no input 'y'"]),
])
def test_plot_bad_arguments_are_clean_errors(capsys, tmp_path, argv, words):
    rc, out, err = run(capsys, *argv, "--csv", str(tmp_path / "x.csv"))
    assert rc == 1 and out == ""
    for w in words:
        assert w in err


def test_plot_without_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    rc, out, err = run(capsys, "plot", "bce", "-o", str(tmp_path / "b.png"))
    assert rc == 1 and "lossdsl[plot]" in err and "--csv" in err
    rc, out, err = run(capsys, "plot", "bce", "--csv", str(tmp_path / "b.csv"))
    assert rc == 0 and (tmp_path / "b.csv").exists()
