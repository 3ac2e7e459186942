"""The peers' formulas for ``lossdsl bench``: what a user would write instead of lossdsl.

* ``NUMPY``: a vectorized numpy reference per library loss, with stable formulas and a
  hand-derived gradient (``numpy_value_and_grad``);
* ``torch_peers()``: torch eager autograd through ``torch.nn.functional`` where it has the loss;
* ``jax_peers()``: the loss for ``jax.jit(jax.value_and_grad(...))``, optax's where it has one.

The formulas a peer does not get from its library are written once, over an array namespace
``xp`` (numpy, jax.numpy or torch: the functions used here behave alike in all three). torch,
jax and optax are imported only when a peer is built.
"""
import math

import numpy as np

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
    k = xp.arange(z.shape[-1])
    oh = (k.to(z.device) if hasattr(k, "to") else k) == y[:, None]     # torch: on z's device
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

def torch_peers():
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
        s = (u @ u.T / tau).masked_fill(t.eye(len(z), dtype=t.bool, device=z.device), float("-inf"))
        return (t.logsumexp(s, 1) - s[t.arange(len(z), device=z.device), pos]).mean()

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

def jax_peers():
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
