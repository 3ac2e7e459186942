"""Independent references for the library's losses (LANGUAGE.md §3).

Nothing here imports lossdsl. Three kinds of reference live in this file:

* ``numpy_reference``: every library loss written out in float64 numpy, with its
  gradient derived by hand. The literal transcriptions of the external formulas
  (torchvision's ``sigmoid_focal_loss``, optax's ``hinge_loss`` and ``log_cosh``)
  are kept next to the accurate forms so that the two can be compared.
* ``torch_reference``: the same losses through ``torch.nn.functional`` in float64,
  gradients by torch autograd. Only for the losses the spec checks against torch;
  the torch import happens lazily (``require_torch``) so that a missing torch skips
  only the tests that need it, with a reason, and never the whole module.
* ``mp_*``: a few losses in mpmath at 60 digits, the truth for the extreme inputs.

Both references apply the API's reduction semantics (``reduce_reference``): the
per-sample loss l_n (an element for scalar losses, a row for vector losses) is
weighted by w_n; "none" returns w_n*l_n (0 for ignored rows), "sum" Σ w_n l_n,
"mean" Σ w_n l_n / M with M the number of samples minus the ignored rows. The
gradient is the gradient of the reduced value ("none": of the sum).

``central_fd`` is a central finite-difference gradient of any scalar function of
an array.
"""
from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------
# The library's signatures (LANGUAGE.md §3): inputs, targets, params with defaults,
# and whether a per-sample loss is an element ("scalar") or a row ("vector").
# --------------------------------------------------------------------------------------

SIGNATURES = {
    "bce": (("z",), ("y",), {"pos_weight": 1.0}, "scalar"),
    "multilabel_bce": (("z",), ("y",), {"pos_weight": 1.0}, "vector"),
    "cross_entropy": (("z",), ("y",), {"label_smoothing": 0.0}, "vector"),
    "soft_cross_entropy": (("z",), ("p",), {}, "vector"),
    "focal": (("z",), ("y",), {"gamma": 2.0, "alpha": 0.25}, "scalar"),
    "hinge": (("f",), ("y",), {}, "scalar"),
    "multiclass_hinge": (("z",), ("y",), {"margin": 1.0}, "vector"),
    "mse": (("yhat",), ("y",), {}, "scalar"),
    "mae": (("yhat",), ("y",), {}, "scalar"),
    "huber": (("yhat",), ("y",), {"delta": 1.0}, "scalar"),
    "smooth_l1": (("yhat",), ("y",), {"beta": 1.0}, "scalar"),
    "log_cosh": (("yhat",), ("y",), {}, "scalar"),
    "kl_div": (("z",), ("p",), {}, "vector"),
    "gaussian_nll": (("mu", "logvar"), ("y",), {}, "scalar"),
    "l2_penalty": (("w",), (), {}, "scalar"),
}

#: losses with a class target (ignore_index applies)
CLASS_TARGET = {"cross_entropy", "multiclass_hinge"}

#: losses the spec checks against torch; the rest against numpy only
TORCH_CHECKED = {
    "bce": "torch.nn.functional.binary_cross_entropy_with_logits",
    "multilabel_bce": "torch.nn.functional.binary_cross_entropy_with_logits on (N, K)",
    "cross_entropy": "torch.nn.functional.cross_entropy",
    "soft_cross_entropy": "torch.nn.functional.cross_entropy with probability targets",
    "mse": "torch.nn.functional.mse_loss",
    "mae": "torch.nn.functional.l1_loss",
    "huber": "torch.nn.functional.huber_loss",
    "smooth_l1": "torch.nn.functional.smooth_l1_loss",
    "kl_div": "torch.nn.functional.kl_div(log_softmax(z), p)",
    "gaussian_nll": "torch.nn.functional.gaussian_nll_loss(var=exp(logvar))",
}


# --------------------------------------------------------------------------------------
# torch, lazily
# --------------------------------------------------------------------------------------

def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def require_torch(what="this check"):
    """Return the torch module, or skip the calling test with a reason if it is absent."""
    try:
        import torch
    except ImportError:
        import pytest

        pytest.skip(f"torch is not installed: {what} is checked against torch")
    return torch


# --------------------------------------------------------------------------------------
# numpy building blocks (float64, accurate over the whole real line)
# --------------------------------------------------------------------------------------

def softplus(x):
    """log(1 + e^x) without overflow or cancellation."""
    return np.logaddexp(0.0, x)


def sigmoid(x):
    """1 / (1 + e^-x), accurate in both tails (no 1 - tiny)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logsumexp(z, axis=-1):
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def log_softmax(z, axis=-1):
    z = np.asarray(z, dtype=np.float64)
    return z - np.expand_dims(logsumexp(z, axis=axis), axis)


def softmax(z, axis=-1):
    return np.exp(log_softmax(z, axis=axis))


def xlogy(x, y):
    """x*log(y) with 0*log(0) = 0."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x == 0, 0.0, x * np.log(np.where(x == 0, 1.0, y)))


def log_cosh_accurate(r):
    """log(cosh(r)) to float64 accuracy everywhere.

    Near 0: cosh r - 1 = 2 sinh²(r/2), so log cosh r = log1p(2 sinh²(r/2)) (no cancellation).
    Far out: log cosh r = |r| + log1p(e^(-2|r|)) - log 2 (no overflow).
    """
    r = np.asarray(r, dtype=np.float64)
    a = np.abs(r)
    small = a < 1.0
    s = np.sinh(np.where(small, a, 0.0) / 2.0)
    near = np.log1p(2.0 * s * s)
    far = a + np.log1p(np.exp(-2.0 * a)) - math.log(2.0)
    return np.where(small, near, far)


# --------------------------------------------------------------------------------------
# Literal transcriptions of the external references (kept as written upstream)
# --------------------------------------------------------------------------------------

def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction="none").

    Upstream:
        p = torch.sigmoid(inputs)
        ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce_loss * ((1 - p_t) ** gamma)
        if alpha >= 0:
            alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
            loss = alpha_t * loss
    """
    p = sigmoid(inputs)
    ce_loss = targets * softplus(-inputs) + (1 - targets) * softplus(inputs)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def optax_hinge_loss(predictor_outputs, targets):
    """optax.hinge_loss: jnp.maximum(0, 1 - predictor_outputs * targets)."""
    return np.maximum(0, 1 - predictor_outputs * targets)


def optax_log_cosh(predictions, targets=None):
    """optax.log_cosh, as written upstream (inaccurate near 0 in low precision).

    Upstream:
        errors = (predictions - targets) if (targets is not None) else predictions
        # log(cosh(x)) = log((exp(x) + exp(-x))/2) = log(exp(x) + exp(-x)) - log(2)
        return jnp.logaddexp(errors, -errors) - jnp.log(2.0).astype(errors.dtype)
    """
    errors = (predictions - targets) if (targets is not None) else predictions
    return np.logaddexp(errors, -errors) - np.log(2.0).astype(np.asarray(errors).dtype)


# --------------------------------------------------------------------------------------
# Per-sample losses and their hand-derived gradients, float64
# Each returns (l, (dl/dinput_1, ...)) where l has the per-sample shape and each
# gradient has its input's shape (the derivative of that sample's loss).
# --------------------------------------------------------------------------------------

def _f64(*arrays):
    return tuple(np.asarray(a, dtype=np.float64) for a in arrays)


def ps_bce(z, y, pos_weight=1.0):
    z, y = _f64(z, y)
    l = pos_weight * y * softplus(-z) + (1 - y) * softplus(z)
    g = -pos_weight * y * sigmoid(-z) + (1 - y) * sigmoid(z)
    return l, (g,)


def ps_multilabel_bce(z, y, pos_weight=1.0):
    l, (g,) = ps_bce(z, y, pos_weight)
    k = l.shape[-1]
    return l.mean(axis=-1), (g / k,)


def _onehot(y, k):
    y = np.asarray(y)
    oh = np.zeros(y.shape + (k,))
    np.put_along_axis(oh, y[..., None].astype(np.int64), 1.0, axis=-1)
    return oh


def ps_cross_entropy(z, y, label_smoothing=0.0):
    (z,) = _f64(z)
    k = z.shape[-1]
    yi = np.asarray(y).astype(np.int64)
    ls = log_softmax(z)
    oh = _onehot(yi, k)
    l = -(1 - label_smoothing) * np.take_along_axis(ls, yi[..., None], axis=-1)[..., 0]
    if label_smoothing != 0:
        l = l - label_smoothing / k * ls.sum(axis=-1)
    g = softmax(z) - (1 - label_smoothing) * oh - label_smoothing / k
    return l, (g,)


def ps_soft_cross_entropy(z, p):
    z, p = _f64(z, p)
    ls = log_softmax(z)
    l = -np.sum(np.where(p == 0, 0.0, p * ls), axis=-1)
    g = p.sum(axis=-1, keepdims=True) * softmax(z) - p
    return l, (g,)


def ps_kl_div(z, p):
    z, p = _f64(z, p)
    ls = log_softmax(z)
    l = np.sum(xlogy(p, p) - np.where(p == 0, 0.0, p * ls), axis=-1)
    g = p.sum(axis=-1, keepdims=True) * softmax(z) - p
    return l, (g,)


def ps_focal(z, y, gamma=2.0, alpha=0.25):
    """torchvision's focal loss in a form accurate in float64 for any logit.

    1 - p_t = y*σ(-z) + (1-y)*σ(z) (a sum of nonnegative terms: no cancellation),
    ce = y*softplus(-z) + (1-y)*softplus(z).
    d/dz: a_t * [((1-y)σ(z) - yσ(-z))*(1-p_t)^γ + γ*ce*(1-p_t)^(γ-1)*(1-2y)*σ(z)σ(-z)].
    """
    z, y = _f64(z, y)
    s, sm = sigmoid(z), sigmoid(-z)
    q = y * sm + (1 - y) * s
    ce = y * softplus(-z) + (1 - y) * softplus(z)
    a_t = y * alpha + (1 - y) * (1 - alpha)
    l = a_t * ce * q**gamma
    g = ((1 - y) * s - y * sm) * q**gamma  # σ(z) - y without cancellation
    if gamma != 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            g = g + gamma * ce * q ** (gamma - 1) * (1 - 2 * y) * s * sm
    return l, (a_t * g,)


def ps_hinge(f, y):
    f, y = _f64(f, y)
    m = 1 - y * f
    return np.maximum(0.0, m), (np.where(m > 0, -y, 0.0),)


def ps_multiclass_hinge(z, y, margin=1.0):
    """Crammer–Singer: max(0, m - z_y + max_{j≠y} z_j); subgradient -1 at y, +1 at the argmax."""
    (z,) = _f64(z)
    yi = np.asarray(y).astype(np.int64)
    k = z.shape[-1]
    oh = _onehot(yi, k).astype(bool)
    others = np.where(oh, -np.inf, z)
    j = np.argmax(others, axis=-1)
    zy = np.take_along_axis(z, yi[..., None], axis=-1)[..., 0]
    zj = np.take_along_axis(z, j[..., None], axis=-1)[..., 0]
    m = margin - zy + zj
    l = np.maximum(0.0, m)
    active = (m > 0)[..., None]
    g = np.where(active, _onehot(j, k) - oh, 0.0)
    return l, (g,)


def ps_mse(yhat, y):
    yhat, y = _f64(yhat, y)
    return (y - yhat) ** 2, (2 * (yhat - y),)


def ps_mae(yhat, y):
    yhat, y = _f64(yhat, y)
    return np.abs(y - yhat), (np.sign(yhat - y),)


def ps_huber(yhat, y, delta=1.0):
    yhat, y = _f64(yhat, y)
    r = y - yhat
    a = np.abs(r)
    quad = a <= delta
    l = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    g = np.where(quad, -r, -delta * np.sign(r))
    return l, (g,)


def ps_smooth_l1(yhat, y, beta=1.0):
    l, (g,) = ps_huber(yhat, y, delta=beta)
    return l / beta, (g / beta,)


def ps_log_cosh(yhat, y):
    yhat, y = _f64(yhat, y)
    r = yhat - y
    return log_cosh_accurate(r), (np.tanh(r),)


def ps_gaussian_nll(mu, logvar, y):
    mu, logvar, y = _f64(mu, logvar, y)
    iv = np.exp(-logvar)
    d = y - mu
    l = 0.5 * (logvar + d * d * iv)
    return l, (-d * iv, 0.5 * (1 - d * d * iv))


def ps_l2_penalty(w):
    (w,) = _f64(w)
    return w * w, (2 * w,)


PER_SAMPLE = {
    "bce": ps_bce,
    "multilabel_bce": ps_multilabel_bce,
    "cross_entropy": ps_cross_entropy,
    "soft_cross_entropy": ps_soft_cross_entropy,
    "focal": ps_focal,
    "hinge": ps_hinge,
    "multiclass_hinge": ps_multiclass_hinge,
    "mse": ps_mse,
    "mae": ps_mae,
    "huber": ps_huber,
    "smooth_l1": ps_smooth_l1,
    "log_cosh": ps_log_cosh,
    "kl_div": ps_kl_div,
    "gaussian_nll": ps_gaussian_nll,
    "l2_penalty": ps_l2_penalty,
}


# --------------------------------------------------------------------------------------
# Reductions (the API's semantics), shared by the numpy and torch references
# --------------------------------------------------------------------------------------

def ignored_mask(name, targets, ignore_index):
    """Boolean per-sample mask of ignored rows (None when nothing is ignored)."""
    if ignore_index is None:
        return None
    if name not in CLASS_TARGET:
        raise ValueError(f"{name} has no class target; ignore_index does not apply")
    return np.asarray(targets[0]) == ignore_index


def reduce_reference(l, grads, kind, reduction, weight=None, ignore=None):
    """Apply weight / ignore / reduction to per-sample l and per-sample grads (numpy)."""
    l = np.asarray(l, dtype=np.float64)
    w = np.ones_like(l) if weight is None else np.asarray(weight, dtype=np.float64)
    assert w.shape == l.shape, (w.shape, l.shape)
    keep = np.ones(l.shape, dtype=bool) if ignore is None else ~np.asarray(ignore)
    wk = np.where(keep, w, 0.0)
    lw = np.where(keep, wk * l, 0.0)
    count = int(keep.sum())
    if reduction == "none":
        value, scale = lw, 1.0
    elif reduction == "sum":
        value, scale = lw.sum(), 1.0
    elif reduction == "mean":
        value, scale = lw.sum() / count, 1.0 / count
    else:
        raise ValueError(reduction)
    out = []
    for g in grads:
        g = np.asarray(g, dtype=np.float64)
        ws, kp = (wk, keep) if kind == "scalar" else (wk[..., None], keep[..., None])
        out.append(np.where(np.broadcast_to(kp, g.shape), ws * g, 0.0) * scale)
    return np.asarray(value), tuple(out)


def _split_params(name, params):
    params = dict(params)
    ignore_index = params.pop("ignore_index", None)
    full = dict(SIGNATURES[name][2])
    unknown = set(params) - set(full)
    if unknown:
        raise ValueError(f"unknown params for {name}: {unknown}")
    full.update(params)
    return full, ignore_index


def numpy_reference(name, inputs, targets, reduction="mean", weight=None, **params):
    """(value, grads) of library loss ``name`` in float64 numpy."""
    full, ignore_index = _split_params(name, params)
    kind = SIGNATURES[name][3]
    args = list(inputs) + list(targets)
    ignore = ignored_mask(name, targets, ignore_index)
    if ignore is not None:
        # ignored rows may carry any label (e.g. -100): give them a harmless one
        args[len(inputs)] = np.where(ignore, 0, np.asarray(targets[0]))
    with np.errstate(all="ignore"):
        l, g = PER_SAMPLE[name](*args, **full)
    return reduce_reference(l, g, kind, reduction, weight, ignore)


# --------------------------------------------------------------------------------------
# torch references (float64, autograd)
# --------------------------------------------------------------------------------------

def _torch_per_sample(torch, name, ti, tt, full, ignore_index):
    F = torch.nn.functional
    if name == "bce":
        pw = torch.tensor(full["pos_weight"], dtype=torch.float64)
        return F.binary_cross_entropy_with_logits(ti[0], tt[0], pos_weight=pw, reduction="none")
    if name == "multilabel_bce":
        pw = torch.tensor(full["pos_weight"], dtype=torch.float64)
        e = F.binary_cross_entropy_with_logits(ti[0], tt[0], pos_weight=pw, reduction="none")
        return e.mean(dim=-1)
    if name == "cross_entropy":
        kw = {} if ignore_index is None else {"ignore_index": int(ignore_index)}
        return F.cross_entropy(ti[0], tt[0], label_smoothing=full["label_smoothing"],
                               reduction="none", **kw)
    if name == "soft_cross_entropy":
        return F.cross_entropy(ti[0], tt[0], reduction="none")
    if name == "mse":
        return F.mse_loss(ti[0], tt[0], reduction="none")
    if name == "mae":
        return F.l1_loss(ti[0], tt[0], reduction="none")
    if name == "huber":
        return F.huber_loss(ti[0], tt[0], delta=full["delta"], reduction="none")
    if name == "smooth_l1":
        return F.smooth_l1_loss(ti[0], tt[0], beta=full["beta"], reduction="none")
    if name == "kl_div":
        return F.kl_div(F.log_softmax(ti[0], dim=-1), tt[0], reduction="none").sum(dim=-1)
    if name == "gaussian_nll":
        return F.gaussian_nll_loss(ti[0], tt[0], var=torch.exp(ti[1]), full=False,
                                   reduction="none")
    raise KeyError(f"{name} is not checked against torch")


def torch_per_sample(name, inputs, targets, **params):
    """Per-sample loss of ``name`` from torch.nn.functional, float64 (numpy out)."""
    torch = require_torch(f"{name} ({TORCH_CHECKED.get(name, '?')})")
    full, ignore_index = _split_params(name, params)
    ti = [torch.tensor(np.asarray(a, dtype=np.float64)) for a in inputs]
    tt = [_torch_target(torch, name, a) for a in targets]
    return _torch_per_sample(torch, name, ti, tt, full, ignore_index).detach().numpy()


def _torch_target(torch, name, a):
    if name in CLASS_TARGET:
        return torch.tensor(np.asarray(a).astype(np.int64))
    return torch.tensor(np.asarray(a, dtype=np.float64))


def torch_reference(name, inputs, targets, reduction="mean", weight=None, **params):
    """(value, grads) from torch.nn.functional in float64; grads by autograd.

    Skips the calling test (with a reason) where torch is not installed.
    """
    torch = require_torch(f"{name} ({TORCH_CHECKED.get(name, '?')})")
    full, ignore_index = _split_params(name, params)
    ti = [torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in inputs]
    tt = [_torch_target(torch, name, a) for a in targets]
    l = _torch_per_sample(torch, name, ti, tt, full, ignore_index)
    w = torch.ones_like(l) if weight is None else torch.tensor(np.asarray(weight, np.float64))
    count = l.numel()
    if ignore_index is not None:
        keep = tt[0] != ignore_index
        w = torch.where(keep, w, torch.zeros_like(w))
        count = int(keep.sum())
    lw = l * w
    if reduction == "none":
        value, total = lw, lw.sum()
    elif reduction == "sum":
        value = total = lw.sum()
    elif reduction == "mean":
        value = total = lw.sum() / count
    else:
        raise ValueError(reduction)
    grads = torch.autograd.grad(total, ti)
    return value.detach().numpy(), tuple(g.numpy() for g in grads)


def reference(name, inputs, targets, reduction="mean", weight=None, **params):
    """The reference the spec names: torch where it applies (skip if absent), else numpy."""
    if name in TORCH_CHECKED:
        return torch_reference(name, inputs, targets, reduction, weight, **params)
    return numpy_reference(name, inputs, targets, reduction, weight, **params)


# --------------------------------------------------------------------------------------
# mpmath truths for the extreme inputs
# --------------------------------------------------------------------------------------

def _mp():
    import mpmath

    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.dps = 60
    return mp


def _mp_sigmoid(mp, x):
    return 1 / (1 + mp.exp(-x))


def _mp_softplus(mp, x):
    return mp.log1p(mp.exp(x)) if x < 0 else x + mp.log1p(mp.exp(-x))


def mp_bce(z, y, pos_weight=1.0):
    """(value, d/dz) of bce at one point, exact to float64, as Python floats."""
    mp = _mp()
    z, y, pw = mp.mpf(float(z)), mp.mpf(float(y)), mp.mpf(float(pos_weight))
    v = pw * y * _mp_softplus(mp, -z) + (1 - y) * _mp_softplus(mp, z)
    g = -pw * y * _mp_sigmoid(mp, -z) + (1 - y) * _mp_sigmoid(mp, z)
    return float(v), float(g)


def mp_focal(z, y, gamma=2.0, alpha=0.25):
    """(value, d/dz) of torchvision's focal loss at one point, exact to float64."""
    mp = _mp()
    z, y = mp.mpf(float(z)), mp.mpf(float(y))
    gamma, alpha = mp.mpf(float(gamma)), mp.mpf(float(alpha))
    s, sm = _mp_sigmoid(mp, z), _mp_sigmoid(mp, -z)
    q = y * sm + (1 - y) * s
    ce = y * _mp_softplus(mp, -z) + (1 - y) * _mp_softplus(mp, z)
    a_t = y * alpha + (1 - y) * (1 - alpha)
    v = a_t * ce * q**gamma
    g = (s - y) * q**gamma
    if gamma != 0:
        g += gamma * ce * q ** (gamma - 1) * (1 - 2 * y) * s * sm
    return float(v), float(a_t * g)


def mp_log_cosh(r):
    """(log cosh r, tanh r) exact to float64."""
    mp = _mp()
    r = mp.mpf(float(r))
    return float(mp.log(mp.cosh(r))), float(mp.tanh(r))


# --------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------

def central_fd(fn, x, h=1e-6):
    """Central-difference gradient of the scalar function ``fn`` at array ``x`` (float64).

    Each element is perturbed by ±h·max(1, |x_i|); ``fn`` receives a fresh copy.
    """
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    flat = g.reshape(-1)
    for i in range(x.size):
        step = h * max(1.0, abs(x.flat[i]))
        xp = x.copy()
        xp.flat[i] += step
        xm = x.copy()
        xm.flat[i] -= step
        flat[i] = (float(fn(xp)) - float(fn(xm))) / (2 * step)
    return g


# --------------------------------------------------------------------------------------
# Test data: fixed seeds, small shapes, points away from kinks
# --------------------------------------------------------------------------------------

N, K = 7, 5
SCALAR_SHAPE = (4, 6)
KINK_GAP = 0.05


def _away(rng, values, bad, scale=1.5):
    """Redraw the entries flagged by ``bad(values)`` until none is flagged."""
    for _ in range(1000):
        b = bad(values)
        if not b.any():
            return values
        values = np.where(b, rng.normal(0, scale, values.shape), values)
    raise RuntimeError("could not draw points away from the kinks")


def make_case(name, dtype, seed=0, params=None, shape=None):
    """(inputs, targets, weight) for loss ``name``: arrays in ``dtype``, class targets integer.

    Scalar losses get ``shape`` (default SCALAR_SHAPE); vector losses (N, K). Points stay
    KINK_GAP away from every kink and tie, so gradients are unique there and central
    differences are valid.
    """
    params = dict(params or {})
    full, ignore_index = _split_params(name, params)
    rng = np.random.default_rng(seed)
    kind = SIGNATURES[name][3]
    S = (shape or SCALAR_SHAPE) if kind == "scalar" else (N, K)
    idt = np.int64 if np.dtype(dtype) == np.float64 else np.int32

    if name in ("bce", "multilabel_bce", "focal"):
        z = rng.normal(0, 2, S)
        y = rng.uniform(0, 1, S)
        n_hard = min(4, y.size)
        y.flat[:n_hard] = [0.0, 1.0, 0.0, 1.0][:n_hard]  # some hard labels
        inputs, targets = (z,), (y,)
    elif name == "cross_entropy":
        z = rng.normal(0, 2, S)
        y = rng.integers(0, K, N)
        if ignore_index is not None:
            y[[1, 4]] = ignore_index
        inputs, targets = (z,), (y.astype(idt),)
    elif name == "multiclass_hinge":
        # distinct logits 0.37 apart (plus a row offset): no ties, margins ≥ 0.1 from 0
        z = np.stack([rng.permutation(K) * 0.37 for _ in range(N)]) + rng.normal(0, 1, (N, 1))
        z = z + rng.uniform(-0.005, 0.005, S)
        y = rng.integers(0, K, N)
        if ignore_index is not None:
            y[[1, 4]] = ignore_index
        inputs, targets = (z,), (y.astype(idt),)
    elif name in ("soft_cross_entropy", "kl_div"):
        z = rng.normal(0, 2, S)
        p = softmax(rng.normal(0, 1, S))
        inputs, targets = (z,), (p,)
    elif name == "hinge":
        y = rng.choice([-1.0, 1.0], S)
        f = _away(rng, rng.normal(0, 1.5, S), lambda f: np.abs(1 - y * f) < KINK_GAP)
        inputs, targets = (f,), (y,)
    elif name in ("mse", "mae", "huber", "smooth_l1", "log_cosh"):
        y = rng.normal(0, 1.5, S)
        knot = {"huber": full.get("delta"), "smooth_l1": full.get("beta")}.get(name, 0.0)
        yhat = _away(rng, rng.normal(0, 1.5, S),
                     lambda yh: np.abs(np.abs(y - yh) - knot) < KINK_GAP)
        inputs, targets = (yhat,), (y,)
    elif name == "gaussian_nll":
        inputs = (rng.normal(0, 1, S), rng.uniform(-1.5, 1.5, S))
        targets = (rng.normal(0, 1, S),)
    elif name == "l2_penalty":
        inputs, targets = (rng.normal(0, 1, S),), ()
    else:
        raise KeyError(name)

    inputs = tuple(np.ascontiguousarray(a, dtype=dtype) for a in inputs)
    targets = tuple(a if np.issubdtype(np.asarray(a).dtype, np.integer)
                    else np.ascontiguousarray(a, dtype=dtype) for a in targets)
    per_sample = S if kind == "scalar" else (N,)
    weight = rng.uniform(0.2, 2.0, per_sample).astype(dtype)
    return inputs, targets, weight


def central_fd_per_sample(fn_none, x, kind, h=1e-6):
    """Central differences of a per-sample loss, all samples at once.

    ``fn_none(x)`` returns the per-sample (weighted) losses, reduction "none". Samples are
    independent, so perturbing every sample together gives, for sample n, the derivative
    of its own loss: one pair of calls for a scalar loss, one pair per column for a
    vector loss (rows of shape (..., K)). The result is d/dx of Σ_n fn_none(x)_n.
    """
    x = np.array(x, dtype=np.float64)
    step = h * np.maximum(1.0, np.abs(x))
    if kind == "scalar":
        return (np.asarray(fn_none(x + step), np.float64)
                - np.asarray(fn_none(x - step), np.float64)) / (2 * step)
    g = np.zeros_like(x)
    for k in range(x.shape[-1]):
        e = np.zeros_like(x)
        e[..., k] = step[..., k]
        g[..., k] = (np.asarray(fn_none(x + e), np.float64)
                     - np.asarray(fn_none(x - e), np.float64)) / (2 * step[..., k])
    return g
