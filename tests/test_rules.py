"""Each stabilization rule: it fires on its pattern, it is an identity, and it matters.

"Matters" means: at the rule's witness input the textbook float64 formula is wrong (non-finite,
or off by more than 1e-6 relative) while the compiled loss is right to a few ulps, against a
50-digit mpmath evaluation of the same formula.
"""
import mpmath
import numpy as np
import pytest
import sympy as sp

import lossdsl
from lossdsl.primitives import naive
from lossdsl.rules import NODE_RULES, ROOT_RULES, stabilize, x, y

mpmath.mp.dps = 60


def truth(fn, *args):
    return float(fn(*[mpmath.mpf(a) for a in args]))


def close(a, b, ulps=4):
    return np.isfinite(a) and abs(a - b) <= ulps * np.spacing(abs(b)) + 1e-300


# rule -> (loss text body, argument values, mpmath truth of the loss, what the naive numpy formula gives)
M = mpmath
CASES = {
    "log_sigmoid": ("loss = log(sigmoid(x))", [-800.0], lambda v: -M.log1p(M.exp(-v)),
                    lambda v: np.log(1 / (1 + np.exp(-v)))),
    "log1m_sigmoid": ("loss = log(1 - sigmoid(x))", [40.0], lambda v: -M.log1p(M.exp(v)),
                      lambda v: np.log(1 - 1 / (1 + np.exp(-v)))),
    "one_minus_sigmoid": ("loss = 1 - sigmoid(x)", [40.0], lambda v: 1 / (1 + M.exp(v)),
                          lambda v: 1 - 1 / (1 + np.exp(-v))),
    "one_minus_mixed_sigmoid": ("loss = 1 - t*sigmoid(x) - (1 - t)*sigmoid(-x)", [-800.0, 1e-20],
                                lambda v, t: t / (1 + M.exp(v)) + (1 - t) / (1 + M.exp(-v)),
                                lambda v, t: 1 - t / (1 + np.exp(-v)) - (1 - t) / (1 + np.exp(v))),
    "softplus": ("loss = log(1 + exp(x))", [800.0], lambda v: M.log1p(M.exp(v)), lambda v: np.log(1 + np.exp(v))),
    "softplus_log1p": ("loss = log1p(exp(x))", [800.0], lambda v: M.log1p(M.exp(v)),
                       lambda v: np.log1p(np.exp(v))),
    "sigmoid_ratio": ("loss = exp(x) / (1 + exp(x))", [800.0], lambda v: 1 / (1 + M.exp(-v)),
                      lambda v: np.exp(v) / (1 + np.exp(v))),
    "sigmoid_reciprocal": ("loss = 1 / (1 + exp(-x))", [-740.0], lambda v: 1 / (1 + M.exp(-v)),
                           lambda v: 1 / (1 + np.exp(-v))),
    "one_minus_exp": ("loss = 1 - exp(x)", [1e-17], lambda v: -M.expm1(v), lambda v: 1 - np.exp(v)),
    "sqexp": ("loss = x^2 * exp(t)", [1e-200, 700.0], lambda v, t: v * v * M.exp(t), lambda v, t: v * v * np.exp(t)),
    "scaled_expm1": ("loss = 0.5 * expm1(x)", [709.79], lambda v: M.expm1(v) / 2, lambda v: 0.5 * np.expm1(v)),
    "log1p": ("loss = log(1 + x)", [1e-17], lambda v: M.log1p(v), lambda v: np.log(1 + v)),
    "expm1": ("loss = exp(x) - 1", [1e-17], lambda v: M.expm1(v), lambda v: np.exp(v) - 1),
    "logcosh": ("loss = log(cosh(x))", [1000.0], lambda v: M.log(M.cosh(v)), lambda v: np.log(np.cosh(v))),
    "xlogy": ("loss = t * log(t) + x", [0.5, 0.0], lambda v, t: v, lambda v, t: t * np.log(t) + v),
    "logsumexp": ("loss = log(sum[k] exp(z[k]))", [np.array([1000.0, 1000.0])],
                  lambda v: 1000 + M.log(2), lambda v: np.log(np.sum(np.exp(v)))),
    "scale_into_sum": ("loss = mean[k] z[k]", [np.array([1e308, 1e308])], lambda v: M.mpf(1e308),
                       lambda v: np.sum(v) / len(v)),
    "merge_sums": ("loss = sum[k] (z[k] + 1) - sum[k] z[k]", [np.array([1e308, 1e308])], lambda v: M.mpf(2),
                   lambda v: np.sum(v + 1) - np.sum(v)),
    "difference_of_squares": ("loss = x^2 - t^2", [1.5e154, 1e154], lambda v, t: v * v - t * t,
                              lambda v, t: v * v - t * t),
    "scaled_square": ("loss = t * x^2", [1e-160, 1e10], lambda v, t: t * v * v, lambda v, t: t * (v * v)),
    "scaled_power": ("loss = t * x^3", [1e-120, 1e200], lambda v, t: t * v ** 3, lambda v, t: t * v ** 3),
    "log_softmax": ("(see test_log_softmax_rule)", None, None, None),
    "div_norm": ("loss = sum[k] z[k] / norm[e] z[e]", [np.zeros(2)], lambda v: 0,
                 lambda v: np.sum(v) / np.sqrt(np.sum(v * v))),
    "norm": ("loss = sqrt(sum[k] z[k]^2)", [np.array([1e200, 1e200])],
             lambda v: M.sqrt(2) * M.mpf(1e200), lambda v: np.sqrt(np.sum(v * v))),
}


def _compile(body, args):
    decl = "  input  z[K]\n" if isinstance(args[0], np.ndarray) else "  input  x\n"
    if len(args) == 2:
        decl += "  target t : nonnegative\n"
    return lossdsl.compile(f"loss w\n{decl}  {body}\n")["w"]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[1] is not None])
def test_rule_fixes_its_witness(name):
    body, args, exact, textbook = CASES[name]
    f = _compile(body, args)
    assert name in f.rules, f"rule {name} did not fire on {body!r} (fired: {f.rules})"
    with np.errstate(all="ignore"):
        bad = textbook(*args)
    if isinstance(args[0], np.ndarray):
        got = float(f(args[0][None, :], reduction="sum"))
        want = float(exact(args[0]))
    else:
        got = float(f(*[np.array([a]) for a in args], reduction="sum"))
        want = truth(exact, *args)
    assert close(got, want), f"{name}: compiled {got!r}, truth {want!r}"
    naive_ok = np.isfinite(bad) and abs(bad - want) <= 1e-6 * abs(want)
    assert not naive_ok, f"{name}: the naive form {bad!r} is not wrong at the witness"


def test_log_softmax_rule():
    f = lossdsl.compile("loss w\n  input z[K]\n  target t : class(K)\n"
                        "  loss = -log(exp(z[t]) / sum[k] exp(z[k]))\n")["w"]
    assert "log_softmax" in f.rules
    z = np.array([[1000.0, 0.0, -1000.0]])
    with np.errstate(all="ignore"):
        naive_value = -np.log(np.exp(z[0, 0]) / np.exp(z).sum())
    assert not np.isfinite(naive_value)
    v, (g,) = f.value_and_grad(z, np.array([0]), reduction="sum")
    assert close(float(v), 0.0) and abs(float(v)) < 1e-300
    np.testing.assert_allclose(g, [[0.0, 0.0, 0.0]], atol=1e-300)


@pytest.mark.parametrize("rule", [r for r in NODE_RULES if r.naive is not None], ids=lambda r: r.name)
def test_rule_is_an_identity(rule):
    """naive and stable templates agree to 40 digits at points across the real line."""
    diff = naive(rule.naive) - naive(rule.stable)
    for a in (-30.0, -2.5, -0.3, 0.7, 3.0, 25.0):
        for b in (0.2, 1.5, 7.0):
            value = diff.evalf(60, subs={x: a, y: b})
            assert abs(value) < 1e-40, (rule.name, a, b, value)


@pytest.mark.parametrize("rule", [r for r in NODE_RULES if r.naive is not None], ids=lambda r: r.name)
def test_rule_fires_on_its_template(rule):
    fired = set()
    stabilize(rule.naive, fired=fired)
    assert rule.name in fired


def test_every_rule_has_a_test():
    tested = set(CASES) | {"tanh_grad", "pow_combine", "one_minus_softmax", "linear_vs_exp",
                           "into_piecewise", "fsum_max", "norm_times_unit",
                           "log_softmax_split", "norm_difference", "rescue_overflow",
                           "tangent_projection", "unit_vector", "weight_into_sum", "xexp_minus_weight",
                           "softmax_minus_onehot"}
    assert {r.name for r in NODE_RULES} <= tested
    assert "unit_adjoint" in {r.name for r in ROOT_RULES}   # test_unit_adjoint_drops_the_direction_...


@pytest.mark.parametrize("gamma", [3.0, 2.5])
def test_scaled_power_keeps_focal_soft_label_product(gamma):
    # a_t·(1 - p_t)^γ·bce at y = 1.29e-92, z = -1.36e228, α = 1: a_t = y and 1 - p_t = y, so a_t·(1 - p_t)^γ
    # underflows to 0 before meeting bce = y·|z| = 1.8e136. γ = 3 is a specialized kernel (the products),
    # 2.5 the general one (the power in halves).
    from lossdsl.exact import evaluate
    f = lossdsl.load("focal")
    assert "scaled_power" in f.rules
    z, t = np.array([-1.36e228]), np.array([1.29e-92])
    want = evaluate(f.expr, dict(z=z[0], y=t[0], gamma=gamma, alpha=1.0))
    # independent: mpmath of the definition, 1 - p_t = y·σ(-z) + (1 - y)·σ(z), bce = y·softplus(-z) + ...
    Z, Y = M.mpf(z[0]), M.mpf(t[0])
    sig = 1 / (1 + M.exp(-Z))
    bce = Y * M.log1p(M.exp(-Z)) + (1 - Y) * M.log1p(M.exp(Z))
    assert close(want, float(Y * (Y * (1 - sig) + (1 - Y) * sig) ** gamma * bce))
    got = float(f(z, t, gamma=gamma, alpha=1.0, reduction="sum"))
    assert close(got, want) and want > 1e-300, (got, want)
    # the product in sympy's order, each factor exact here (σ(-z) = 1, σ(z) = 0, softplus(-z) = -z): 0, or a
    # subnormal with a few bits left
    a_t, u, b = t[0], t[0], t[0] * -z[0]
    assert abs(a_t * u ** gamma * b - want) > 1e-6 * want


@pytest.mark.parametrize("pw,y0,z0", [(3.0, 1.0, -3.4e38)])      # pw·softplus(-z) overflows before the /K
def test_scale_first_keeps_mean_terms_finite_float32(pw, y0, z0):
    f = lossdsl.load("multilabel_bce")
    assert "scale_first" in f.rules
    z = np.array([[z0, -3e38, -3e38, -3e38]], np.float32)
    t = np.array([[y0, 0, 0, 0]], np.float32)

    def bce(zk, yk):
        zk, yk = M.mpf(float(zk)), M.mpf(float(yk))
        return pw * yk * M.log1p(M.exp(-zk)) + (1 - yk) * M.log1p(M.exp(zk))
    want = float(np.float32(sum(bce(a, b) for a, b in zip(z[0], t[0])) / 4))
    got = float(f(z, t, pos_weight=pw, reduction="sum"))
    assert np.isfinite(got) and abs(got - want) <= 2 * np.spacing(np.float32(want)), (got, want)
    # the textbook order in float32: pw·y·softplus(-z) and then the mean
    with np.errstate(all="ignore"):
        sp_ = np.log1p(np.exp(-np.abs(z))) + np.maximum(-z, 0)
        naive = float(np.mean(np.float32(pw) * t * sp_ + (1 - t) * (np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0))))
    assert not (np.isfinite(naive) and abs(naive - want) <= 1e-6 * want), naive


@pytest.mark.parametrize("a0", [0.0, 1.5])
def test_sqdist_diff_at_opposite_max_floats(a0):
    # p_0 = max, n_0 = -max: n - p overflows against (a - p) + (a - n) = 0 (inf·0 = NaN, and the rescue's
    # scaled copy lost the other coordinates). At a_0 = 0 the distances tie exactly (value 0.8125); at
    # a_0 = 1.5 the differences round and 2a - p - n = 3 (the loss is 0, its gradients 0)
    big = np.finfo(np.float64).max
    f = lossdsl.load("triplet")
    assert "difference_of_squares" in f.rules
    a, p, n = np.array([[a0, 0.0]]), np.array([[big, 0.25]]), np.array([[-big, 0.5]])
    with M.workdps(700):        # the squares are 3e616 and differ by 1e309
        A, P, N = ([M.mpf(float(v)) for v in r[0]] for r in (a, p, n))
        want = float(max(0, sum((x - y) ** 2 - (x - z) ** 2 for x, y, z in zip(A, P, N)) + 1))
    v, grads = f.value_and_grad(a, p, n, reduction="sum")
    assert close(float(v), want), (float(v), want)
    if want == 0:
        assert all(np.all(g == 0) for g in grads), grads
    with np.errstate(all="ignore"):
        naive = np.maximum(0, np.sum((a - p) ** 2) - np.sum((a - n) ** 2) + 1)
    assert not (np.isfinite(naive) and abs(naive - want) <= 1e-6 * want)


def test_sqdist_sum_takes_the_fast_path_and_falls_back_where_a_term_leaves_it():
    # A sum of sqdist_diff is summed first as sqdist_fast, (n - p)·((a - p) + (a - n)) with no branch (the
    # loop vectorizes), and again term by term where that sum is NaN: a term where (a - p) + (a - n)
    # rounds to 0 but 2a - p - n does not (TwoSum recovers it), or an infinite coordinate. The overflow
    # rescue's scaled sum gets a pass of its own, only where the sum is not finite.
    from fractions import Fraction as Q
    f = lossdsl.load("triplet")
    src = f.source("cpu", "float64")
    fast, full = src.index("_sqdist_fast(a0"), src.index("_sqdist_diff(a0")
    assert fast < src.index("!= r", fast) < full < src.index("if not abs(", full) < src.index("_sqdist_diff_small(a0")
    special = (2.2967755324384083, -5555347603856154.0, 5555347603856158.0)
    assert (special[0] - special[1]) + (special[0] - special[2]) == 0     # the fast form's term is 0
    rng = np.random.default_rng(5)
    a, p, n = (rng.uniform(-3, 3, (6, 4)) for _ in range(3))
    for i in range(4):                  # the special coordinate at each position, then none
        a[i, i], p[i, i], n[i, i] = special
    a[4, 2], p[4, 2] = np.inf, 1.0      # (a - p)² - (a - n)² at a = inf: (n - p)·inf
    v, grads = f.value_and_grad(a, p, n, reduction="none")
    for i in range(4):
        t = sum((Q(x) - Q(y)) ** 2 - (Q(x) - Q(z)) ** 2 for x, y, z in zip(a[i], p[i], n[i]))
        want = float(max(Q(0), t + 1))
        assert want > 6e15 and close(float(v[i]), want), (i, v[i], want)
    assert v[4] == (np.inf if n[4, 2] > p[4, 2] else 0.0)
    assert np.all(np.isfinite(grads[0][:4])) and np.all(grads[0][5] == 2 * (n[5] - p[5]) * (v[5] > 0))


def test_tanh_grad_rule_keeps_gradient_of_log_cosh_of_tanh():
    # d/dx tanh(x) = 1 - tanh(x)^2 cancels to 0 at x = 20; 1/cosh^2 keeps 1.7e-17
    f = lossdsl.compile("loss w\n  input x\n  loss = tanh(x)\n")["w"]
    _, (g,) = f.value_and_grad(np.array([20.0]), reduction="sum")
    assert "tanh_grad" in f.rules
    want = truth(lambda v: 1 / M.cosh(v) ** 2, 20.0)
    assert close(float(g[0]), want)
    assert 1 - np.tanh(20.0) ** 2 == 0.0
    # with a factor from the chain rule, d/dx e^(-tanh²x) = -(2 - 2tanh²x)·tanh x·e^(-tanh²x): 41 ulps
    # at x = 6 (found by tests/test_fuzz.py), 2/cosh² keeps it within 2
    f = lossdsl.compile("loss w\n  input x\n  loss = exp(-(tanh(x))^2)\n")["w"]
    _, (g,) = f.value_and_grad(np.array([6.0]), reduction="sum")
    assert "tanh_grad" in f.rules
    want = truth(lambda v: -2 * M.tanh(v) / M.cosh(v) ** 2 * M.exp(-M.tanh(v) ** 2), 6.0)
    assert close(float(g[0]), want, ulps=2)
    t = np.tanh(6.0)
    assert not close(-(2 - 2 * t * t) * t * np.exp(-t * t), want, ulps=16)


def test_sigmoid_and_softplus_gradients_are_stable():
    f = lossdsl.compile("loss w\n  input x\n  loss = softplus(x) + sigmoid(x)\n")["w"]
    xs = np.array([-800.0, -40.0, 40.0, 800.0])
    _, (g,) = f.value_and_grad(xs, reduction="sum")
    for v, got in zip(xs, g):
        want = truth(lambda t: 1 / (1 + M.exp(-t)) + M.exp(-t) / (1 + M.exp(-t)) ** 2, v)
        assert close(float(got), want, ulps=8), (v, got, want)


def test_norm_gradient_at_zero_is_zero():
    f = lossdsl.compile("loss w\n  input z[K]\n  loss = norm[k] z[k]\n")["w"]
    v, (g,) = f.value_and_grad(np.zeros((1, 3)), reduction="sum")
    assert v == 0.0 and np.all(g == 0.0)
    v, (g,) = f.value_and_grad(np.array([[3e200, 4e200]]), reduction="sum")
    assert close(float(v), 5e200) and np.allclose(g, [[0.6, 0.8]], rtol=1e-15)


def test_zero_weight_annihilates_masked_logits():
    ce = lossdsl.load("cross_entropy")
    z = np.array([[2.0, -np.inf, 0.5]])
    v, (g,) = ce.value_and_grad(z, np.array([0]), reduction="sum")
    assert "zero_weights" in ce.rules
    want = -2.0 + np.log(np.exp(2.0) + np.exp(0.5))
    assert np.isfinite(v) and abs(v - want) < 1e-15
    assert g[0, 1] == 0.0 and np.all(np.isfinite(g))


def test_rules_are_sympy_identities_on_loss_expressions():
    """The stabilized focal loss equals the textbook one (symbolically, at sample points)."""
    f = lossdsl.load("focal")
    z, y_, g_, a_ = sp.symbols("z y gamma alpha", real=True)
    p = 1 / (1 + sp.exp(-z))
    p_t = y_ * p + (1 - y_) * (1 - p)
    textbook = (y_ * a_ + (1 - y_) * (1 - a_)) * (1 - p_t) ** g_ * -(y_ * sp.log(p) + (1 - y_) * sp.log(1 - p))
    syms = {s.name: s for s in f.expr.free_symbols}
    ours = naive(f.expr)
    for zv, yv, gv, av in [(0.3, 1, 2, 0.25), (-2.0, 0, 0.5, 0.25), (1.7, 0.3, 1.5, 0.6)]:
        subs_t = {z: zv, y_: yv, g_: gv, a_: av}
        subs_o = {syms["z"]: zv, syms["y"]: yv, syms["gamma"]: gv, syms["alpha"]: av}
        assert abs(textbook.evalf(40, subs=subs_t) - ours.evalf(40, subs=subs_o)) < 1e-30


def test_pow_combine_keeps_the_gradient_of_a_power_at_zero():
    # d/dx x^γ is sympy's γ·x^γ/x: 0/0 = NaN at x = 0 where the truth is 0 (γ = 2)
    f = lossdsl.compile("loss w\n  input x\n  param g = 2 : nonnegative\n  loss = x^g\n")["w"]
    assert "pow_combine" in f.rules
    _, (g,) = f.value_and_grad(np.array([0.0, 3.0]), reduction="sum", g=2.0)
    assert g[0] == 0.0 and g[1] == 6.0
    with np.errstate(all="ignore"):
        assert np.isnan(2.0 * np.float64(0.0) ** 2.0 / np.float64(0.0))


def test_one_minus_softmax_of_a_confident_row():
    # 1 - softmax_y at z = [40, 0, 0, 0] is 3e^-40 = 1.27e-17; 1 - exp(z_y - logsumexp) is 0
    f = lossdsl.compile("loss w\n  input z[K]\n  target y : class(K)\n"
                        "  loss = 1 - exp(z[y] - logsumexp[k] z[k])\n")["w"]
    assert "one_minus_softmax" in f.rules
    z = np.array([[40.0, 0.0, 0.0, 0.0]])
    v, (g,) = f.value_and_grad(z, np.array([0]), reduction="sum")
    want = truth(lambda a: 3 * M.exp(-a) / (1 + 3 * M.exp(-a)), 40.0)
    assert close(float(v), want, ulps=8)
    assert 1 - np.exp(z[0, 0] - np.log(np.exp(z).sum())) == 0.0
    assert np.all(np.isfinite(g)) and g[0, 1] > 0


def test_annihilate_masked_logit_in_an_entropy_term():
    # p·log p of a masked (-inf) logit: the gradient has (z - lse)·e^(z - lse) = -inf·0 = NaN;
    # mul0 makes the underflowed exponential decide: the masked class gets gradient 0
    f = lossdsl.compile("loss w\n  input z[K]\n  p[k] = exp(z[k] - logsumexp[j] z[j])\n"
                        "  loss = sum[k] xlogy(p[k], p[k])\n")["w"]
    masked = f.value_and_grad(np.array([[-np.inf, 0.0, 1.0, 2.0]]), reduction="sum")
    far = f.value_and_grad(np.array([[-800.0, 0.0, 1.0, 2.0]]), reduction="sum")
    assert "annihilate" in f.rules
    assert masked[1][0][0, 0] == 0.0
    np.testing.assert_allclose(masked[1][0], far[1][0], rtol=1e-14)
    np.testing.assert_allclose(masked[0], far[0], rtol=1e-14)


def test_annihilate_sigmoid_against_softplus():
    # d/dx softplus(x)·σ(x) = σ(x)² + softplus(x)·σ(x)·σ(-x): at x = inf the second term is inf·0 = NaN
    # (the limit is 0: the focal gradient at z = ±inf); the underflowed sigmoid decides the product
    f = lossdsl.compile("loss w\n  input x\n  loss = softplus(x) * sigmoid(x)\n")["w"]
    _, (g,) = f.value_and_grad(np.array([np.inf, 800.0, -np.inf, 0.0]), reduction="none")
    assert "annihilate" in f.rules
    np.testing.assert_allclose(g, [1.0, 1.0, 0.0, 0.25 + np.log(2) / 4], rtol=1e-15)
    with np.errstate(all="ignore"):
        s, sp_ = 1 / (1 + np.exp(-np.inf)), np.log1p(np.exp(np.inf))
        assert np.isnan(s * s + sp_ * s * (1 - s))


def test_sqexp_keeps_the_gaussian_nll_finite():
    # (y - μ)²·e^(-s) at s = -745.13, y - μ = 5e-324: the square underflows, the exponential
    # overflows (0·inf = NaN); the gradient (μ - y)·e^(-s) is inf for the same reason (truth -1.99)
    f = lossdsl.load("gaussian_nll")
    assert "sqexp" in f.rules
    mu, s, y = np.array([0.0]), np.array([-745.13]), np.array([5e-324])
    v, (gmu, gs) = f.value_and_grad(mu, s, y, reduction="none")
    assert close(float(v[0]), truth(lambda a: a / 2 + M.mpf(5e-324) ** 2 * M.exp(-a) / 2, -745.13))
    assert close(float(gmu[0]), truth(lambda a: -M.mpf(5e-324) * M.exp(-a), -745.13))
    assert close(float(gs[0]), 0.5)
    with np.errstate(all="ignore"):
        assert np.isnan(y[0] ** 2 * np.exp(745.13)) and np.isinf(-y[0] * np.exp(745.13))
    # an infinite residual: inf at a moderate variance (even where e^(-s/2) underflows in float32), 0
    # against e^(-1.8e308)
    v, (gmu, gs) = f.value_and_grad(np.array([0.0, 0.0], np.float32), np.array([433.5, 3e38], np.float32),
                                    np.array([np.inf, np.inf], np.float32), reduction="none")
    assert v[0] == np.inf and gmu[0] == -np.inf and v[1] == np.float32(1.5e38) and gmu[1] == 0.0


def test_linear_vs_exp_lets_the_exponential_win():
    # s + r²e^(-s) at s = -inf: -inf + inf = NaN, where the limit is inf (the Gaussian NLL with a
    # variance that underflows); at s = +inf the linear term wins by itself
    f = lossdsl.compile("loss w\n  input x\n  target t\n  loss = x + t^2 * exp(-x)\n")["w"]
    assert "linear_vs_exp" in f.rules
    v, (g,) = f.value_and_grad(np.array([-np.inf, np.inf, -np.inf, 2.0]), np.array([3.0, 3.0, 0.0, 3.0]),
                               reduction="none")
    assert v[0] == np.inf and v[1] == np.inf and v[2] == -np.inf and close(float(v[3]), 2 + 9 * np.exp(-2.0))
    with np.errstate(all="ignore"):
        assert np.isnan(-np.inf + 9.0 * np.exp(np.inf))


def test_into_piecewise_cancels_the_scale_of_a_branch():
    # huber(δ=β)/β: the linear branch β·(|r| - β/2) overflows before the division by β
    f = lossdsl.compile("loss w\n  input x\n  param b = 1 : positive\n"
                        "  loss = (0.5 * x^2 if abs(x) <= b else b * (abs(x) - 0.5 * b)) / b\n")["w"]
    assert "into_piecewise" in f.rules
    v, (g,) = f.value_and_grad(np.array([1e308, -1e308, 0.5]), reduction="none", b=4.0)
    np.testing.assert_array_equal(v, [1e308 - 2, 1e308 - 2, 0.125 / 4])
    np.testing.assert_array_equal(g, [1.0, -1.0, 0.125])
    with np.errstate(all="ignore"):
        assert np.isinf(4.0 * (1e308 - 2.0) / 4.0)


def test_fsum_max_cancels_in_any_order():
    # m - z_y + max_{j != y} z_j: at equal logits 1e30 left to right is (1 - 1e30) + 1e30 = 0 (truth 1);
    # at z_y = 1, max = 2.2e-308 right to left is 1 + (2.2e-308 - 1) = 0 (truth 2.2e-308)
    f = lossdsl.compile("loss w\n  input z[K]\n  target y : class(K)\n  param m = 1 : nonnegative\n"
                        "  loss = m - z[y] + max[j != y] z[j]\n")["w"]
    assert "fsum_max" in f.rules
    z = np.array([[1e30, 1e30, 1e30], [1.0, -45.0, 2.2250738585072014e-308]])
    v = f(z, np.array([0, 0]), reduction="none")
    np.testing.assert_array_equal(v, [1.0, 2.2250738585072014e-308])
    assert (1.0 - 1e30) + 1e30 == 0.0 and 1.0 + (2.2250738585072014e-308 - 1.0) == 0.0
    # equal infinite logits: max - z_y is 0 (as a logsumexp's max shift), not inf - inf
    v, (g,) = f.value_and_grad(np.array([[np.inf, np.inf, np.inf]]), np.array([0]), reduction="none")
    assert v[0] == 1.0 and list(g[0]) == [-1.0, 1.0, 0.0]


def test_indicator_of_a_nan_comparison_is_nan():
    # d/dx max(0, 1 - x) is -[1 - x > 0]: at x = NaN the comparison is neither true nor false, and the
    # gradient is NaN (NaN in, NaN out), not the else branch 0 (a NaN logit dropped from a hinge gradient)
    f = lossdsl.compile("loss w\n  input x\n  loss = max(0, 1 - x)\n")["w"]
    _, (g,) = f.value_and_grad(np.array([np.nan, 2.0, 0.5, 1.0]), reduction="none")
    assert np.isnan(g[0]) and list(g[1:]) == [0.0, -1.0, 0.0]


def test_norm_times_unit_keeps_small_coordinates():
    # d ‖z‖²/dz_j = 2‖z‖·(z_j/‖z‖): z_j/‖z‖ underflows to 0 for z = [1e300, 1e-300]; 2z_j does not
    f = lossdsl.compile("loss w\n  input z[K]\n  loss = (norm[k] z[k])^2\n")["w"]
    assert "norm_times_unit" in f.rules
    _, (g,) = f.value_and_grad(np.array([[1e100, 1e-300], [0.0, 0.0]]), reduction="none")
    np.testing.assert_array_equal(g, [[2e100, 2e-300], [0.0, 0.0]])
    assert 2 * 1e100 * (1e-300 / 1e100) == 0.0


def test_softmax_numerator_keeps_the_rounding_of_its_exponent():
    # e^(z_j - m): the rounding of z_j - m (-67.4 here) alone costs |z_j - m|·ulp/2, 58 ulps of the
    # softmax; the stored numerator puts the rounding error back (TwoSum), 1 ulp
    ce = lossdsl.load("cross_entropy")
    z = np.array([[-42.21652549, 25.14186205, -3.8375203, -25.98418036]])
    _, (g,) = ce.value_and_grad(z, np.array([1]), reduction="sum")
    zs = [M.mpf(float(v)) for v in z[0]]
    want = float(M.exp(zs[0]) / sum(M.exp(v) for v in zs))
    assert close(float(g[0, 0]), want, ulps=2)
    textbook = np.exp(z[0, 0] - z.max()) / np.exp(z - z.max()).sum()
    assert not close(textbook, want, ulps=16)


def test_kl_gradient_at_the_argmax_of_a_one_hot_target():
    # Σp·softmax_j - p_j at the argmax: Σp rounds to p_j = 1 and softmax_j to 1, so the textbook
    # product gives 0; the kernel adds Σ_{k != arg} p_k and -Σp·rest/Σ instead
    from lossdsl.exact import evaluate
    f = lossdsl.load("kl_div")
    cases = [(np.array([3.65130722e-259, -1.45203076e-179, 3.27197307e+293, -1.99356968e-151]),
              np.array([2.39943132e-180, 1.64316642e-186, 1.0, 1.59541967e-019]), 2, np.float64),
             (np.array([42.64471, -34.291866, 20.58441, -40.33768]), np.array([1.0, 1e-45, 1e-45, 1e-45]), 0,
              np.float32)]
    for z, p, j, dt in cases:
        z, p = z.astype(dt), p.astype(dt)
        _, (g,) = f.value_and_grad(z[None, :], p[None, :], reduction="none")
        truth = evaluate(f.gradient("z"), {"z": z.astype(np.float64), "p": p.astype(np.float64), "K": 4},
                         np.dtype(dt).name, index={f.gradient_index("z")[0].name: j})
        assert truth != 0 and abs(float(g[0, j]) - truth) <= 4 * np.spacing(dt(abs(truth))), (g[0, j], truth)
        q = np.exp(z.astype(np.float64) - z.max()) / np.exp(z.astype(np.float64) - z.max()).sum()
        assert dt(dt(p.sum()) * dt(q[j])) - p[j] == 0


def test_max_shift_of_an_infinite_logit_is_zero():
    # z_k - logsumexp(z) with z_k = +inf: inf - inf = NaN in the textbook form; the max shift z_k - m
    # is 0 at the max itself, so the KL to softmax([1, inf, 11.8, 0]) is inf (p = 1/4 each), as in the limit
    f = lossdsl.load("kl_div")
    z = np.array([[1.0, np.inf, 11.78, 0.0]])
    p = np.full((1, 4), 0.25)
    assert f(z, p, reduction="sum") == np.inf
    g = lossdsl.load("soft_cross_entropy")
    assert g(z, np.array([[0.0, 1.0, 0.0, 0.0]]), reduction="sum") == 0.0
    with np.errstate(all="ignore"):
        assert np.isnan(np.inf - (np.inf + np.log1p(np.exp(1.0 - np.inf))))


def test_zero_weight_keeps_a_nan_input():
    # b·e^x at b = 0 is 0 for x = inf (the limit; 0·inf is NaN), but NaN for x = NaN (NaN in, NaN out)
    f = lossdsl.compile("loss w\n  input x\n  param b = 1 : nonnegative\n  loss = b * exp(x)\n")["w"]
    assert "zero_weights" in f.rules
    v, (g,) = f.value_and_grad(np.array([np.inf, np.nan, 1.0]), reduction="none", b=0.0)
    assert v[0] == 0.0 and np.isnan(v[1]) and v[2] == 0.0
    assert g[0] == 0.0 and g[2] == 0.0
    # the flag reads the inputs, not the weighted term: label_smoothing = 0 times mean(z) of a row
    # with +inf and -inf logits (inf - inf) is still 0, so cross_entropy is inf there, not NaN
    ce = lossdsl.load("cross_entropy")
    assert ce(np.array([[np.inf, -87.0, -88.0, -np.inf]]), np.array([1]), reduction="sum") == np.inf
    assert np.isnan(ce(np.array([[np.nan, -87.0, -88.0, 1.0]]), np.array([1]), reduction="sum"))


def test_a_shared_infinite_max_splits_the_softmax():
    # several +inf logits: softmax(z)_j -> 0 at every finite z_j whatever the rates (the gradient there
    # is its limit, -target_j), and the +inf ones split the mass evenly (no limit exists: the one along
    # equal rates). The textbook e^(z - max) is e^(inf - inf) = NaN, and its sum makes the row NaN.
    inf = np.inf
    z = np.array([[inf, -inf, -47.05, inf], [19.8, inf, -18.0, inf]])
    for dt in (np.float32, np.float64):
        ce = lossdsl.load("cross_entropy")
        _, (g,) = ce.value_and_grad(z.astype(dt), np.array([3, 2]), reduction="none", label_smoothing=1.0)
        assert g.tolist() == [[0.25, -0.25, -0.25, 0.25], [-0.25, 0.25, -0.25, 0.25]]
        p = np.array([[0.1465, 0.1657, 0.6878, 0.0], [0.0, 1.0, 0.0, 0.0]], dt)
        for name in ("kl_div", "soft_cross_entropy"):
            _, (g,) = lossdsl.load(name).value_and_grad(z.astype(dt), p, reduction="none")
            want = np.where(np.isinf(z) & (z > 0), 0.5, 0.0) * p.sum(axis=1, keepdims=True) - p
            assert np.allclose(g, want, rtol=4 * np.finfo(dt).eps, atol=0), (name, g, want)
    with np.errstate(all="ignore"):
        e = np.exp(z[0] - z[0].max())
        assert np.isnan(e / e.sum()).all()


def test_a_weight_meets_the_logit_shift_before_it_overflows():
    # p_k·(z_k - lse) (kl_div, soft_cross_entropy) and ε·(z_y - mean z) + (lse - z_y) (label smoothing) with
    # finite logits of both signs near the float max: z_k - max z overflows to -inf, the loss does not;
    # the emitter's wshift / addshift form those from halves (exact) where the shift overflows
    from lossdsl.audit import bits_error
    from lossdsl.exact import evaluate
    for dt in (np.float32, np.float64):
        big = np.finfo(dt).max
        z = np.array([[big, -745.13, -big, 1e-3]], dt)
        p = np.array([[0.4, 0.25, 0.35, 0.0]], dt)
        for name in ("kl_div", "soft_cross_entropy"):
            f = lossdsl.load(name)
            v = f(z, p, reduction="none")
            truth = evaluate(f.expr, {"z": z[0].astype(np.float64), "p": p[0].astype(np.float64), "K": 4}, np.dtype(dt).name)
            assert np.isfinite(truth) and bits_error(v, truth, dt)[0] <= 1, (name, dt, v[0], truth)
        ce = lossdsl.load("cross_entropy")
        z = np.array([[-1e-8, -0.9 * big, 0.8 * big, 1e-3]], dt)
        v = ce(z, np.array([1]), reduction="none", label_smoothing=1.0)
        truth = evaluate(ce.expr, {"z": z[0].astype(np.float64), "y": 1, "label_smoothing": 1.0, "K": 4}, np.dtype(dt).name)
        assert np.isfinite(truth) and bits_error(v, truth, dt)[0] <= 1, (dt, v[0], truth)
        with np.errstate(all="ignore"):
            assert z[0, 1] - z.max() == -np.inf


def test_log_softmax_split_at_an_infinite_target_logit():
    # cross_entropy = -(1 - ls)·z_y - ls·mean z + lse: at z_y = +inf (the max) the textbook sum is
    # -inf + inf = NaN; with lse - z_y formed first it is 0 (ls = 0), as in the limit
    f = lossdsl.load("cross_entropy")
    assert "log_softmax_split" in f.rules
    z = np.array([[1.0, np.inf, -3.0], [1.0, 2.0, -np.inf]])
    v = f(z, np.array([1, 1]), reduction="none")
    assert v[0] == 0.0 and close(float(v[1]), float(np.log1p(np.exp(-1.0))))
    with np.errstate(all="ignore"):
        assert np.isnan(-np.inf + (np.inf + np.log1p(0.0)))


def test_xdivy_derivative_does_not_square_the_denominator():
    # d/dz_j Σz/‖z‖ = 1/‖z‖ - (Σz)·z_j/‖z‖³: with the derivative of x/y written -x/y², ‖z‖² overflows at
    # z = [1e200, 3e200] and the second term vanishes (3.2e-201 vs 1.9e-201); -(x/y)/y keeps it
    f = lossdsl.compile("loss w\n  input z[K]\n  loss = sum[k] z[k] / norm[e] z[e]\n")["w"]
    _, (g,) = f.value_and_grad(np.array([[1e200, 3e200]]), reduction="sum")
    want = [truth(lambda a, b: 1 / M.sqrt(a * a + b * b) - (a + b) * c / M.sqrt(a * a + b * b) ** 3, 1e200, 3e200)
            for c in (M.mpf(1e200), M.mpf(3e200))]
    assert close(float(g[0, 0]), want[0], ulps=16) and close(float(g[0, 1]), want[1], ulps=16)
    with np.errstate(all="ignore"):
        a, b = np.float64(1e200), np.float64(3e200)
        assert (a + b) / (a * a + b * b) == 0.0


def test_norm_difference_with_a_shared_infinite_coordinate():
    # ‖z1 - z2‖ where z1_0 = z2_0 = -inf and z1_1 = -inf alone: the distance is inf (the second
    # coordinate), not NaN (inf - inf in the first), so the contrastive loss of a dissimilar pair is 0
    f = lossdsl.load("contrastive")
    assert "norm_difference" in f.rules
    z1 = np.array([[-np.inf, -np.inf, 1.0]])
    z2 = np.array([[-np.inf, 2.0, 3.0]])
    v, (g1, g2) = f.value_and_grad(z1, z2, np.array([0.0]), reduction="none")
    assert v[0] == 0.0 and np.all(g1 == 0.0) and np.all(g2 == 0.0)
    with np.errstate(all="ignore"):
        assert np.isnan(np.sqrt(np.sum((z1 - z2) ** 2)))


def test_log_softmax_split_takes_the_limit_of_label_smoothing():
    # ε·(z_y - mean z) + (lse - z_y) with a +inf logit k ≠ y: -inf + inf = NaN in the textbook sum; the
    # lse grows like the max and ε·mean like ε/K of it, so the loss is inf. At z_y = ±inf = mean, z_y wins.
    f = lossdsl.load("cross_entropy")
    z = np.array([[1.0, np.inf, -3.0], [np.inf, 1.0, 2.0], [-np.inf, 1.0, 2.0], [1.0, 2.0, 3.0]], np.float32)
    v = f(z, np.array([0, 0, 0, 0]), reduction="none", label_smoothing=0.1)
    zs = [M.mpf(float(c)) for c in z[3]]
    lse = M.log(sum(M.exp(c) for c in zs))
    want = float(0.9 * (lse - zs[0]) + 0.1 * (lse - sum(zs) / 3))
    assert list(v[:3]) == [np.inf] * 3 and abs(float(v[3]) - want) <= 2 * np.spacing(np.float32(want))
    with np.errstate(all="ignore"):
        ls = np.float32(0.1)
        assert np.isnan(ls * z[0, 0] - ls * z[0].mean() + (np.inf + np.log1p(np.float32(0))))


def test_rescue_overflow_keeps_the_sign_of_a_difference_of_squared_distances():
    # ‖a - p‖² - ‖a - n‖² summed per coordinate (merge_sums, difference_of_squares -> sqdist_diff): at
    # a = [1e200, 0], p = [-1e200, 0], n = [0, 3e200] the terms are 3e400 and -9e400, inf - inf = NaN in
    # floats; the copy from points scaled by 2^-700 sums to the truth's sign (value 0, no gradient)
    from lossdsl.exact import evaluate
    f = lossdsl.load("triplet")
    assert {"rescue_overflow", "difference_of_squares"} <= set(f.rules)
    inf = np.inf
    rows = [([1e200, 0.0], [-1e200, 0.0], [0.0, 3e200]),         # overflowing terms of opposite signs
            ([inf, 1.0], [inf, 2.0], [4.0, 1.0]),                # a shared infinity: its coordinate is 0
            ([-inf, 1.0], [3.0, 1.0], [5.0, 1.0]),               # a infinite alone: (n - p)·2a = -inf
            ([-inf, -inf, -inf, 5.0], [709.0, 0.0, 0.0, -426.0], [483.0, -inf, -inf, -inf]),  # 2Z² - Z²: inf
            ([3.0, 1e-300], [1.0, 0.0], [2.0, 1e-300]),         # no overflow: the plain sum
            ([1.7e308, 1.0], [-1.7e308, 2.0], [np.inf, 1.0])]   # a - p overflows, n infinite alone: -inf
    for a, p, n in rows:
        a, p, n = (np.array([v]) for v in (a, p, n))
        v, grads = f.value_and_grad(a, p, n, reduction="none")
        vals = {"a": a[0], "p": p[0], "n": n[0], "margin": 1.0, "D": a.shape[1]}
        assert v[0] == evaluate(f.expr, vals), (a, p, n, v[0])
        for name, g in zip(("a", "p", "n"), grads):
            for j in range(a.shape[1]):
                want = evaluate(f.gradient(name), vals, index={f.gradient_index(name)[0].name: j})
                assert want is None or g[0, j] == want, (name, j, a, p, n, g[0, j], want)
    with np.errstate(all="ignore"):
        a, p, n = (np.array(r) for r in rows[0])
        assert np.isnan(np.sum((a - p) ** 2) - np.sum((a - n) ** 2))
        assert np.isnan(np.sum((n - p) * (2 * a - n - p)))


def test_tangent_projection_keeps_the_gradient_at_the_largest_coordinate():
    # d(c·u)/dz for u = z/‖z‖ is (c - (c·u)·u)/‖z‖; at the largest coordinate of z = [1e11, 1e-3, 0] with
    # c = [1, 0, 0] that is (1 - u_0²)/‖z‖ = u_1²/‖z‖ = 1e-39, where 1 - u_0² rounds to 0
    f = lossdsl.compile("loss w\n  batch N\n  input z[N, D]\n  target c[N, D]\n"
                        "  u[i, d] = z[i, d] / norm[e] z[i, e]\n  loss = sum[i] sum[d] c[i, d] * u[i, d]\n")["w"]
    assert "tangent_projection" in f.rules
    z = np.array([[1e11, 1e-3, 0.0], [0.0, 0.0, 0.0], [3.0, -4.0, 1.0]])
    c = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 2.0, -3.0]])
    _, (g,) = f.value_and_grad(z, c)
    for i in (0, 2):
        zs, cs = [M.mpf(float(v)) for v in z[i]], [M.mpf(float(v)) for v in c[i]]
        nz = M.sqrt(sum(v * v for v in zs))
        cu = sum(a * b / nz for a, b in zip(cs, zs))
        for j in range(3):
            want = float((cs[j] - cu * zs[j] / nz) / nz)
            assert close(float(g[i, j]), want, ulps=8), (i, j, g[i, j], want)
    assert np.all(g[1] == 0.0)                 # a zero row: u = 0, and its gradient 0 by convention
    u = z[0] / np.linalg.norm(z[0])
    assert (c[0, 0] - (c[0] @ u) * u[0]) / np.linalg.norm(z[0]) == 0.0


def test_unit_vector_takes_the_limit_at_infinite_coordinates():
    # z/‖z‖ at z = [inf, 1, -inf, 2] is inf/inf = NaN in floats; the limit (the infinite coordinates
    # growing alike) is [1, 0, -1, 0]/sqrt(2). The gradient there is 0 (the projection over ‖z‖ = inf);
    # the finite row keeps z/‖z‖ and its gradient (c - (c·u)·u)/‖z‖.
    f = lossdsl.compile("loss w\n  batch N\n  input z[N, D]\n  target c[N, D]\n"
                        "  u[i, d] = z[i, d] / norm[e] z[i, e]\n  loss = sum[i] sum[d] c[i, d] * u[i, d]\n")["w"]
    assert "unit_vector" in f.rules
    inf = np.inf
    c = np.array([[1.0, 5.0, -2.0, 3.0], [1.0, 2.0, 0.0, -1.0]])
    for dtype in (np.float64, np.float32):
        z = np.array([[inf, 1.0, -inf, 2.0], [3.0, -4.0, 1.0, 0.5]], dtype)
        v, (g,) = f.value_and_grad(z, c.astype(dtype), reduction="none")
        zs = [M.mpf(float(a)) for a in z[1]]
        nz = M.sqrt(sum(a * a for a in zs))
        cu = sum(a * b / nz for a, b in zip(c[1], zs))
        want = float(3 / M.sqrt(2) + cu)                 # a batch loss: one value, the sum over the rows
        assert abs(float(np.ravel(v)[0]) - want) <= 4 * abs(float(np.spacing(dtype(want))))
        assert np.all(g[0] == 0.0)
        for j in range(4):
            want = float((c[1, j] - cu * zs[j] / nz) / nz)
            assert abs(float(g[1, j]) - want) <= 8 * abs(float(np.spacing(dtype(want)))), (dtype, j, g[1, j], want)
    with np.errstate(invalid="ignore"):
        z = np.array([inf, 1.0, -inf, 2.0])
        assert np.isnan(z / np.sqrt(np.sum(z * z))).any()
    # huge and subnormal rows: u = (z/m)/‖z/m‖, m = max |z_k|, where ‖z‖ overflows (u = 0 for [fmax, fmax])
    # or rounds to a subnormal (a few bits left)
    for dtype in (np.float64, np.float32):
        big, sub = np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal
        z = np.array([[big, -big, 1.0, 0.0], [3 * sub, 5 * sub, 0.0, 7 * sub]], dtype)
        v, (g,) = f.value_and_grad(z, c[:, :4].astype(dtype), reduction="none")
        want = 0.0
        for i in range(2):
            zs = [M.mpf(float(a)) for a in z[i]]
            want += float(sum(a * b for a, b in zip(c[i], zs)) / M.sqrt(sum(a * a for a in zs)))
        assert abs(float(np.ravel(v)[0]) - want) <= 4 * abs(float(np.spacing(dtype(want)))), (dtype, v, want)
        with np.errstate(all="ignore"):
            assert np.all(z[0] / np.sqrt(np.sum(z[0] * z[0])) == 0)


def test_weight_into_sum_keeps_the_kl_term_of_a_beta_vae_finite():
    # -β/2·Σ_l (1 + logvar - μ² - e^logvar) at logvar = 709.79: the sum is -inf (e^709.79 overflows) where
    # β/2·e^709.79 = 9.05e307 is not. With β on each term, the logvar gradient -β/2 + β/2·e^x is xexpm1
    # again (xexp_minus_weight: 0 vs 5e-21 at x = 1e-20), and β = 0 at μ = -inf is 0, not 0·inf
    f = lossdsl.load("vae_elbo")
    assert {"weight_into_sum", "xexp_minus_weight"} <= set(f.rules)
    xhat, x = np.array([[0.5, -1.0]]), np.array([[1.0, 0.0]])
    mu, logvar = np.array([[0.5, -2.0]]), np.array([[709.79, 1e-20]])
    v, (_, gm, gl) = f.value_and_grad(xhat, mu, logvar, x, reduction="none")
    lv, m = [M.mpf(float(a)) for a in logvar[0]], [M.mpf(float(a)) for a in mu[0]]
    want = M.log1p(M.exp(-0.5)) + M.log1p(M.exp(-1)) - sum(1 + a - b * b - M.exp(a) for a, b in zip(lv, m)) / 2
    assert close(float(v[0]), float(want))
    assert close(float(gl[0, 0]), float(M.expm1(lv[0]) / 2)) and close(float(gl[0, 1]), float(M.expm1(lv[1]) / 2))
    with np.errstate(over="ignore"):
        assert -0.5 * np.sum(1 + logvar - mu ** 2 - np.exp(logvar)) == np.inf
    assert -0.5 + 0.5 * np.exp(1e-20) == 0.0
    v, (_, gm, gl) = f.value_and_grad(xhat, np.array([[-np.inf, 1.0]]), logvar, x, reduction="none", beta=0.0)
    assert close(float(v[0]), float(M.log1p(M.exp(-0.5)) + M.log1p(M.exp(-1)))) and np.all(gm == 0) and np.all(gl == 0)


_COSINE = ("loss w\n  batch N\n  input z[N, D]\n  target c[N, N]\n  u[i, d] = z[i, d] / norm[e] z[i, e]\n"
           "  s[i, j] = sum[d] u[i, d] * u[j, d]\n  loss = sum[i] sum[j] c[i, j] * s[i, j]\n")


def _cosine_grad(z, c, i, k):
    """d/dz_ik of Σ_ij c_ij·u_i·u_j in mpmath: (x_k - (x·u_i)·u_ik)/‖z_i‖, x = Σ_j (c_ij + c_ji)·u_j."""
    rows = [[M.mpf(float(v)) for v in r] for r in z]
    us = [[v / M.sqrt(sum(a * a for a in r)) for v in r] for r in rows]
    x = [sum((M.mpf(float(c[i, j])) + M.mpf(float(c[j, i]))) * us[j][d] for j in range(len(z)))
         for d in range(len(z[0]))]
    xu = sum(a * b for a, b in zip(x, us[i]))
    return float((x[k] - xu * us[i][k]) / M.sqrt(sum(a * a for a in rows[i])))


def test_unit_adjoint_drops_the_direction_the_projection_removes():
    # s_ii = u_i·u_i is 1 whatever z_i: its weight c_ii adds c_ii·u_i to the adjoint of u, which the
    # projection (x - (x·u)u)/‖z‖ removes only to c_ii·ε (x·u rounds); with c_ii = 1e12 next to an O(1)
    # gradient that is 1e-4 relative. The adjoint skips k = i in Σ_k c_ik·u_k instead.
    f = lossdsl.compile(_COSINE)["w"]
    assert "unit_adjoint" in f.rules
    z = np.array([[3.0, -1.0, 2.0], [0.5, 4.0, -1.5], [-2.0, 1.0, 1.0]])
    c = np.array([[1e12, 1.0, -2.0], [0.5, 1e12, 1.0], [1.0, 3.0, 1e12]])
    _, (g,) = f.value_and_grad(z, c)
    worst_naive = 0.0
    for i in range(3):
        u = z / np.linalg.norm(z, axis=1, keepdims=True)
        x = (c[i] + c[:, i]) @ u
        naive_row = (x - (x @ u[i]) * u[i]) / np.linalg.norm(z[i])
        for k in range(3):
            want = _cosine_grad(z, c, i, k)
            assert close(float(g[i, k]), want, ulps=8), (i, k, g[i, k], want)
            worst_naive = max(worst_naive, abs(naive_row[k] - want) / abs(want))
    assert worst_naive > 1e-6


def test_tangent_projection_divides_by_the_scaled_norm():
    # ‖z‖ of z = [fmax, fmax, 1] overflows: (x - (x·u)u)/‖z‖ is x/inf = 0 where the truth is 1e-299;
    # the projection is divided as (·/m)/‖z/m‖, m = max |z_k| (the unit vector's own scaling)
    f = lossdsl.compile(_COSINE)["w"]
    big = np.finfo(np.float64).max
    z = np.array([[big, big, 1.0], [1.0, -2.0, 0.5]])
    c = np.array([[0.0, 1e10], [3e10, 0.0]])
    _, (g,) = f.value_and_grad(z, c)
    for k in range(3):
        want = _cosine_grad(z, c, 0, k)
        assert want != 0 and close(float(g[0, k]), want, ulps=8), (k, g[0, k], want)
    with np.errstate(over="ignore"):
        assert np.linalg.norm(z[0]) == np.inf          # the textbook division gives 0


def test_softmax_minus_onehot_of_a_confident_masked_row():
    # d/dx_ml of Σ_i (lse_{j≠i} x_ij - x_i,pos(i)) is w_ml - [l = pos(m)]; at the positive of a confident row,
    # w - 1 is 0 in floats (the logsumexp rounds to x_m,pos) where the truth is -Σ_{j≠m,pos} w_mj = -2e-304
    f = lossdsl.compile("loss w\n  batch N\n  input x[N, N]\n  target pos[N] : class(N)\n"
                        "  loss = sum[i] (logsumexp[j != i] x[i, j] - x[i, pos[i]])\n")["w"]
    assert "softmax_minus_onehot" in f.rules
    x = np.array([[5.0, 0.0, -700.0, -700.0], [1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 7.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    pos = np.array([1, 0, 2, 3])                       # rows 2 and 3 their own positive: w is 0 there
    _, (g,) = f.value_and_grad(x, pos)
    for m in range(4):
        row = [M.mpf(float(v)) for v in x[m]]
        z = M.fsum(M.exp(v) for j, v in enumerate(row) if j != m)
        for j in range(4):
            want = (M.exp(row[j]) / z if j != m else 0) - (1 if j == pos[m] else 0)
            if j == pos[m] and j != m:             # 1 - w in mpmath cancels too: the other weights
                want = -M.fsum(M.exp(v) for k, v in enumerate(row) if k not in (m, j)) / z
            assert close(float(g[m, j]), float(want)), (m, j, g[m, j], want)
    with np.errstate(under="ignore"):
        lse = np.logaddexp.reduce(x[0, 1:])
        assert np.exp(x[0, 1] - lse) - 1 == 0.0        # the textbook form
