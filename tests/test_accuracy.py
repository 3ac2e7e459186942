"""Accuracy of every library loss against exact arithmetic (lossdsl.audit, the Herbie measure).

For each loss, float64 and float32, ``POINTS`` points from each sampler (bit patterns, realistic
values, adversarial points; fixed seed): no non-finite result where the truth is finite, and for
the value and each gradient, per sampler, mean error <= 1 bit and 99th percentile <= 3 bits
(3 + log2(K) for losses that reduce over K terms).

Excluded entries: the inherent cancellations of lossdsl/inherent.py (its docstring), counted in
the report; ``lossdsl check`` applies the same filter and bounds.

Where a loss misses the bounds today, its case is marked xfail(strict=True) with the measured
figure and the reason (see KNOWN); a fix turns it into an XPASS failure, so the mark is removed.
"""
import warnings

import numpy as np
import pytest

import lossdsl
from lossdsl.audit import audit
from lossdsl.inherent import exclusion, violations

SEED = 20240604
POINTS_SCALAR = 150
POINTS_VECTOR = 60
POINTS_BATCH = 4          # batch losses: each point is a batch of SIZE rows, and the truth of each gradient
                          # entry expands the batch's locals (ntxent: 3 s per dtype at 4 points)
SIZE = 4

# (name, dtype) -> the measured figures and why; every entry is a compiler limitation reported to
# the owner (see the accuracy report), not a property of the data.
KNOWN = {
    ("ntxent", "float64"): "measured (4 batches of 4 rows): z mean 1.87 p99 31 bits (bit patterns), mean 1.36 p99 3.7 "
                           "(values); the value within bounds. Not a missing rewrite (unit_adjoint and "
                           "softmax_minus_onehot fixed the cancellations a rewrite can: 15 and 62 bits): the z gradient "
                           "is ill-conditioned in the locals u = z/‖z‖ and s = u·u/τ that any working-precision formula "
                           "rounds. Its κ w.r.t. u and s (1200-bit mpmath) is > 4 for 58-69% of the realistic entries, "
                           "too many to call an exclusion, and with those left out the kernel is still at 1.05 bits: "
                           "rounding the norm q = ‖z/m‖ costs 0.27. The 34-bit worst case (bit patterns) is the adjoint "
                           "Σ_k d_s[i, k]·u[k, d] where two similarities differ by 7e-11 and their u[k, d] are 1 and -1: "
                           "their softmax entries, rounded to float64, keep 20 bits of that difference. Needs u, s, "
                           "the softmax and q in double-float. Conditioning w.r.t. the inputs themselves (κ_z, from "
                           "relative steps of 2^-150 in 600-bit mpmath): κ_z > 4 for 58-62% of the realistic entries "
                           "(their errors are the data's own, as soft labels' are); with those left out, values and "
                           "adversarial are within the bounds (mean 0.91 and 0.57 bits, p99 2.0 and 1.8), bit patterns "
                           "are not (mean 2.1, p99 31): that near tie has κ_z = 3",
    ("ntxent", "float32"): "measured (4 batches): z mean 1.43 p99 5.6 (values), 1.02 p99 4.4 (adversarial), the rest "
                           "within bounds; the conditioning of float64 (above), in float32 arithmetic. The float64 kernel "
                           "on the same float32 inputs, rounded to float32, is within bounds (z mean 0.12, max 1 bit): "
                           "a float64 similarity stage meets them, at the cost of a float64 gemm (float32 ntxent would "
                           "go from 4.0 ms to about 7, torch.compile's 7.3: below the 1.5x speed target of issue 9; "
                           "measured 2026-12-01: the float64 kernel takes 6.8 ms, torch's float32 5.7). With the "
                           "entries of κ_z > 4 left out (float64's entry) all within at these 4 points, not at 20 "
                           "(value on bit patterns p99 7 bits)",
}


def _cases():
    for name in lossdsl.names():
        for dtype in ("float64", "float32"):
            marks = []
            if (name, dtype) in KNOWN:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[(name, dtype)]))
            yield pytest.param(name, dtype, marks=marks, id=f"{name}-{dtype}")


@pytest.mark.parametrize("name,dtype", list(_cases()))
def test_library_accuracy(name, dtype):
    loss = lossdsl.load(name)
    vector = any(loss.shapes[n] for n in loss.inputs + loss.targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        points = POINTS_BATCH if loss._c.definition.batch else POINTS_VECTOR if vector else POINTS_SCALAR
        rep = audit(loss, dtype, points=points, seed=SEED, naive=False, size=SIZE, exclude=exclusion(loss))
    bad = violations(rep, loss)
    assert not bad, f"{name} {dtype}:\n  " + "\n  ".join(bad)


# --- the anchors of DESIGN_NOTES.md: where torch/optax/Keras fail, lossdsl is within the bound ------
from lossdsl.audit import bits_error  # noqa: E402
from lossdsl.exact import evaluate  # noqa: E402

try:
    import torch
except ImportError:      # pragma: no cover - torch is optional
    torch = None


def _bits(got, truth, dtype):
    return float(bits_error(np.asarray(got, dtype=dtype), truth, dtype))


def test_anchor_torch_bce_float32_cancels_at_minus_20():
    f = lossdsl.load("bce")
    z, y = np.float32(-20.0), np.float32(0.0)
    truth = evaluate(f.expr, {"z": float(z), "y": 0.0, "pos_weight": 1.0}, "float32")
    assert abs(truth - 2.06e-9) < 1e-11
    v, _ = f.value_and_grad(np.array([z]), np.array([y]), reduction="none")
    assert _bits(v[0], truth, np.float32) <= 1
    # PyTorch's formula (1-y)x - (1+(pw-1)y)·logσ(x) with logσ(x) = min(x,0) - log1p(e^-|x|): 0 here
    x = np.float32(-20.0)
    logsig = np.minimum(x, np.float32(0)) - np.log1p(np.exp(-np.abs(x)))
    anchor = (1 - y) * x - logsig
    assert anchor == 0.0 and _bits(anchor, truth, np.float32) > 29          # 30 bits lost
    if torch is not None:
        t = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([-20.0]), torch.tensor([0.0]))
        assert float(t) == 0.0                                               # torch 2.x: all bits lost


def test_anchor_logcosh_optax_keras_lose_relative_accuracy_float32():
    f = lossdsl.load("log_cosh")
    for e, worst in ((1e-4, 1.0), (1e-3, 0.04)):
        r = np.float32(e)
        truth = evaluate(f.expr, {"yhat": float(r), "y": 0.0}, "float32")
        v, (g,) = f.value_and_grad(np.array([r]), np.array([np.float32(0)]), reduction="none")
        assert _bits(v[0], truth, np.float32) <= 3           # measured: 0 bits at 1e-4, 1.58 at 1e-3
        with np.errstate(all="ignore"):
            optax = np.logaddexp(r, -r) - np.float32(np.log(2))
            keras = r + np.logaddexp(np.float32(0), -2 * r) - np.float32(np.log(2))
        for anchor in (optax, keras):
            rel = abs(float(anchor) - truth) / truth
            assert rel >= worst * 0.5, (e, anchor, truth)    # 100% wrong at 1e-4, ~5% at 1e-3


def test_anchor_focal_gamma_below_one_gradient_is_finite():
    f = lossdsl.load("focal")
    z = np.array([-30.0, 30.0, 40.0, -40.0, 100.0], dtype=np.float32)
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0], dtype=np.float32)
    for gamma in (0.0, 0.5):
        _, (g,) = f.value_and_grad(z, y, reduction="none", gamma=gamma)
        assert np.all(np.isfinite(g))
        for i in range(len(z)):
            truth = evaluate(f.gradient("z"), {"z": float(z[i]), "y": float(y[i]), "gamma": gamma, "alpha": 0.25},
                             "float32")
            assert _bits(g[i], truth, np.float32) <= 3, (gamma, z[i], g[i], truth)
        # the textbook formula (the naive lowering, as autograd of torchvision's code computes it): NaN
        _, (gn,) = f.naive().value_and_grad(z, y, reduction="none", gamma=gamma)
        assert np.isnan(gn).any()
    if torch is not None:
        zt = torch.tensor([40.0], requires_grad=True)
        p = torch.sigmoid(zt)
        ce = torch.nn.functional.binary_cross_entropy_with_logits(zt, torch.tensor([1.0]), reduction="none")
        loss = (0.25 * ce * (1 - p) ** 0.5).sum()       # torchvision.ops.sigmoid_focal_loss, y = 1, γ = 0.5
        loss.backward()
        assert torch.isnan(zt.grad).any()


def test_anchor_kl_zero_targets():
    f = lossdsl.load("kl_div")
    z = np.array([[1.0, -2.0, 0.5, 3.0]])
    p = np.array([[0.0, 0.5, 0.0, 0.5]])
    v, (g,) = f.value_and_grad(z, p, reduction="none")
    vals = {"z": z[0], "p": p[0], "K": 4}
    assert _bits(v[0], evaluate(f.expr, vals), np.float64) <= 1
    for j in range(4):
        truth = evaluate(f.gradient("z"), vals, index={f.gradient_index("z")[0].name: j})
        assert np.isfinite(g[0, j]) and _bits(g[0, j], truth, np.float64) <= 1
    if torch is not None:
        # optax.kl_divergence's where(t == 0, 0, log t): the gradient through the masked log is NaN
        t = torch.tensor(p[0], requires_grad=True)
        logq = torch.log_softmax(torch.tensor(z[0]), 0)
        loss = (t * (torch.where(t == 0, torch.zeros_like(t), torch.log(t)) - logq)).sum()
        loss.backward()
        assert torch.isnan(t.grad).any()


def test_check_command_prints_the_audit(capsys):
    from lossdsl.cli import main
    assert main(["check", "hinge", "--points", "20", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "hinge (float32" in out and "naive" in out and "mean" in out and "p99 <= 3 bits" in out
    assert out.rstrip().endswith("within")


def test_check_command_leaves_out_inherent_cancellation_and_says_what_is_over(capsys):
    from lossdsl.cli import main
    # bce at soft labels next to σ(z): the entries are left out and counted, the rest within
    assert main(["check", "bce", "--points", "60", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    left_out = int(out.split("entries left out")[0].rsplit("(", 1)[1])
    assert left_out > 0 and out.rstrip().endswith("within")
    # ntxent's expected failure (KNOWN) is over the bounds: exit status 1, the outputs named
    assert main(["check", "ntxent", "--points", "4", "--seed", str(SEED), "--dtype", "float64"]) == 1
    out = capsys.readouterr().out
    assert "OVER" in out and "z/bits: mean" in out and "entries left out" not in out


def test_only_the_library_losses_own_an_exclusion():
    assert exclusion(lossdsl.load("bce")) is not None and exclusion(lossdsl.load("hinge")) is None
    mine = lossdsl.compile("loss bce\n  input z\n  target y : unit\n  loss = (z - y)^2\n")["bce"]
    assert exclusion(mine) is None
