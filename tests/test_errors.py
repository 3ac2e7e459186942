"""Compile errors: class, exact line/column and the three-line caret message.

Conventions checked here (LANGUAGE.md section 4, "Compile errors ..."):
- line and column are 1-based and point at the *offending token*: the
  unexpected token or character for a syntax error, the unknown name, the
  index used outside its axis, the name of the called function or loss for a
  wrong arity, the second occurrence of a duplicated name, the default value
  of a param outside its domain, the keyword of an unknown keyword param;
- a definition without a `loss =` line is reported at the definition's name;
- an unexpected end of input points just past the last character of the last
  non-empty line;
- str(err) is exactly
      FILE:LINE:COL: error: REASON
          <the source line, as written>
          <COL-1 spaces>^
  with FILE `<string>` for lossdsl.compile(text) and the path as given for
  lossdsl.compile_file(path).
"""
from __future__ import annotations

import numpy as np
import pytest

import lossdsl
from lossdsl import (
    ArgumentError,
    CompileError,
    LossError,
    LossNameError,
    LossSyntaxError,
    LossTypeError,
)


def expect_error(text, cls, line, column, *, file="<string>", compile=None):
    """Compile `text`, expect `cls` at (line, column); check the message format."""
    with pytest.raises(LossError) as info:
        if compile is None:
            lossdsl.compile(text)
        else:
            compile()
    err = info.value
    assert isinstance(err, CompileError), f"{type(err).__name__} is not a CompileError: {err}"
    assert isinstance(err, cls), f"expected {cls}, got {type(err).__name__}: {err}"
    assert (err.line, err.column) == (line, column), str(err)
    assert err.file == file
    assert isinstance(err.reason, str) and err.reason.strip()
    assert "\n" not in err.reason
    msg = str(err).split("\n")
    assert len(msg) == 3, str(err)
    assert msg[0] == f"{file}:{line}:{column}: error: {err.reason}"
    assert msg[1] == "    " + text.split("\n")[line - 1]
    assert msg[2] == "    " + " " * (column - 1) + "^"
    return err


# --------------------------------------------------------------------------- syntax

def test_syntax_error_mid_expression():
    text = (
        "loss f\n"
        "  input z\n"
        "  target y\n"
        "  loss = z + * y\n"          # the `*` (col 14) cannot start an operand
    )
    expect_error(text, LossSyntaxError, 4, 14)


def test_bad_character():
    text = (
        "# a comment line counts as a line\n"
        "loss f\n"
        "  input z\n"
        "  target y\n"
        "  loss = z $ y\n"
    )
    expect_error(text, LossSyntaxError, 5, 12)


def test_unexpected_end_of_input():
    text = (
        "loss f\n"
        "  input z\n"
        "  loss = (z +\n"
    )
    expect_error(text, LossSyntaxError, 3, 14)


def test_unexpected_end_of_input_after_blank_lines():
    text = (
        "loss f \"no closing parenthesis\"\n"
        "  input z\n"
        "  loss = exp(z\n"
        "\n"
        "\n"
    )
    expect_error(text, LossSyntaxError, 3, 15)


def test_attribute_access_is_a_syntax_error():
    text = (
        "loss f\n"
        "  input z\n"
        "  loss = z.__class__\n"       # `.` (col 11) is not part of the language
    )
    expect_error(text, LossSyntaxError, 3, 11)


# --------------------------------------------------------------------------- names

def test_unknown_function():
    text = (
        "loss f\n"
        "  input z\n"
        "  loss = foo(z)\n"
    )
    err = expect_error(text, LossNameError, 3, 10)
    assert "foo" in err.reason


def test_unknown_name_in_second_definition():
    text = (
        "loss ok\n"
        "  input z\n"
        "  loss = z^2\n"
        "\n"
        "# the second one uses a name it never declared\n"
        "loss f\n"
        "  input z\n"
        "  target y\n"
        "  loss = (z - y)^2 + w\n"
    )
    err = expect_error(text, LossNameError, 9, 22)
    assert "w" in err.reason


def test_eval_is_not_a_function():
    text = (
        "loss f\n"
        "  input z\n"
        "  loss = eval(z)\n"
    )
    expect_error(text, LossNameError, 3, 10)


def test_python_call_cannot_run_code(tmp_path):
    sentinel = tmp_path / "pwned"
    text = (
        "loss f\n"
        "  input z\n"
        f'  loss = __import__("os").system("touch {sentinel}")\n'
    )
    # `__import__` (cols 10-19) is a name; the string at col 21 is no expression
    expect_error(text, LossSyntaxError, 3, 21)
    assert not sentinel.exists()


def test_exec_is_not_a_function_and_a_description_is_inert(tmp_path):
    sentinel = tmp_path / "pwned2"
    text = (
        f'loss f "__import__(\'os\').system(\'touch {sentinel}\')"\n'
        "  input z\n"
        "  loss = z + exec(z)\n"
    )
    expect_error(text, LossNameError, 3, 14)
    assert not sentinel.exists()


def test_duplicate_definition():
    text = (
        "loss f\n"
        "  input z\n"
        "  loss = z\n"
        "loss f\n"
        "  input z\n"
        "  loss = z^2\n"
    )
    err = expect_error(text, LossNameError, 4, 6)
    assert "f" in err.reason


def test_duplicate_declaration():
    text = (
        "loss f\n"
        "  input z\n"
        "  target z\n"
        "  loss = z\n"
    )
    expect_error(text, LossNameError, 3, 10)


def test_duplicate_declaration_on_one_line():
    text = (
        "loss f\n"
        "  input a[D], b[D], a[D]\n"
        "  loss = sum[d] a[d] * b[d]\n"
    )
    expect_error(text, LossNameError, 2, 21)


def test_unknown_domain():
    text = (
        "loss f\n"
        "  input z\n"
        "  target y : probability\n"
        "  loss = bce(z, y)\n"
    )
    # an unknown domain is an unknown name (a grammar that lists the domains
    # as keywords reports it as a syntax error at the same place)
    expect_error(text, (LossNameError, LossSyntaxError), 3, 14)


def test_call_with_unknown_keyword_param():
    text = (
        "loss f\n"
        "  input z\n"
        "  target y : unit\n"
        "  loss = bce(z, y, gama=1)\n"
    )
    err = expect_error(text, (LossNameError, LossTypeError), 4, 20)
    assert "gama" in err.reason


# --------------------------------------------------------------------------- types / axes

def test_index_outside_its_axis():
    text = (
        "loss f\n"
        "  input z[K]\n"
        "  target t[D]\n"
        "  loss = sum[k] z[k] * t[k]\n"  # k ranges over K (z[k]); t[k] at col 26 is over D
    )
    expect_error(text, LossTypeError, 4, 26)


def test_class_target_of_another_axis():
    text = (
        "loss f\n"
        "  input z[K]\n"
        "  target y : class(D)\n"
        "  loss = -z[y]\n"             # y indexes D, not K
    )
    expect_error(text, LossTypeError, 4, 13)


def test_indexing_a_scalar():
    text = (
        "loss f\n"
        "  input z\n"
        "  input w[K]\n"
        "  loss = sum[k] z[k] * w[k]\n"
    )
    expect_error(text, LossTypeError, 4, 17)


def test_missing_loss_line():
    text = (
        "loss f\n"
        "  input z\n"
        "  p = sigmoid(z)\n"
        "\n"
        "loss g\n"
        "  input z\n"
        "  loss = z\n"
    )
    expect_error(text, LossTypeError, 1, 6)


def test_wrong_arity_of_function():
    text = (
        "loss f\n"
        "  input z\n"
        "  loss = 1 + exp(z, z)\n"
    )
    err = expect_error(text, LossTypeError, 3, 14)
    assert "exp" in err.reason


def test_wrong_arity_of_library_loss_call():
    text = (
        "loss f\n"
        "  input z\n"
        "  loss = bce(z)\n"
    )
    err = expect_error(text, LossTypeError, 3, 10)
    assert "bce" in err.reason


def test_wrong_arity_of_local_loss_call():
    text = (
        "loss g\n"
        "  input a, b\n"
        "  loss = (a - b)^2\n"
        "loss f\n"
        "  input z\n"
        "  loss = 2 * g(z)\n"
    )
    expect_error(text, LossTypeError, 6, 14)


def test_param_default_outside_its_domain():
    text = (
        "loss myhuber\n"
        "  input yhat\n"
        "  target y\n"
        "  param delta = -1 : positive\n"
        "  r = y - yhat\n"
        "  loss = 0.5 * r^2 if abs(r) <= delta else delta * (abs(r) - 0.5 * delta)\n"
    )
    err = expect_error(text, CompileError, 4, 17)
    assert not isinstance(err, LossSyntaxError)  # `-1` is a valid default of a real param
    assert "delta" in err.reason and "myhuber" in err.reason


def test_negative_default_of_a_real_param_is_fine():
    defs = lossdsl.compile(
        "loss shifted\n"
        "  input z\n"
        "  param c = -1\n"
        "  loss = (z - c)^2\n"
    )
    assert defs["shifted"].params == {"c": -1}


# --------------------------------------------------------------------------- files, runtime

def test_compile_file_names_the_path(tmp_path):
    path = tmp_path / "bad.loss"
    text = (
        "loss f\n"
        "  input z\n"
        "  target y\n"
        "  loss = z $ y\n"
    )
    path.write_text(text)
    err = expect_error(text, LossSyntaxError, 4, 12, file=str(path),
                       compile=lambda: lossdsl.compile_file(str(path)))
    assert str(err).startswith(f"{path}:4:12: error: ")


def test_axis_bound_to_two_sizes_is_a_runtime_argument_error():
    dot = lossdsl.compile(              # compiles fine: D is bound only at call time
        "loss dot\n"
        "  input a[D], b[D]\n"
        "  loss = sum[d] a[d] * b[d]\n"
    )["dot"]
    with pytest.raises(ArgumentError) as info:
        dot(np.zeros((4, 3)), np.zeros((4, 5)))   # D = 3 from a, D = 5 from b
    assert not isinstance(info.value, CompileError)
    assert "D" in str(info.value)


def test_axis_bound_to_two_sizes_in_a_library_loss():
    triplet = lossdsl.load("triplet")
    a, p, n = np.zeros((4, 3)), np.zeros((4, 5)), np.zeros((4, 3))
    with pytest.raises(ArgumentError) as info:
        triplet.value_and_grad(a, p, n)
    assert not isinstance(info.value, CompileError)
    assert "D" in str(info.value)


def test_the_whole_family_is_loss_error():
    for cls in (CompileError, LossSyntaxError, LossNameError, LossTypeError,
                ArgumentError, lossdsl.DomainError):
        assert issubclass(cls, LossError)
    assert issubclass(lossdsl.DomainError, ArgumentError)


def test_a_description_holding_python_is_only_text(tmp_path):
    sentinel = tmp_path / "pwned3"
    doc = f"__import__('os').system('touch {sentinel}')"
    defs = lossdsl.compile(f'loss f "{doc}"\n  input z\n  loss = z^2\n')
    assert defs["f"].doc == doc
    assert not sentinel.exists()
