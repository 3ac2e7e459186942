"""Losses that are not in the library, written as text: the language, not a list, is what works."""
import numpy as np
import pytest

import lossdsl
from references import central_fd

QUANTILE = """
# Pinball (quantile) loss: asymmetric absolute error, q in (0, 1).
loss quantile "Quantile regression loss"
  input  yhat
  target y
  param  q = 0.9 : unit
  r = y - yhat
  loss = max(q * r, (q - 1) * r)
"""


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_quantile_loss_matches_numpy(dtype):
    f = lossdsl.compile(QUANTILE)["quantile"]
    rng = np.random.default_rng(1)
    yhat, y = rng.normal(size=(4, 3)).astype(dtype), rng.normal(size=(4, 3)).astype(dtype)
    r = y.astype(np.float64) - yhat
    want = np.maximum(0.7 * r, (0.7 - 1) * r)
    v, (g,) = f.value_and_grad(yhat, y, reduction="none", q=0.7)
    assert v.dtype == dtype and g.dtype == dtype and g.shape == yhat.shape
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(v, want, rtol=tol, atol=tol)
    np.testing.assert_allclose(g, np.where(r > 0, -0.7, 0.3), rtol=tol)


def test_quantile_gradient_matches_finite_differences():
    f = lossdsl.compile(QUANTILE)["quantile"]
    rng = np.random.default_rng(2)
    yhat, y = rng.normal(size=7), rng.normal(size=7)
    _, (g,) = f.value_and_grad(yhat, y, reduction="sum")
    fd = central_fd(lambda a: float(f(a, y, reduction="sum")), yhat)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_user_loss_calls_a_library_loss_with_keyword_params():
    text = """
loss weighted_focal_bce
  input  z
  target y : unit
  param  mix = 0.5 : unit
  loss = mix * focal(z, y, gamma=1) + (1 - mix) * bce(z, y)
"""
    f = lossdsl.compile(text)["weighted_focal_bce"]
    z, y = np.array([-2.0, 0.5, 3.0]), np.array([1.0, 0.0, 1.0])
    focal, bce = lossdsl.load("focal"), lossdsl.load("bce")
    want = 0.5 * focal(z, y, reduction="none", gamma=1) + 0.5 * bce(z, y, reduction="none")
    np.testing.assert_allclose(f(z, y, reduction="none"), want, rtol=1e-14)
    _, (g,) = f.value_and_grad(z, y, reduction="sum")
    fd = central_fd(lambda a: float(f(a, y, reduction="sum")), z)
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_gradient_is_readable():
    ce = lossdsl.load("cross_entropy")
    text = lossdsl.printing.to_text(ce.gradient("z"))
    assert "logsumexp[k](z[k])" in text and "KroneckerDelta" not in text and "exp(z[j]" in text
