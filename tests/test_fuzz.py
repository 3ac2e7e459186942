"""Fuzzing the compiler with hypothesis.

1. Random well-formed losses (a small grammar: + - * /, small integer powers, exp, log, softplus,
   sigmoid, tanh, abs, max, sqrt and log of positive things, conditionals) compile, and their
   value and gradient agree with the exact evaluator at random points where the truth is finite
   and the point is well-conditioned (a relative nudge of 2^-40 to the inputs moves the truth by
   less than 2^-30 relative: otherwise rounding the inputs alone decides the result).
2. Random byte strings and random token sequences fed to ``lossdsl.compile`` raise only
   ``lossdsl.LossError``: no other exception, no hang, nothing executed.
"""
import math
import signal
import warnings
from contextlib import contextmanager
from fractions import Fraction

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossdsl
from lossdsl.audit import bits_error
from lossdsl.exact import Evaluator


@contextmanager
def time_limit(seconds):
    def boom(signum, frame):
        raise TimeoutError(f"lossdsl.compile took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --- 1. well-formed expressions -------------------------------------------------------------------
LEAVES = st.sampled_from(["x", "t", "x", "0.5", "2", "1.5", "3"])


def _extend(children):
    pair = st.tuples(children, children)
    return st.one_of(
        pair.map(lambda p: f"({p[0]} + {p[1]})"),
        pair.map(lambda p: f"({p[0]} - {p[1]})"),
        pair.map(lambda p: f"({p[0]} * {p[1]})"),
        pair.map(lambda p: f"({p[0]} / (1 + ({p[1]})^2))"),
        st.tuples(children, st.sampled_from([2, 3])).map(lambda p: f"({p[0]})^{p[1]}"),
        children.map(lambda a: f"exp(-({a})^2)"),
        children.map(lambda a: f"log(1 + ({a})^2)"),
        children.map(lambda a: f"softplus({a})"),
        children.map(lambda a: f"sigmoid({a})"),
        children.map(lambda a: f"tanh({a})"),
        children.map(lambda a: f"abs({a})"),
        children.map(lambda a: f"sqrt(1 + abs({a}))"),
        children.map(lambda a: f"log(sigmoid({a}))"),
        pair.map(lambda p: f"max({p[0]}, {p[1]})"),
        st.tuples(children, children, children, children).map(
            lambda q: f"({q[0]} if {q[1]} < {q[2]} else {q[3]})"),
    )


EXPRS = st.recursive(LEAVES, _extend, max_leaves=6)


def _ulps_ok(got, truth, tol_bits=12):
    return bits_error(np.float64(got), truth, np.float64)[()] <= tol_bits


def _well_conditioned(ev, point, truth, index=None):
    if truth == 0:
        return False
    for name in ("x", "t"):
        for s in (1, -1):
            nudged = dict(point)
            nudged[name] = Fraction(point[name]) * (1 + s * Fraction(1, 2 ** 40))
            other = ev.at(nudged, "float64", index)
            if other is None or not math.isfinite(other) or abs(other - truth) > 2.0 ** -30 * abs(truth):
                return False
    return True


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=EXPRS, xs=st.lists(st.floats(-30, 30), min_size=3, max_size=3),
       ts=st.lists(st.floats(-5, 5), min_size=3, max_size=3))
def test_random_losses_match_exact(body, xs, ts):
    text = f"loss fz\n  input x\n  target t\n  loss = {body} + 0 * x\n"
    with time_limit(60):
        f = lossdsl.compile(text)["fz"]
    x = np.array(xs, dtype=np.float64)
    t = np.array(ts, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        v, (g,) = f.value_and_grad(x, t, reduction="none")
    ev, eg = Evaluator(f.expr), Evaluator(f.gradient("x"))
    for i in range(len(x)):
        point = {"x": float(x[i]), "t": float(t[i])}
        for evaluator, got, what in ((ev, v[i], "value"), (eg, g[i], "gradient")):
            truth = evaluator.at(point, "float64")
            if truth is None or not math.isfinite(truth):
                continue
            assert math.isfinite(got), f"{what} of `{body}` at {point}: {got} where the truth is {truth}"
            if _well_conditioned(evaluator, point, truth):
                assert _ulps_ok(got, truth), f"{what} of `{body}` at {point}: {got!r} vs exact {truth!r}"


# --- 2. garbage in, LossError out -------------------------------------------------------------------
def _only_loss_errors(text):
    try:
        with time_limit(10):
            lossdsl.compile(text)
    except lossdsl.LossError:
        pass


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_loss_error(data):
    _only_loss_errors(data.decode("utf-8", errors="replace"))


TOKENS = ["loss", "input", "target", "param", "batch", "z", "y", "x", "K", "k", "[", "]", "(", ")", ",", ":",
          "=", "==", "!=", "<", "<=", "+", "-", "*", "/", "^", "**", "if", "else", "and", "or", "sum", "mean",
          "max", "min", "logsumexp", "norm", "exp", "log", "sigmoid", "softplus", "bce", "unit", "class",
          "simplex", "real", "1", "0.5", "1e309", "-", "\n", "\n  ", '"doc"', "#", "__import__", "os", ".",
          "loss =", "input z[K]", "target y : class(K)", "param a = 1 : positive"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_random_token_strings_raise_only_loss_error(tokens):
    _only_loss_errors(" ".join(tokens))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(TOKENS), max_size=25))
def test_random_statement_bodies_raise_only_loss_error(tokens):
    # a well-formed header, so the parser reaches expressions, names and axes
    _only_loss_errors("loss f\n  input z[K]\n  target y : class(K)\n  loss = " + " ".join(tokens) + "\n")
