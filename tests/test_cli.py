"""The command line (LANGUAGE.md section 5), run in-process through main()."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lossdsl
from lossdsl import printing
from lossdsl.cli import main

USER_FILE = """\
# two losses of a user's own
loss sq "Squared error, scaled"
  input  yhat
  target y
  param  scale = 2 : positive
  loss = scale * (yhat - y)^2

loss mybce "bce through a call, with a heavier positive class"
  input  z
  target y : unit
  loss = bce(z, y, pos_weight=3)
"""

BAD_FILE = """\
loss sq
  input  yhat
  target y
  loss = (yhat - y)^2 + w
"""


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mine.loss"
    path.write_text(USER_FILE)
    return str(path)


# --------------------------------------------------------------------------- list

def test_list_one_aligned_line_per_library_loss(capsys):
    rc, out, err = run(capsys, "list")
    assert rc == 0 and err == ""
    lines = out.rstrip("\n").split("\n")
    names = lossdsl.names()
    assert len(lines) == len(names)
    assert [line.split()[0] for line in lines] == list(names)
    by_name = dict(zip(names, lines))
    assert "pos_weight=1" in by_name["bce"]
    assert "z[K]" in by_name["cross_entropy"]
    assert "label_smoothing=0" in by_name["cross_entropy"]
    assert "gamma=2" in by_name["focal"] and "alpha=0.25" in by_name["focal"]
    assert "a[D], p[D], n[D]" in by_name["triplet"]
    for name in ("bce", "cross_entropy"):
        doc = lossdsl.load(name).doc
        assert doc and by_name[name].endswith(doc)
    # aligned: every description starts in the same column
    starts = {line.index(lossdsl.load(n).doc) for n, line in by_name.items()
              if lossdsl.load(n).doc}
    assert len(starts) == 1


# --------------------------------------------------------------------------- show

def paper_in(out, f, label, expr, style="unicode", noun="the gradient"):
    """The paper form's lines are in ``out`` in order, whatever their indent."""
    at = 0
    for line in printing.paper_lines(label, expr, f, style, noun):
        at = out.find(line, at)
        if at < 0:
            return False
    return True


def test_show_bce(capsys):
    f = lossdsl.load("bce")
    rc, out, err = run(capsys, "show", "bce")
    assert rc == 0 and err == ""
    for line in f.definition.strip().splitlines():
        assert line.rstrip() in out
    assert paper_in(out, f, "loss", f.expr, noun="the loss")
    assert paper_in(out, f, "d loss / d z", f.gradient("z"))
    assert "σ(z)" in out and "softplus(-z)" in out
    for rule in f.rules:
        assert rule in out


def test_show_exact_prints_the_kernels_form(capsys):
    f = lossdsl.load("bce")
    rc, out, err = run(capsys, "show", "bce", "--exact")
    assert rc == 0 and err == ""
    assert "loss (stabilized, per sample):" in out
    assert printing.to_text(f.expr) in out
    assert printing.to_text(f.gradient("z")) in out


def test_show_cross_entropy_latex(capsys):
    f = lossdsl.load("cross_entropy")
    rc, out, err = run(capsys, "show", "cross_entropy", "--latex")
    assert rc == 0 and err == ""
    assert "logsumexp" in out                    # the definition text
    assert paper_in(out, f, r"\ell", f.expr, "latex", "the loss")
    assert paper_in(out, f, r"\frac{\partial \ell}{\partial z_{j}}", f.gradient("z"), "latex")
    assert "\\frac" in out or "\\operatorname" in out or "\\log" in out


@pytest.mark.parametrize("style", ["unicode", "latex", "exact"])
@pytest.mark.parametrize("name", lossdsl.names())
def test_show_every_library_loss(capsys, name, style):
    f = lossdsl.load(name)
    flags = {"unicode": [], "latex": ["--latex"], "exact": ["--exact"]}[style]
    rc, out, err = run(capsys, "show", name, *flags)
    assert rc == 0 and err == ""
    if style == "exact":
        assert printing.to_text(f.expr) in out
        for z in f.inputs:
            assert printing.to_text(f.gradient(z)) in out
    else:
        label = r"\ell" if style == "latex" else "loss"
        assert paper_in(out, f, label, f.expr, style, "the loss")
        assert out.count("= ") >= len(f.inputs) + 1


# --------------------------------------------------------------------------- grad

def test_grad_bce_mentions_sigmoid(capsys):
    rc, out, err = run(capsys, "grad", "bce")
    assert rc == 0 and err == ""
    assert "σ(z)" in out
    rc, out, err = run(capsys, "grad", "bce", "--ascii")
    assert rc == 0 and "sigmoid(z)" in out and out.isascii()
    rc, out, err = run(capsys, "grad", "bce", "--exact")
    assert printing.to_text(lossdsl.load("bce").gradient("z")) in out


def test_grad_latex_has_a_command(capsys):
    rc, out, err = run(capsys, "grad", "bce", "--latex")
    assert rc == 0
    assert "\\sigma" in out
    rc, out, err = run(capsys, "grad", "bce", "--latex", "--exact")
    assert printing.to_latex(lossdsl.load("bce").gradient("z")) in out


def test_grad_wrt_one_input(capsys):
    f = lossdsl.load("gaussian_nll")
    rc, out, err = run(capsys, "grad", "gaussian_nll", "--wrt", "logvar")
    assert rc == 0
    assert out.splitlines()[0] == "d loss / d logvar = (1 - (y - mu)²·exp(-logvar))/2"
    assert "mu" not in "".join(line.split(" = ")[0] for line in out.splitlines())
    rc, out, err = run(capsys, "grad", "gaussian_nll", "--wrt", "logvar", "--exact")
    assert printing.to_text(f.gradient("logvar")) in out
    assert len(out.strip().splitlines()) == 1


def test_grad_wrt_a_target_is_a_clean_error(capsys):
    rc, out, err = run(capsys, "grad", "bce", "--wrt", "y")
    assert rc == 1 and out == ""
    assert "y" in err and "z" in err


def test_grad_of_cross_entropy_per_input(capsys):
    rc, out, err = run(capsys, "grad", "cross_entropy")
    assert rc == 0
    assert out.startswith("d loss / d z[j] = softmax(z)[j]")


def test_grad_of_a_batch_loss_lists_its_adjoints(capsys):
    rc, out, err = run(capsys, "grad", "ntxent")
    assert rc == 0 and err == ""
    assert "\nwhere\n" in out and "  d_u[" in out and "  d_s[" in out


# --------------------------------------------------------------------------- source

def test_source_bce_cpu(capsys):
    rc, out, err = run(capsys, "source", "bce")
    assert rc == 0 and err == ""
    assert "def " in out and "prange" in out
    assert out == lossdsl.load("bce").source("cpu").rstrip("\n") + "\n"


def test_source_cross_entropy_cpu(capsys):
    rc, out, err = run(capsys, "source", "cross_entropy", "--target", "cpu")
    assert rc == 0
    assert "def " in out and "prange" in out


def test_source_cuda_prints_kernel_or_a_clean_error(capsys):
    rc, out, err = run(capsys, "source", "bce", "--target", "cuda")
    if rc == 0:
        assert "def " in out and "cuda" in out
    else:
        assert rc == 1 and out == ""
        assert err.strip() and len(err.strip().splitlines()) <= 3


def test_source_unknown_target_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["source", "bce", "--target", "tpu"])
    assert info.value.code == 2


# --------------------------------------------------------------------------- names

def test_unknown_name_suggests_close_matches(capsys):
    rc, out, err = run(capsys, "show", "bse")
    assert rc == 1 and out == ""
    assert "bse" in err and "bce" in err


def test_unknown_name_without_close_match(capsys):
    rc, out, err = run(capsys, "grad", "zzzzzz")
    assert rc == 1 and "zzzzzz" in err


def test_file_colon_name(capsys, user_file):
    defs = lossdsl.compile_file(user_file)
    rc, out, err = run(capsys, "show", f"{user_file}:sq")
    assert rc == 0 and err == ""
    assert "scale * (yhat - y)^2" in out
    assert paper_in(out, defs["sq"], "loss", defs["sq"].expr, noun="the loss")

    rc, out, err = run(capsys, "grad", f"{user_file}:mybce", "--wrt", "z")
    assert rc == 0 and "σ(" in out

    rc, out, err = run(capsys, "source", f"{user_file}:mybce")
    assert rc == 0 and "def " in out and "prange" in out


def test_file_colon_unknown_name_lists_close_matches(capsys, user_file):
    rc, out, err = run(capsys, "show", f"{user_file}:mybec")
    assert rc == 1 and out == ""
    assert "mybce" in err


# --------------------------------------------------------------------------- compile

def test_compile_user_file(capsys, user_file):
    rc, out, err = run(capsys, "compile", user_file)
    assert rc == 0 and err == ""
    lines = out.strip().splitlines()
    sq = next(line for line in lines if line.startswith("sq "))
    mybce = next(line for line in lines if line.startswith("mybce "))
    assert "yhat" in sq and "scale=2" in sq and "Squared error, scaled" in sq
    assert " z " in f" {mybce} " or "z," in mybce


def test_compile_bad_file_prints_caret_message(capsys, tmp_path):
    path = tmp_path / "bad.loss"
    path.write_text(BAD_FILE)
    rc, out, err = run(capsys, "compile", str(path))
    assert rc == 1 and out == ""
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:4:25: error: ")
    assert lines[1] == "    " + "  loss = (yhat - y)^2 + w"
    assert lines[2] == "    " + " " * 24 + "^"


def test_compile_missing_file_is_a_clean_error(capsys, tmp_path):
    rc, out, err = run(capsys, "compile", str(tmp_path / "nope.loss"))
    assert rc == 1 and "nope.loss" in err


# --------------------------------------------------------------------------- usage

def test_no_command_prints_usage(capsys):
    rc, out, err = run(capsys)
    assert rc == 2 and "usage" in err.lower()


# --------------------------------------------------------------------------- console script

def _console_script():
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join([str(venv_bin), os.environ.get("PATH", "")])
    return shutil.which("lossdsl", path=path)


@pytest.mark.skipif(_console_script() is None,
                    reason="the lossdsl console script is not installed (pip install -e .)")
def test_console_script(tmp_path):
    exe = _console_script()
    done = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == len(lossdsl.names())

    bad = tmp_path / "bad.loss"
    bad.write_text(BAD_FILE)
    done = subprocess.run([exe, "compile", str(bad)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"{bad}:4:25: error: ")
