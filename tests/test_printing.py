"""Gradients printed as on paper (LANGUAGE.md section 7): `lossdsl grad` / `show`."""
from __future__ import annotations

import random

import pytest
import sympy as sp

import lossdsl
from lossdsl import paper, printing
from lossdsl.cli import main
from lossdsl.primitives import naive

SYMPY_NAMES = ("Abs", "Heaviside", "Piecewise", "KroneckerDelta", "Max(", "Min(", "Max2", "Min2",
               "IsArg", "Select", "UnevaluatedExpr", "ExprCondPair", "LogSumExp(", "Sum(", "Norm(")
PAPER_ONLY = ("mul0", "xdivy", "xlogy", "expm1", "log1p", "logcosh", " else ", "==")


def grad(capsys, *argv):
    rc = main(["grad", *argv])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    return out


# --------------------------------------------------------------------------- pinned forms

def test_cross_entropy(capsys):
    assert grad(capsys, "cross_entropy") == (
        "d loss / d z[j] = softmax(z)[j] - (1 - label_smoothing)·[j = y] - label_smoothing/K\n"
        "  edge cases:\n"
        "    label_smoothing = 0: the term label_smoothing/K is 0\n")


def test_cross_entropy_ascii(capsys):
    out = grad(capsys, "cross_entropy", "--ascii")
    assert out.splitlines()[0] == \
        "d loss / d z[j] = softmax(z)[j] - (1 - label_smoothing)*[j = y] - label_smoothing/K"
    assert out.isascii()


def test_bce(capsys):
    assert grad(capsys, "bce") == (
        "d loss / d z = (1 - y)·σ(z) - pos_weight·y·σ(-z)\n"
        "  edge cases:\n"
        "    y = 1: the term (1 - y)·σ(z) is 0\n"
        "    pos_weight·y = 0: the term pos_weight·y·σ(-z) is 0\n")


def test_focal_hard_labels_are_cases(capsys):
    lines = grad(capsys, "focal").splitlines()
    assert lines[0] == "d loss / d z = -α·σ(-z)^γ·(σ(-z) + γ·σ(z)·softplus(-z))  if y = 1"
    assert lines[1] == "               (1 - α)·σ(z)^γ·(σ(z) + γ·σ(-z)·softplus(z))  if y = 0"
    assert lines[2].startswith("               a_t·((1 - p_t)^γ·")          # soft labels,
    assert lines[2].endswith("  otherwise")                                  # in the definition's names
    assert lines[3] == "  where p_t = y·σ(z) + (1 - y)·σ(-z), a_t = α·y + (1 - α)·(1 - y)"
    assert lines[4] == "  edge cases:"
    assert "    y = 1, α = 0: the gradient is 0" in lines
    assert "    y = 0, α = 1: the gradient is 0" in lines
    assert "    a_t = 0: the gradient is 0" in lines
    assert len(grad(capsys, "focal", "--exact")) > 3 * len(lines[0])


def test_huber(capsys):
    assert grad(capsys, "huber") == (
        "d loss / d yhat = yhat - y           if |y - yhat| ≤ δ\n"
        "                  -δ·sign(y - yhat)  otherwise\n")


def test_mse(capsys):
    assert grad(capsys, "mse") == "d loss / d yhat = 2·(yhat - y)\n"


def test_kl_div(capsys):
    lines = grad(capsys, "kl_div").splitlines()
    assert lines[0] == "d loss / d z[m] = softmax(z)[m] - p[m]"
    assert lines[1] == "  the kernel computes, for any p: (Σ_k p[k])·softmax(z)[m] - p[m]"
    assert "  edge cases:" in lines


def test_triplet(capsys):
    assert grad(capsys, "triplet") == (
        "d loss / d a[j] = 2·(n[j] - p[j])·[‖a - n‖² < ‖a - p‖² + margin]\n"
        "d loss / d p[j] = 2·(p[j] - a[j])·[‖a - n‖² < ‖a - p‖² + margin]\n"
        "d loss / d n[j] = 2·(a[j] - n[j])·[‖a - n‖² < ‖a - p‖² + margin]\n")


def test_exact_is_the_kernels_form(capsys):
    for name in ("cross_entropy", "focal", "huber"):
        f = lossdsl.load(name)
        out = grad(capsys, name, "--exact")
        for z in f.inputs:
            assert printing.to_text(f.gradient(z)) in out
        assert "edge cases" not in out
    out = grad(capsys, "cross_entropy", "--exact")
    assert "(0 if label_smoothing == 0 else -label_smoothing/K)" in out
    out = grad(capsys, "cross_entropy", "--exact", "--latex")
    assert printing.to_latex(lossdsl.load("cross_entropy").gradient("z")) in out


# --------------------------------------------------------------------------- every loss

@pytest.mark.parametrize("style", [[], ["--ascii"], ["--latex"], ["--exact"]],
                         ids=["unicode", "ascii", "latex", "exact"])
@pytest.mark.parametrize("name", lossdsl.names())
def test_no_sympy_class_names(capsys, name, style):
    rc = main(["show", name, *style])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    for word in SYMPY_NAMES:
        assert word not in out, (name, word)
    if "--exact" not in style:
        formulas = out.split("gradients:")[1].split("rules:")[0]
        for word in PAPER_ONLY:
            assert word not in formulas, (name, word)
    if "--ascii" in style:
        assert out.split("loss (per sample):")[1].isascii()


def _mathtext():
    mathtext = pytest.importorskip("matplotlib.mathtext",
                                   reason="matplotlib is not installed (pip install 'lossdsl[plot]')")
    return mathtext.MathTextParser("agg")


@pytest.mark.parametrize("name", lossdsl.names())
def test_latex_is_balanced(capsys, name):
    """Without matplotlib too: braces and \\left/\\right pair up on every line."""
    for line in grad(capsys, name, "--latex").splitlines():
        depth = 0
        for ch in line.replace(r"\{", "").replace(r"\}", ""):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            assert depth >= 0, line
        assert depth == 0, line
        assert line.count(r"\left") == line.count(r"\right"), line


@pytest.mark.parametrize("name", lossdsl.names())
def test_latex_parses_with_mathtext(capsys, name):
    parser = _mathtext()
    out = grad(capsys, name, "--latex")
    for line in out.splitlines():
        parser.parse(f"${line.strip()}$")          # raises ValueError on invalid TeX
    assert out.startswith(r"\frac{\partial \ell}{\partial ")


def test_latex_names_one_symbol_per_name(capsys):
    out = grad(capsys, "cross_entropy", "--latex")
    assert r"\operatorname{softmax}(z)_{j} - \left(1 - \mathrm{label\_smoothing}\right) [j = y]" in out
    out = grad(capsys, "focal", "--latex")
    assert r"\sigma\left(- z\right)^{\gamma}" in out and r"\alpha" in out


# --------------------------------------------------------------------------- the display is the same math

def _scalar_losses():
    return [n for n in lossdsl.names()
            if not any(lossdsl.load(n).shapes[x] for x in lossdsl.load(n).inputs + lossdsl.load(n).targets)]


def _value(expr, point):
    e = naive(expr.xreplace(point))
    e = e.replace(lambda x: isinstance(x, paper.Ind), lambda x: sp.Piecewise((1, x.args[0]), (0, True)))
    return complex(sp.N(e, 30)).real


@pytest.mark.parametrize("name", _scalar_losses())
def test_paper_form_equals_kernel_form(name):
    """At random points off the edge cases, each case of the paper form equals the kernel's."""
    f = lossdsl.load(name)
    low = f._c.lowered
    rng = random.Random(0)
    for z in f.inputs:
        exact = f.gradient(z)
        form = paper.paper(exact, f)
        for _ in range(12):
            point = {}
            for d in low.definition.decls.values():
                sym = low.scalars[d.name]
                if d.kind == "param":
                    point[sym] = sp.Float(rng.choice([0.3, 0.7, 1.5, 2.5]))
                elif d.kind == "target" and d.domain.name in ("binary", "unit") and rng.random() < 0.6:
                    point[sym] = sp.Integer(rng.choice([0, 1]))
                elif d.kind == "target" and d.domain.name in ("unit",):
                    point[sym] = sp.Float(rng.uniform(0.05, 0.95))
                elif d.kind == "target" and d.domain.name == "sign":
                    point[sym] = sp.Integer(rng.choice([-1, 1]))
                else:
                    point[sym] = sp.Float(rng.uniform(-3, 3))
            for cond, expr in form.cases:
                for sym, value in reversed(form.where):      # the definition's names, written out
                    expr = expr.subs(sym, value)
                if cond is None or bool(cond.xreplace(point)):
                    assert _value(expr, point) == pytest.approx(_value(exact, point), rel=1e-9, abs=1e-12), \
                        (name, point)
                    break


USER = """\
loss quantile "Pinball loss"
  input  yhat
  target y
  param  q = 0.9 : unit
  r = y - yhat
  loss = max(q * r, (q - 1) * r)

loss mixed "clip, relu, sqrt, tanh, min, xlogy"
  input  x
  target y : binary
  param  lo = -1
  loss = clip(x, lo, 2) * relu(x - y) + sqrt(x^2 + 1) - tanh(x) + min(x, y) + xlogy(y, sigmoid(x))
"""


@pytest.mark.parametrize("name", ["quantile", "mixed"])
def test_user_losses_print_without_sympy_names(capsys, tmp_path, name):
    path = tmp_path / "user.loss"
    path.write_text(USER)
    for style in ([], ["--latex"], ["--ascii"]):
        rc = main(["show", f"{path}:{name}", *style])
        out, err = capsys.readouterr()
        assert rc == 0 and err == ""
        for word in SYMPY_NAMES + ("ITE(", "failed"):
            assert word not in out, (name, word)
    out = grad(capsys, f"{path}:quantile")
    assert out.splitlines()[0] == \
        "d loss / d yhat = (1 - q)·[q·(y - yhat) < -(1 - q)·(y - yhat)] - q·[q·(y - yhat) ≥ -(1 - q)·(y - yhat)]"
