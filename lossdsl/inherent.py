"""The accuracy bounds of the library losses and the cancellation inherent in their data.

A library loss is within the bounds when, for the value and each gradient, per sampler of
``audit``: no non-finite result where the truth is finite, mean error <= 1 bit and 99th
percentile <= 3 bits (3 + log2(K) for losses that reduce over K terms). ``tests/test_accuracy.py``
holds every library loss to them and ``lossdsl check`` reports against them.

Excluded entries (only these, and counted): cancellation that is inherent in the
data, where a soft target t sits next to the prediction q and the output is q - t or a sum of
such terms. Rounding q to the dtype alone already costs log2(κ) bits there, κ = (|q| + |t|)/|q - t|,
whatever the formula; entries with κ > 4 are left out:
  * gradients of bce, multilabel_bce, focal and vae_elbo (xhat) with a soft label 0 < y < 1 near σ(z)
    (with a pos_weight pw: σ(z)·(1 + (pw - 1)·y) near pw·y);
  * gradients of cross_entropy with label smoothing (soft targets), kl_div and soft_cross_entropy
    (soft p_j) where softmax(z)_j sits next to the target;
  * the value of kl_div with a soft (not one-hot) p near softmax(z): KL(p‖q) for q ≈ p is the
    difference of Σ p log p and Σ p log q;
  * the logvar gradient of gaussian_nll, ½(1 - q) with q = (y - μ)²·e^(-logvar) next to 1 (the
    predicted variance next to the squared residual).
Hard targets (y in {0, 1}, one-hot classes) are never excluded: there a stable form exists.

Each filter reads the point with numpy formulas of its own (σ, softmax), not the kernels.
"""
import math

import numpy as np

from .api import load, names

MEAN_BITS, P99_BITS = 1.0, 3.0

# library loss -> (input, label) of its σ(z) against y
SIGMOID_LOSSES = {"bce": ("z", "y"), "focal": ("z", "y"), "multilabel_bce": ("z", "y"), "vae_elbo": ("xhat", "x")}
SOFTMAX_LOSSES = {"cross_entropy", "kl_div", "soft_cross_entropy"}


def _sigmoid(z):
    z = np.asarray(z, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        return None
    e = np.exp(z - z.max())
    return e / e.sum()


def _kappa(q, t):
    d = abs(q - t)
    return math.inf if d == 0 else (abs(q) + abs(t)) / d


def exclusion(loss):
    """The inherent-cancellation filter of a library loss (module docstring) for ``audit``'s
    ``exclude``, or None (any other loss: a user's own, even under a library name)."""
    name = loss.name
    if name not in names() or loss is not load(name):
        return None
    if name in SIGMOID_LOSSES:
        zin, ylab = SIGMOID_LOSSES[name]

        def exclude(output, values, ix, truth):
            if output != zin:
                return False
            z, y = np.asarray(values[zin]), np.asarray(values[ylab])
            if ix:
                z, y = z[ix], y[ix]
            y, pw = float(y), float(values.get("pos_weight", 1.0))
            # the gradient σ(z)·(1 + (pw - 1)·y) - pw·y: prediction against target, both weighted
            return 0 < y < 1 and np.isfinite(z) and _kappa(float(_sigmoid(z)) * (1 + (pw - 1) * y), pw * y) > 4
        return exclude
    if name == "gaussian_nll":
        def exclude(output, values, ix, truth):
            if output != "logvar":
                return False
            with np.errstate(all="ignore"):
                r = np.float64(values["y"]) - np.float64(values["mu"])
                q = float((r * np.exp(-np.float64(values["logvar"]) / 2)) ** 2)
            return math.isfinite(q) and _kappa(q, 1.0) > 4
        return exclude
    if name in SOFTMAX_LOSSES:
        def exclude(output, values, ix, truth):
            q = _softmax(values["z"])
            if q is None:
                return False
            k = len(q)
            if name == "cross_entropy":
                ls = values["label_smoothing"]
                t = (1 - ls) * (np.arange(k) == int(values["y"])) + ls / k
            else:
                t = np.asarray(values["p"], dtype=np.float64)
            if output == "z":
                j = ix[0]
                if name != "cross_entropy":
                    q = q * t.sum()
                return 0 < t[j] < 1 and _kappa(q[j], t[j]) > 4
            if output == "value" and name == "kl_div":
                if np.count_nonzero(t) <= 1:
                    return False
                with np.errstate(divide="ignore", invalid="ignore"):
                    lt = np.where(t > 0, np.log(np.where(t > 0, t, 1)), 0.0)
                    lq = np.log(q)
                kl = float(np.sum(t * (lt - lq)))
                size = float(np.sum(t * (np.abs(lt) + np.abs(lq))))
                return kl == 0 or size / abs(kl) > 4
            return False
        return exclude
    return None


def bounds(rep, loss):
    """(mean, p99) bounds in bits for an audit report: 3 + log2(K) at p99 for losses reducing over K terms."""
    reduces = any(loss.shapes[n] for n in loss.inputs + loss.targets)
    k = max(rep.sizes.values()) if reduces and rep.sizes else 1
    return MEAN_BITS, P99_BITS + math.log2(k)


def violations(rep, loss, worst=True):
    """The report's outputs over the bounds, one line each (empty: within), with the worst input."""
    mean_b, p99_b = bounds(rep, loss)
    out = []
    for sampler, per in rep.by_sampler.items():
        for o, s in per.items():
            if s.nonfinite:
                out.append(f"{o}/{sampler}: {s.nonfinite} non-finite where the truth is finite")
            if s.mean > mean_b or s.p99 > p99_b:
                out.append(f"{o}/{sampler}: mean {s.mean:.2f} p99 {s.p99:.2f} bits (bounds {mean_b:g}, {p99_b:g})"
                           + (f"; worst {s.worst}" if worst else ""))
    return out
