"""``lossdsl bench``: speed of the fused forward + backward against the peers a user would pick.

For each library loss on its workload (``WORKLOADS``: one row of data per benchmark) it times the
value and gradient of the mean loss computed by

* lossdsl: ``Loss.value_and_grad`` (one fused kernel call);
* numpy: a vectorized reference with stable formulas and a hand-derived gradient (``NUMPY``);
* torch: eager autograd through ``torch.nn.functional`` where it has the loss (``TORCH``);
* torch.compile: the same torch function compiled by inductor (compiled and warmed up before
  the timing; forward and backward graphs both compiled by AOTAutograd);
* jax.jit: ``jax.jit(jax.value_and_grad(f))`` with optax's loss where optax has one (``JAX``);
* memcpy: ``np.copyto`` of the same bytes (inputs, targets and gradients): the memory floor.

The formulas a peer does not get from its library are written once, over an array namespace
``xp`` (numpy, jax.numpy or torch: the functions used here behave alike in all three).
torch, jax and optax are imported only when a benchmark runs (``import lossdsl`` never
imports them), and a missing one only drops its column.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field

import numpy as np

#: relative difference of the values (peer against lossdsl) that counts as a mismatch
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
#: --size small divides the leading (batch) dimension by this
SMALL = 64
PEERS = ("numpy", "torch", "torch.compile", "jax.jit")


# ------------------------------------------------------------------------------------- workloads

def _builder(kind):
    """(rng, shape, dtype) -> arrays in the loss's order (inputs, then targets)."""
    def normal(rng, shape, dtype, scale=1.0):
        return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    def binary(rng, shape, dtype):
        return (rng.random(shape, dtype=np.float32) > 0.5).astype(dtype)

    def build(rng, shape, dtype):
        if kind == "logits":          # z ~ 3 N(0,1), hard 0/1 labels (bce, focal)
            return normal(rng, shape, dtype, 3.0), binary(rng, shape, dtype)
        if kind == "regression":      # yhat, y ~ N(0,1)
            return normal(rng, shape, dtype), normal(rng, shape, dtype)
        if kind == "sign":            # f ~ N(0,1), y = ±1
            return normal(rng, shape, dtype), 2 * binary(rng, shape, dtype) - 1
        if kind == "gaussian":        # mu, logvar ~ U(-1.5, 1.5), y
            return (normal(rng, shape, dtype), rng.uniform(-1.5, 1.5, shape).astype(dtype),
                    normal(rng, shape, dtype))
        if kind == "weights":
            return (normal(rng, shape, dtype),)
        if kind == "classes":         # logits (N, K), class indices (N,)
            return normal(rng, shape, dtype, 2.0), rng.integers(0, shape[1], shape[0])
        if kind == "multilabel":      # logits (N, K), 0/1 labels (N, K)
            return normal(rng, shape, dtype, 3.0), binary(rng, shape, dtype)
        if kind == "probs":           # logits (N, K), rows of a softmax (N, K)
            p = np.exp(normal(rng, shape, np.float64))
            return normal(rng, shape, dtype, 2.0), (p / p.sum(1, keepdims=True)).astype(dtype)
        if kind == "triplet":         # anchors, positives, negatives (N, D)
            return tuple(normal(rng, shape, dtype) for _ in range(3))
        if kind == "pairs":           # z1, z2 (N, D) with z2 near z1 for half the rows, y = similar
            z1, z2 = normal(rng, shape, dtype), normal(rng, shape, dtype, 0.1)
            return z1, z2, binary(rng, shape[:1], dtype)
        if kind == "vae":             # xhat (N, D), mu (N, L), logvar (N, L), x in [0, 1] (N, D)
            n, d, l = shape
            return (normal(rng, (n, d), dtype, 2.0), normal(rng, (n, l), dtype),
                    rng.uniform(-1, 1, (n, l)).astype(dtype), rng.random((n, d)).astype(dtype))
        if kind == "ntxent":          # embeddings (N, D), pos = the other view (i ^ 1)
            return normal(rng, shape, dtype), np.arange(shape[0]) ^ 1
        raise KeyError(kind)
    return build


@dataclass(frozen=True)
class Workload:
    loss: str                    # library loss
    kind: str                    # shape builder (_builder)
    shape: tuple                 # full size; --size small divides shape[0] by SMALL
    params: dict = field(default_factory=dict)
    tiny: bool = False           # per-call overhead: same size at --size small, times in µs

    @property
    def label(self):
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.loss} ({extra})" if extra else self.loss

    def sized(self, size):
        if self.tiny or size == "full":
            return self.shape
        return (max(self.shape[0] // SMALL, 4),) + tuple(self.shape[1:])

    def shape_text(self, shape):
        if self.kind == "vae":
            return f"{shape[0]} x ({shape[1]} + {shape[2]})"
        if len(shape) == 1 and shape[0] & (shape[0] - 1) == 0:
            return f"2^{shape[0].bit_length() - 1}"
        return " x ".join(map(str, shape))

    def arrays(self, size, dtype, seed=0):
        shape = self.sized(size)
        return shape, _builder(self.kind)(np.random.default_rng(seed), shape, np.dtype(dtype))


_E, _R = 2 ** 24, (16384, 1000)
WORKLOADS = (
    Workload("cross_entropy", "classes", _R),
    Workload("cross_entropy", "classes", _R, {"label_smoothing": 0.1}),
    Workload("bce", "logits", (_E,)),
    Workload("focal", "logits", (_E,)),
    Workload("huber", "regression", (_E,)),
    Workload("mse", "regression", (_E,)),
    Workload("mae", "regression", (_E,)),
    Workload("smooth_l1", "regression", (_E,)),
    Workload("log_cosh", "regression", (_E,)),
    Workload("hinge", "sign", (_E,)),
    Workload("gaussian_nll", "gaussian", (_E // 2,)),
    Workload("kl_div", "probs", _R),
    Workload("soft_cross_entropy", "probs", _R),
    Workload("multilabel_bce", "multilabel", _R),
    Workload("multiclass_hinge", "classes", _R),
    Workload("triplet", "triplet", (65536, 128)),
    Workload("contrastive", "pairs", (65536, 128)),
    Workload("vae_elbo", "vae", (16384, 784, 32)),
    Workload("ntxent", "ntxent", (1024, 128)),
    Workload("l2_penalty", "weights", (_E,)),
    Workload("cross_entropy", "classes", (8, 10), tiny=True),
)


def workloads(name=None):
    """The workloads of one library loss (``None``: all of them)."""
    return [w for w in WORKLOADS if name is None or w.loss == name]


# --------------------------------------------------------------------- formulas over a namespace
# xp is numpy, jax.numpy or torch. relu(x) = max(x, 0).

def _relu(xp, x):
    return xp.clip(x, 0, None)


def _softplus(xp, x):    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, no cancellation
    return _relu(xp, x) + xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid(xp, x):     # 1/(1 + e^-x) = e^x/(1 + e^x): both tails accurate
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def f_bce(xp, z, y, pos_weight=1.0):          # pw·y·softplus(-z) + (1-y)·softplus(z)
    return pos_weight * y * _softplus(xp, -z) + (1 - y) * _softplus(xp, z)


def f_mae(xp, yhat, y):                        # |yhat - y|
    return xp.abs(yhat - y)


def f_log_cosh(xp, yhat, y):                   # log cosh r = |r| + log1p(e^-2|r|) - log 2
    a = xp.abs(yhat - y)
    return a + xp.log1p(xp.exp(-2 * a)) - math.log(2.0)


def f_hinge(xp, f, y):                         # max(0, 1 - y·f)
    return _relu(xp, 1 - y * f)


def f_multiclass_hinge(xp, z, y, margin=1.0):  # max(0, m - z_y + max_{j≠y} z_j)
    oh = xp.arange(z.shape[-1]) == y[:, None]
    return _relu(xp, margin - xp.where(oh, z, 0).sum(-1) + xp.amax(xp.where(oh, -xp.inf, z), -1))


def f_gaussian_nll(xp, mu, logvar, y):         # ½(s + (y - μ)²·e^-s)
    return 0.5 * (logvar + (y - mu) ** 2 * xp.exp(-logvar))


def f_l2_penalty(xp, w):                       # w²
    return w * w


def f_triplet(xp, a, p, n, margin=1.0):        # max(0, ‖a-p‖² - ‖a-n‖² + m)
    return _relu(xp, ((a - p) ** 2).sum(-1) - ((a - n) ** 2).sum(-1) + margin)


def f_contrastive(xp, z1, z2, y, margin=1.0):  # d = ‖z1 - z2‖: y·d² + (1-y)·max(0, m - d)²
    d2 = ((z1 - z2) ** 2).sum(-1)
    return y * d2 + (1 - y) * _relu(xp, margin - xp.sqrt(d2)) ** 2


def f_gauss_kl(xp, mu, logvar, beta=1.0):      # -β/2 Σ_l (1 + s - μ² - e^s)
    return -beta / 2 * (1 + logvar - mu ** 2 - xp.exp(logvar)).sum(-1)


# -------------------------------------------------------------------------- numpy: value and grad
# Each returns (per-sample loss, per-sample gradients): the loss of each element (scalar losses)
# or row (vector losses), and its derivative with respect to each input. Batch losses (ntxent)
# return (mean, gradients of the mean) and are listed in BATCH.

def _softmax_lse(z):     # softmax and log-sum-exp of rows, one exp per element
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(-1, keepdims=True)
    e /= s
    return e, (np.log(s) + m)[:, 0]


def np_bce(z, y, pos_weight=1.0):
    # softplus(±z) = max(±z, 0) + log1p(e^-|z|);  d/dz = -pw·y·σ(-z) + (1-y)·σ(z)
    e = np.exp(-np.abs(z))
    sp = np.log1p(e)
    sig = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    if pos_weight == 1:
        return np.maximum(z, 0) - z * y + sp, (sig - y,)
    l = pos_weight * y * (np.maximum(-z, 0) + sp) + (1 - y) * (np.maximum(z, 0) + sp)
    return l, (-pos_weight * y * (1 - sig) + (1 - y) * sig,)


def np_multilabel_bce(z, y, pos_weight=1.0):   # mean over the row of bce
    l, (g,) = np_bce(z, y, pos_weight)
    return l.mean(-1), (g / z.shape[-1],)


def np_cross_entropy(z, y, label_smoothing=0.0):
    # lse(z) - (1-ε)·z_y - ε/K·Σ_k z_k;  d/dz = softmax(z) - (1-ε)·onehot(y) - ε/K
    g, lse = _softmax_lse(z)
    rows, k, eps = np.arange(len(y)), z.shape[-1], label_smoothing
    l = lse - (1 - eps) * z[rows, y]
    if eps:
        l -= eps / k * z.sum(-1)
        g -= eps / k
    g[rows, y] -= 1 - eps
    return l, (g,)


def np_soft_cross_entropy(z, p):
    # Σp·lse(z) - Σ p·z;  d/dz = Σp·softmax(z) - p
    g, lse = _softmax_lse(z)
    sp = p.sum(-1)
    g *= sp[:, None]
    g -= p
    return sp * lse - (p * z).sum(-1), (g,)


def np_kl_div(z, p):     # Σ xlogy(p, p) + soft cross-entropy; same gradient
    l, g = np_soft_cross_entropy(z, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        return l + np.where(p > 0, p * np.log(p), 0).sum(-1), g


def np_focal(z, y, gamma=2.0, alpha=0.25):
    # q = 1 - p_t = y·σ(-z) + (1-y)·σ(z) (no cancellation), a_t = y·α + (1-y)(1-α): a_t·q^γ·bce(z, y)
    # d/dz = a_t·[((1-y)σ(z) - yσ(-z))·q^γ + γ·bce·q^(γ-1)·(1-2y)·σ(z)σ(-z)]
    s, sm = _sigmoid(np, z), _sigmoid(np, -z)
    q = y * sm + (1 - y) * s
    ce = f_bce(np, z, y)
    a_t = y * alpha + (1 - y) * (1 - alpha)
    qg = q ** gamma
    g = ((1 - y) * s - y * sm) * qg
    if gamma:
        with np.errstate(divide="ignore", invalid="ignore"):
            g += gamma * ce * q ** (gamma - 1) * (1 - 2 * y) * s * sm
    return a_t * qg * ce, (a_t * g,)


def np_hinge(f, y):          # d/df = -y where 1 - y·f > 0
    m = 1 - y * f
    return np.maximum(m, 0), (np.where(m > 0, -y, 0),)


def np_multiclass_hinge(z, y, margin=1.0):   # subgradient: -1 at y, +1 at the argmax j ≠ y
    rows = np.arange(len(y))
    zy = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    j = others.argmax(-1)
    m = margin - zy + others[rows, j]
    g = np.zeros_like(z)
    act = (m > 0).astype(z.dtype)
    g[rows, j] += act
    g[rows, y] -= act
    return np.maximum(m, 0), (g,)


def np_mse(yhat, y):
    r = yhat - y
    return r * r, (2 * r,)


def np_mae(yhat, y):
    r = yhat - y
    return np.abs(r), (np.sign(r),)


def np_huber(yhat, y, delta=1.0):   # ½r² for |r| ≤ δ, else δ(|r| - δ/2);  d/dyhat = clip(r, -δ, δ)
    r = yhat - y
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)), (np.clip(r, -delta, delta),)


def np_smooth_l1(yhat, y, beta=1.0):   # huber(δ = β) / β
    l, (g,) = np_huber(yhat, y, beta)
    return l / beta, (g / beta,)


def np_log_cosh(yhat, y):            # d/dyhat = tanh(r)
    return f_log_cosh(np, yhat, y), (np.tanh(yhat - y),)


def np_gaussian_nll(mu, logvar, y):  # d/dμ = -(y-μ)e^-s, d/ds = ½(1 - (y-μ)²e^-s)
    d = y - mu
    iv = np.exp(-logvar)
    q = d * d * iv
    return 0.5 * (logvar + q), (-d * iv, 0.5 * (1 - q))


def np_l2_penalty(w):
    return w * w, (2 * w,)


def np_triplet(a, p, n, margin=1.0):  # active: d/da = 2(n-p), d/dp = -2(a-p), d/dn = 2(a-n)
    l = f_triplet(np, a, p, n, margin)
    act = (l > 0)[:, None].astype(a.dtype)
    return l, (2 * (n - p) * act, -2 * (a - p) * act, 2 * (a - n) * act)


def np_contrastive(z1, z2, y, margin=1.0):
    # d/dz1 = [2y - 2(1-y)·max(0, m-d)/d]·(z1 - z2) (0 at d = 0);  d/dz2 = -d/dz1
    r = z1 - z2
    d = np.sqrt((r * r).sum(-1))
    h = np.maximum(margin - d, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = 2 * y - 2 * (1 - y) * np.where(d > 0, h / d, 0)
    g = c[:, None] * r
    return y * d * d + (1 - y) * h * h, (g, -g)


def np_vae_elbo(xhat, mu, logvar, x, beta=1.0):
    # Σ_d bce(xhat, x) + KL;  d/dxhat = σ(xhat) - x, d/dμ = βμ, d/ds = β/2·(e^s - 1)
    l, (g,) = np_bce(xhat, x)
    ev = np.exp(logvar)
    kl = -beta / 2 * (1 + logvar - mu * mu - ev).sum(-1)
    return l.sum(-1) + kl, (g, beta * mu, beta / 2 * (ev - 1))


def np_ntxent(z, pos, tau=0.5):
    # u = z/‖z‖, s = u·uᵀ/τ (diagonal -inf), mean_i lse_j s_ij - s_i,pos(i), by matrix products
    nrm = np.linalg.norm(z, axis=1, keepdims=True)
    u = z / nrm
    s = u @ u.T / tau
    n, rows = len(z), np.arange(len(z))
    np.fill_diagonal(s, -np.inf)
    ds, lse = _softmax_lse(s)
    loss = np.mean(lse - s[rows, pos])
    ds[rows, pos] -= 1
    ds /= n
    du = (ds + ds.T) @ u / tau
    return loss, (du / nrm - u * np.sum(du * u, axis=1, keepdims=True) / nrm,)


NUMPY = {n[3:]: f for n, f in globals().items() if n.startswith("np_")}
BATCH = {"ntxent"}


def numpy_value_and_grad(name, *arrays, **params):
    """Value and gradients of the mean of library loss ``name``, numpy reference."""
    if name in BATCH:
        return NUMPY[name](*arrays, **params)
    with np.errstate(over="ignore"):
        l, grads = NUMPY[name](*arrays, **params)
    count = l.size
    return l.mean(dtype=l.dtype), tuple(g / l.dtype.type(count) for g in grads)


# ------------------------------------------------------------------------------------------ torch
# Each takes (torch, *tensors, **params) and returns the mean loss; torch.nn.functional where it
# has the loss, else the formula above with xp = torch.

def _torch_peers():
    def F(t):
        return t.nn.functional

    def pw(t, z, p):
        return {} if p == 1 else {"pos_weight": t.tensor(p, dtype=z.dtype)}

    def focal(t, z, y, gamma=2.0, alpha=0.25):   # torchvision.ops.sigmoid_focal_loss, as written
        p = t.sigmoid(z)
        ce = F(t).binary_cross_entropy_with_logits(z, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        return ((alpha * y + (1 - alpha) * (1 - y)) * ce * (1 - p_t) ** gamma).mean()

    def ntxent(t, z, pos, tau=0.5):
        u = F(t).normalize(z, dim=1)
        s = (u @ u.T / tau).masked_fill(t.eye(len(z), dtype=t.bool), float("-inf"))
        return (t.logsumexp(s, 1) - s[t.arange(len(z)), pos]).mean()

    def generic(f):
        return lambda t, *a, **k: f(t, *a, **k).mean()

    return {
        "bce": lambda t, z, y, pos_weight=1.0: F(t).binary_cross_entropy_with_logits(z, y, **pw(t, z, pos_weight)),
        "multilabel_bce": lambda t, z, y, pos_weight=1.0:
            F(t).binary_cross_entropy_with_logits(z, y, **pw(t, z, pos_weight)),
        "cross_entropy": lambda t, z, y, label_smoothing=0.0:
            F(t).cross_entropy(z, y, label_smoothing=label_smoothing),
        "soft_cross_entropy": lambda t, z, p: F(t).cross_entropy(z, p),
        "kl_div": lambda t, z, p: F(t).kl_div(F(t).log_softmax(z, -1), p, reduction="batchmean"),
        "focal": focal,
        "mse": lambda t, yhat, y: F(t).mse_loss(yhat, y),
        "mae": lambda t, yhat, y: F(t).l1_loss(yhat, y),
        "huber": lambda t, yhat, y, delta=1.0: F(t).huber_loss(yhat, y, delta=delta),
        "smooth_l1": lambda t, yhat, y, beta=1.0: F(t).smooth_l1_loss(yhat, y, beta=beta),
        "gaussian_nll": lambda t, mu, logvar, y: F(t).gaussian_nll_loss(mu, y, logvar.exp()),
        "vae_elbo": lambda t, xhat, mu, logvar, x, beta=1.0: (
            F(t).binary_cross_entropy_with_logits(xhat, x, reduction="none").sum(-1)
            + f_gauss_kl(t, mu, logvar, beta)).mean(),
        "ntxent": ntxent,
        **{n: generic(f) for n, f in (("log_cosh", f_log_cosh), ("hinge", f_hinge),
                                      ("multiclass_hinge", f_multiclass_hinge), ("triplet", f_triplet),
                                      ("contrastive", f_contrastive), ("l2_penalty", f_l2_penalty))},
    }


# -------------------------------------------------------------------------------------------- jax
# Each takes (jnp, *arrays, **params) and returns the mean loss: optax's loss where it has one.

def _jax_peers():
    import optax

    def generic(f):
        return lambda jnp, *a, **k: f(jnp, *a, **k).mean()

    def ce(jnp, z, y, label_smoothing=0.0):
        if not label_smoothing:
            return optax.losses.softmax_cross_entropy_with_integer_labels(z, y).mean()
        onehot = optax.losses.smooth_labels(jax_nn().one_hot(y, z.shape[-1], dtype=z.dtype), label_smoothing)
        return optax.losses.softmax_cross_entropy(z, onehot).mean()

    def multiclass_hinge(jnp, z, y, margin=1.0):
        if margin != 1:
            return f_multiclass_hinge(jnp, z, y, margin).mean()
        return optax.losses.multiclass_hinge_loss(z, y).mean()

    def ntxent(jnp, z, pos, tau=0.5):   # optax groups rows by label: i and pos(i) share one
        return optax.losses.ntxent(z, jnp.minimum(jnp.arange(len(pos)), pos), temperature=tau)

    def bce(jnp, z, y, pos_weight=1.0):
        if pos_weight != 1:
            return f_bce(jnp, z, y, pos_weight).mean()
        return optax.losses.sigmoid_binary_cross_entropy(z, y).mean()

    return {
        "bce": bce, "multilabel_bce": bce, "cross_entropy": ce,
        "soft_cross_entropy": lambda jnp, z, p: optax.losses.softmax_cross_entropy(z, p).mean(),
        "kl_div": lambda jnp, z, p: optax.losses.kl_divergence(jax_nn().log_softmax(z, -1), p).mean(),
        "focal": lambda jnp, z, y, gamma=2.0, alpha=0.25:
            optax.losses.sigmoid_focal_loss(z, y, alpha=alpha, gamma=gamma).mean(),
        "mse": lambda jnp, yhat, y: optax.losses.squared_error(yhat, y).mean(),
        "huber": lambda jnp, yhat, y, delta=1.0: optax.losses.huber_loss(yhat, y, delta=delta).mean(),
        "smooth_l1": lambda jnp, yhat, y, beta=1.0: optax.losses.huber_loss(yhat, y, delta=beta).mean() / beta,
        "log_cosh": lambda jnp, yhat, y: optax.losses.log_cosh(yhat, y).mean(),
        "hinge": lambda jnp, f, y: optax.losses.hinge_loss(f, y).mean(),
        "multiclass_hinge": multiclass_hinge,
        "vae_elbo": lambda jnp, xhat, mu, logvar, x, beta=1.0: (
            optax.losses.sigmoid_binary_cross_entropy(xhat, x).sum(-1) + f_gauss_kl(jnp, mu, logvar, beta)).mean(),
        "ntxent": ntxent,
        **{n: generic(f) for n, f in (("mae", f_mae), ("gaussian_nll", f_gaussian_nll), ("triplet", f_triplet),
                                      ("contrastive", f_contrastive), ("l2_penalty", f_l2_penalty))},
    }


def jax_nn():
    import jax
    return jax.nn


# ---------------------------------------------------------------------------------------- timing

def timeit(fn, repeat, budget=0.02, warmup=0.5, warmup_calls=6, settle=3.0):
    """(best seconds per call, first result): warm-up calls for ``warmup`` seconds and at least
    ``warmup_calls``, and on (for at most ``settle`` seconds) while the latest call is still 30%
    slower than the fastest so far (with torch imported, the first several large calls of a
    parallel numba kernel run 3x slower, then settle); then the best of ``repeat`` samples, each
    looping the call enough times to last ``budget`` seconds (fast calls are averaged)."""
    start = t = time.perf_counter()
    out = fn()
    once = fastest = last = time.perf_counter() - t
    calls = 1
    while (calls < warmup_calls or time.perf_counter() - start < warmup
           or (last > 1.3 * fastest and time.perf_counter() - start < settle)):
        t = time.perf_counter()
        fn()
        last = time.perf_counter() - t
        fastest = min(fastest, last)
        calls += 1
    inner = max(1, min(10000, int(budget / max(once, 1e-7))))
    times = []
    for _ in range(max(repeat, 1)):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return min(times), out


def _optional(module):
    try:
        return __import__(module)
    except ImportError:
        return None


def available_peers():
    """The peer columns this machine can fill (numpy always)."""
    have = ["numpy"]
    if _optional("torch") is not None:
        have += ["torch", "torch.compile"]
    if _optional("jax") is not None and _optional("optax") is not None:
        have.append("jax.jit")
    return have


def _numpy_callable(loss, arrays, params):
    return lambda: numpy_value_and_grad(loss.name, *arrays, **params)[0]


def _torch_callable(loss, arrays, params, compiled=False):
    import torch
    fn = _torch_peers()[loss.name]
    if compiled:
        # the workloads share a few code objects (the lambdas above): let each keep its own graph
        # rather than fall back to eager after dynamo's default 8 recompilations
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        fn = torch.compile(fn, dynamic=False)
    ts = [torch.from_numpy(a) for a in arrays]
    ins = [t.requires_grad_(True) for t in ts[:len(loss.inputs)]]

    def run():
        for t in ins:
            t.grad = None
        v = fn(torch, *ts, **params)
        v.backward()
        return v.detach()
    return run


def _jax_callable(loss, arrays, params):
    import jax
    import jax.numpy as jnp
    fn = _jax_peers()[loss.name]
    xs = [jax.device_put(a.astype(np.int32) if a.dtype.kind in "iu" else a) for a in arrays]
    vg = jax.jit(jax.value_and_grad(lambda *a: fn(jnp, *a, **params), argnums=tuple(range(len(loss.inputs)))))

    def run():
        v, g = vg(*xs)
        jax.block_until_ready(g)
        return v
    return run


CALLABLES = {"numpy": _numpy_callable, "torch": _torch_callable, "jax.jit": _jax_callable,
             "torch.compile": lambda *a: _torch_callable(*a, compiled=True)}


@dataclass
class Row:
    label: str
    shape: str
    tiny: bool
    ours: float
    peers: dict          # peer -> seconds (None: failed)
    memcpy: float
    diffs: dict          # peer -> relative difference of the value against lossdsl's

    @property
    def best(self):
        done = {k: v for k, v in self.peers.items() if v is not None}
        return min(done.items(), key=lambda kv: kv[1]) if done else (None, None)


def run_workload(w, size="small", dtype="float32", repeat=5, peers=None, log=None):
    """Time one workload: lossdsl and each peer, and the memcpy floor; returns a Row."""
    import lossdsl
    peers = available_peers() if peers is None else peers
    loss = lossdsl.load(w.loss)
    shape, arrays = w.arrays(size, dtype)
    t_ours, (value, grads) = timeit(lambda: loss.value_and_grad(*arrays, **w.params), repeat)
    value = float(value)
    times, diffs = {}, {}
    for peer in peers:
        try:
            t, v = timeit(CALLABLES[peer](loss, arrays, w.params), repeat)
            times[peer], diffs[peer] = t, abs(float(v) - value) / max(abs(value), 1e-30)
        except Exception as e:  # a peer that fails drops its cell, not the benchmark
            times[peer] = diffs[peer] = None
            if log:
                log(f"{w.label}: {peer} failed: {type(e).__name__}: {e}")
    src = list(arrays) + [np.asarray(g) for g in grads]
    dst = [np.empty_like(a) for a in src]
    t_copy, _ = timeit(lambda: [np.copyto(d, s) for d, s in zip(dst, src)], repeat)
    return Row(w.label, w.shape_text(shape), w.tiny, t_ours, times, t_copy, diffs)


def setup_threads():
    """torch uses as many threads as numba (jax's XLA picks its own)."""
    import numba
    threads = numba.get_num_threads()
    torch = sys.modules.get("torch") or _optional("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def enable_float64(dtype):
    if dtype == "float64" and _optional("jax") is not None:
        import jax
        jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------------------------------- report

def _cell(seconds, tiny):
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.1f} µs" if tiny else f"{seconds * 1e3:.1f}"


def table(rows, peers, dtype="float32"):
    """The Markdown table: one line per row; ratio = best peer / lossdsl (above 1: lossdsl faster)."""
    tol = TOLERANCE[dtype]
    head = (["loss", "shape", "lossdsl ms"] + [f"{p} ms" for p in peers]
            + ["memcpy ms", "best peer / lossdsl", "value rel. diff"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name, t = r.best
        ratio = f"{t / r.ours:.2f}x ({name})" if name else "-"
        known = [d for d in r.diffs.values() if d is not None]
        worst = max(known) if known else None
        bad = [p for p, d in r.diffs.items() if d is not None and not d <= tol]
        diff = "-" if worst is None else f"{worst:.1e}" + (f" MISMATCH ({', '.join(bad)})" if bad else "")
        cells = ([r.label, r.shape, _cell(r.ours, r.tiny)] + [_cell(r.peers.get(p), r.tiny) for p in peers]
                 + [_cell(r.memcpy, r.tiny), ratio, diff])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mismatches(rows, dtype="float32"):
    tol = TOLERANCE[dtype]
    return [(r.label, p, d) for r in rows for p, d in r.diffs.items() if d is not None and not d <= tol]


def machine(threads):
    """One line per fact: platform, cores, threads, versions."""
    import numba
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}", f"numba {numba.__version__}"]
    for mod in ("torch", "jax", "optax"):
        m = sys.modules.get(mod)
        versions.append(f"{mod} {m.__version__}" if m is not None else f"{mod} not installed")
    cpu = platform.processor() or _cpu_model() or "cpu"
    return [f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
            f"{threads} threads for numba and torch",
            "- " + ", ".join(versions)]


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def compile_times():
    """(import, first compile, cached load) seconds for focal, float32: fresh processes sharing
    one empty cache directory (the first compiles through sympy and numba, the second loads)."""
    script = textwrap.dedent("""
        import time, numpy as np
        t = time.perf_counter()
        import lossdsl
        t1 = time.perf_counter()
        f = lossdsl.load("focal")
        f.value_and_grad(np.zeros(4, np.float32), np.ones(4, np.float32))
        print(t1 - t, time.perf_counter() - t1)
    """)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, LOSSDSL_CACHE_DIR=cache)
        runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                               check=True).stdout.split()[-2:] for _ in range(2)]
    return float(runs[1][0]), float(runs[0][1]), float(runs[1][1])


def report(rows, peers, threads, command, dtype, repeat, compiled=None):
    """RESULTS.md: title, how it was produced, the machine, the table, the compile-time line."""
    lines = ["# CPU benchmark results", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", ""]
    lines += machine(threads)
    lines += [f"- forward + backward (value and gradient) of the mean loss, {dtype}, best of {repeat} "
              "after a warm-up (times in ms; the 8 x 10 row, per-call overhead, in µs); torch.compile and jax.jit compiled before the timing; memcpy: "
              "np.copyto of the inputs, targets and gradients (the memory floor); ratio = best peer / "
              "lossdsl (above 1: lossdsl is faster); value rel. diff: the largest relative difference "
              f"of a peer's value from lossdsl's (tolerance {TOLERANCE[dtype]:g}); lossdsl's large results "
              "take the memory of the previous call's dropped ones (lossdsl/buffers.py), the peers "
              "allocate theirs per call", "",
              table(rows, peers, dtype)]
    if compiled:
        imported, first, cached = compiled
        lines += ["", f"`import lossdsl`: {imported:.2f} s. Then `focal`, float32, value and gradient: "
                      f"first compile (empty cache: sympy pipeline and numba) {first:.2f} s; in a second "
                      f"process, loaded from the cache (no sympy, no numba compile) {cached:.2f} s."]
    return "\n".join(lines) + "\n"
