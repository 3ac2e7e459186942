"""Embedding, generative and batch-coupled library losses: triplet, contrastive, vae_elbo, ntxent.

Every loss is checked, in float32 and float64, for value and the gradient of every input
against an independent numpy implementation written from the formula of LANGUAGE.md §3
(analytic gradients derived by hand, not by lossdsl), under the reductions none / mean / sum,
with and without a per-sample ``weight`` where it applies, and against central finite
differences in float64. ``ntxent`` is also checked in the SimCLR convention (rows 2m and 2m+1
are a positive pair) against a numpy transcription of pytorch-metric-learning's NTXentLoss.
Then the edge cases: zero distances, identical triplet members, a batch of 2, D = 1, an
all-zero embedding row, and empty batches.

Nothing here uses lossdsl to compute an expected value.
"""
import numpy as np
import pytest

import lossdsl
from references import central_fd

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
REDUCTIONS = ["none", "mean", "sum"]
PER_SAMPLE_LOSSES = ["triplet", "contrastive", "vae_elbo"]

N, D, L = 6, 4, 3          # per-sample losses: N samples of D (and L) features
NB, DB = 6, 4              # ntxent: a batch of NB rows of DB features (kept small on purpose)
GAP = 0.05                 # drawn points stay this far from every hinge kink


def tol(dtype):
    return (2e-5, 2e-6) if np.dtype(dtype) == np.float32 else (1e-10, 1e-12)


def close(got, want, dtype, what):
    rtol, atol = tol(dtype)
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    # scale atol with the data's magnitude so float32 sums of O(10) terms are fair
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)


# --------------------------------------------------------------------------------------
# Independent numpy references (float64), per sample: (loss[N], (grad_input[N, ...], ...))
# --------------------------------------------------------------------------------------

def softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def sigmoid(x):
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


def ref_triplet(a, p, n, margin=1.0):
    """max(0, ‖a−p‖² − ‖a−n‖² + margin); subgradient 0 at the kink."""
    a, p, n = (np.asarray(v, np.float64) for v in (a, p, n))
    h = ((a - p) ** 2).sum(-1) - ((a - n) ** 2).sum(-1) + margin
    on = (h > 0).astype(np.float64)[..., None]
    return np.maximum(h, 0.0), (on * 2 * (n - p), on * -2 * (a - p), on * 2 * (a - n))


def ref_contrastive(z1, z2, y, margin=1.0):
    """y·d² + (1−y)·max(0, m − d)², d = ‖z1 − z2‖; the gradient of d at d = 0 is 0."""
    z1, z2, y = (np.asarray(v, np.float64) for v in (z1, z2, y))
    diff = z1 - z2
    d = np.sqrt((diff ** 2).sum(-1))
    hinge = np.maximum(margin - d, 0.0)
    loss = y * d ** 2 + (1 - y) * hinge ** 2
    unit = np.divide(diff, d[..., None], out=np.zeros_like(diff), where=d[..., None] > 0)
    g1 = (y[..., None] * 2 * diff) + ((1 - y) * -2 * hinge)[..., None] * unit
    return loss, (g1, -g1)


def ref_vae_elbo(xhat, mu, logvar, x, beta=1.0):
    """Σ_d bce(x̂_d, x_d) − β/2·Σ_l (1 + logvar_l − μ_l² − e^logvar_l), bce on logits."""
    xhat, mu, logvar, x = (np.asarray(v, np.float64) for v in (xhat, mu, logvar, x))
    rec = (x * softplus(-xhat) + (1 - x) * softplus(xhat)).sum(-1)
    kl = -beta / 2 * (1 + logvar - mu ** 2 - np.exp(logvar)).sum(-1)
    return rec + kl, (sigmoid(xhat) - x, beta * mu, -beta / 2 * (1 - np.exp(logvar)))


def ref_ntxent(z, pos, tau=0.5):
    """u = z/‖z‖ rowwise (u = 0 for a zero row), s = u·uᵀ/τ,
    loss = mean_i (logsumexp_{j≠i} s_ij − s_{i,pos_i}); gradient by the chain rule by hand."""
    z = np.asarray(z, np.float64)
    pos = np.asarray(pos)
    n = z.shape[0]
    r = np.sqrt((z ** 2).sum(1, keepdims=True))
    u = np.divide(z, r, out=np.zeros_like(z), where=r > 0)
    s = u @ u.T / tau
    masked = np.where(np.eye(n, dtype=bool), -np.inf, s)
    m = masked.max(1, keepdims=True)
    e = np.exp(masked - m)
    lse = m[:, 0] + np.log(e.sum(1))
    loss = np.mean(lse - s[np.arange(n), pos])
    # dL/ds_ij = (softmax over j ≠ i − onehot(pos_i)) / N
    G = e / e.sum(1, keepdims=True)
    G[np.arange(n), pos] -= 1.0
    G /= n
    gu = (G + G.T) @ u / tau
    # d u_i / d z_i = (I − u_i u_iᵀ) / ‖z_i‖ ; 0 for a zero row
    gz = np.divide(gu - (gu * u).sum(1, keepdims=True) * u, r, out=np.zeros_like(z), where=r > 0)
    return loss, (gz,)


def pml_ntxent(z, temperature=0.5):
    """numpy transcription of pytorch-metric-learning's NTXentLoss (losses/ntxent_loss.py with
    GenericPairLoss.pair_based_loss and the default CosineSimilarity), for labels that pair rows
    2m and 2m+1 (the SimCLR convention): every ordered positive pair (a, p) with equal labels
    and a ≠ p, the negatives of a are all rows with another label (no negatives, N = 2: 0);
        max_val   = max(pos/τ, max_n neg/τ)
        numerator = exp(pos/τ − max_val)
        denom     = Σ_n exp(neg/τ − max_val) + numerator
        loss_pair = −log(numerator/denom + tiny)
    and the MeanReducer averages over the positive pairs ("reduction_type": "pos_pair")."""
    z = np.asarray(z, np.float64)
    n = z.shape[0]
    labels = np.arange(n) // 2
    # CosineSimilarity: LpNormalize (torch.nn.functional.normalize, eps = 1e-12) then a matmul
    emb = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    mat = emb @ emb.T
    same = labels[:, None] == labels[None, :]
    a1, p = np.nonzero(same & ~np.eye(n, dtype=bool))
    a2, negs = np.nonzero(~same)
    if len(a1) == 0 or len(a2) == 0:   # `return self.zero_losses()`: no pairs, loss 0
        return 0.0
    pos_pairs = mat[a1, p][:, None] / temperature
    neg_pairs = mat[a2, negs] / temperature
    n_per_p = (a2[None, :] == a1[:, None]).astype(np.float64)
    neg_pairs = neg_pairs * n_per_p
    neg_pairs[n_per_p == 0] = -np.inf
    max_val = np.maximum(pos_pairs, np.max(neg_pairs, axis=1, keepdims=True))
    numerator = np.exp(pos_pairs - max_val)[:, 0]
    denominator = np.sum(np.exp(neg_pairs - max_val), axis=1) + numerator
    log_exp = np.log(numerator / denominator + np.finfo(np.float64).tiny)
    return np.mean(-log_exp)


REFS = {"triplet": ref_triplet, "contrastive": ref_contrastive, "vae_elbo": ref_vae_elbo}
N_INPUTS = {"triplet": 3, "contrastive": 2, "vae_elbo": 3}
PARAMS = {"triplet": {"margin": 0.7}, "contrastive": {"margin": 2.5}, "vae_elbo": {"beta": 0.6}}


def reduce_ref(loss, grads, reduction, weight):
    """The API's reductions: mean = Σ w·l / N (over samples), sum = Σ w·l, none = w·l."""
    w = np.ones_like(loss) if weight is None else np.asarray(weight, np.float64)
    scale = 1.0 / loss.size if reduction == "mean" else 1.0
    value = w * loss if reduction == "none" else (w * loss).sum() * scale
    return value, tuple(g * (w[..., None] * scale) for g in grads)


# --------------------------------------------------------------------------------------
# Test data: fixed seeds, away from kinks
# --------------------------------------------------------------------------------------

def make_case(name, dtype, seed=0, n=N):
    rng = np.random.default_rng(seed)
    if name == "triplet":
        m = PARAMS[name]["margin"]
        for _ in range(1000):
            a, p, q = rng.normal(0, 0.7, (3, n, D))
            h = ((a - p) ** 2).sum(-1) - ((a - q) ** 2).sum(-1) + m
            if np.all(np.abs(h) > GAP) and (h > 0).any() and (h < 0).any():
                break
        inputs, targets = (a, p, q), ()
    elif name == "contrastive":
        m = PARAMS[name]["margin"]
        for _ in range(1000):
            z1, z2 = rng.normal(0, 0.8, (2, n, D))
            d = np.sqrt(((z1 - z2) ** 2).sum(-1))
            if np.all(np.abs(m - d) > GAP) and (d < m).any() and (d > m).any():
                break
        y = np.arange(n) % 2 == 0
        inputs, targets = (z1, z2), (y.astype(np.float64),)
    elif name == "vae_elbo":
        xhat = rng.normal(0, 2, (n, D))
        mu, logvar = rng.normal(0, 1, (n, L)), rng.uniform(-1.5, 1.5, (n, L))
        x = rng.uniform(0, 1, (n, D))
        x[0, :2] = [0.0, 1.0]   # some hard labels
        inputs, targets = (xhat, mu, logvar), (x,)
    else:
        raise KeyError(name)
    inputs = tuple(np.ascontiguousarray(v, dtype=dtype) for v in inputs)
    targets = tuple(np.ascontiguousarray(v, dtype=dtype) for v in targets)
    weight = rng.uniform(0.2, 2.0, n).astype(dtype)
    return inputs, targets, weight


def ntxent_case(dtype, seed=0, n=NB, d=DB, pos=None):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (n, d)).astype(dtype)
    if pos is None:   # an arbitrary positive per row, never the row itself
        pos = (np.arange(n) + rng.integers(1, n, n)) % n
    return z, np.asarray(pos, dtype=np.int64)


@pytest.fixture(scope="module")
def losses():
    return {name: lossdsl.load(name) for name in PER_SAMPLE_LOSSES + ["ntxent"]}


# --------------------------------------------------------------------------------------
# The per-sample losses: reference matrix and finite differences
# --------------------------------------------------------------------------------------

def test_signatures(losses):
    assert losses["triplet"].inputs == ("a", "p", "n") and losses["triplet"].targets == ()
    assert losses["contrastive"].inputs == ("z1", "z2") and losses["contrastive"].targets == ("y",)
    assert losses["vae_elbo"].inputs == ("xhat", "mu", "logvar") and losses["vae_elbo"].targets == ("x",)
    assert losses["ntxent"].inputs == ("z",) and losses["ntxent"].targets == ("pos",)
    assert losses["triplet"].params == {"margin": 1.0}
    assert losses["contrastive"].params == {"margin": 1.0}
    assert losses["vae_elbo"].params == {"beta": 1.0}
    assert losses["ntxent"].params == {"tau": 0.5}


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("use_params", [False, True], ids=["defaults", "params"])
@pytest.mark.parametrize("name", PER_SAMPLE_LOSSES)
def test_per_sample_loss_matches_numpy(losses, name, use_params, dtype, reduction, weighted):
    f = losses[name]
    inputs, targets, weight = make_case(name, dtype, seed=3)
    params = PARAMS[name] if use_params else {}
    w = weight if weighted else None
    v = f(*inputs, *targets, reduction=reduction, weight=w, **params)
    v2, grads = f.value_and_grad(*inputs, *targets, reduction=reduction, weight=w, **params)
    l_ref, g_ref = REFS[name](*inputs, *targets, **params)
    want_v, want_g = reduce_ref(l_ref, g_ref, reduction, w)

    assert np.asarray(v).dtype == dtype and np.asarray(v2).dtype == dtype
    assert np.shape(v) == ((N,) if reduction == "none" else ())
    assert len(grads) == N_INPUTS[name]
    close(v, want_v, dtype, f"{name} value")
    close(v2, want_v, dtype, f"{name} value_and_grad value")
    for g, x, rg, nm in zip(grads, inputs, want_g, f.inputs):
        assert g.shape == x.shape and g.dtype == x.dtype, f"{name} d/d{nm}: {g.shape} {g.dtype}"
        close(g, rg, dtype, f"{name} d/d{nm}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", PER_SAMPLE_LOSSES)
def test_one_sample_without_batch_axis(losses, name, dtype):
    """A vector loss also takes one sample of shape (D,); 'none' then gives a 0-d value."""
    f = losses[name]
    inputs, targets, _ = make_case(name, dtype, seed=4, n=1)
    one_in = tuple(x[0] for x in inputs)
    one_t = tuple(t[0] for t in targets)
    v, grads = f.value_and_grad(*one_in, *one_t, reduction="sum")
    l_ref, g_ref = REFS[name](*inputs, *targets)
    close(v, l_ref[0], dtype, f"{name} one sample value")
    for g, x, rg in zip(grads, one_in, g_ref):
        assert g.shape == x.shape
        close(g, rg[0], dtype, f"{name} one sample grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", PER_SAMPLE_LOSSES)
def test_per_sample_gradients_match_finite_differences(losses, name, reduction):
    """float64: every input's gradient of the (weighted) reduced loss against central differences;
    for 'none' the gradient is that of Σ_i w_i·l_i."""
    f = losses[name]
    inputs, targets, weight = make_case(name, np.float64, seed=5)
    params = PARAMS[name]
    _, grads = f.value_and_grad(*inputs, *targets, reduction=reduction, weight=weight, **params)
    for k, x in enumerate(inputs):
        def fn(xk, k=k):
            args = list(inputs)
            args[k] = xk
            return np.sum(f(*args, *targets, reduction=reduction, weight=weight, **params))
        fd = central_fd(fn, x)
        np.testing.assert_allclose(grads[k], fd, rtol=1e-6, atol=1e-8,
                                   err_msg=f"{name} d/d{f.inputs[k]} vs finite differences")


@pytest.mark.parametrize("name", PER_SAMPLE_LOSSES)
def test_references_match_finite_differences(name):
    """The hand-derived reference gradients are themselves right (else the matrix would lie)."""
    inputs, targets, _ = make_case(name, np.float64, seed=6)
    _, g_ref = REFS[name](*inputs, *targets, **PARAMS[name])
    for k, x in enumerate(inputs):
        def fn(xk, k=k):
            args = list(inputs)
            args[k] = xk
            return REFS[name](*args, *targets, **PARAMS[name])[0].sum()
        np.testing.assert_allclose(g_ref[k], central_fd(fn, x), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------
# ntxent: a batch loss
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tau", [None, 0.2, 1.3], ids=["default", "tau0.2", "tau1.3"])
def test_ntxent_matches_numpy(losses, tau, dtype, reduction):
    """One value for the batch under every reduction (the batch is one 'sample': 'none' gives a
    0-d value); the gradient is that of the batch mean of §3."""
    f = losses["ntxent"]
    z, pos = ntxent_case(dtype, seed=7)
    params = {} if tau is None else {"tau": tau}
    v = f(z, pos, reduction=reduction, **params)
    v2, (g,) = f.value_and_grad(z, pos, reduction=reduction, **params)
    want, (want_g,) = ref_ntxent(z, pos, **params)
    assert np.asarray(v).dtype == dtype and np.shape(v) == ()
    assert g.shape == z.shape and g.dtype == dtype
    close(v, want, dtype, "ntxent value")
    close(v2, want, dtype, "ntxent value_and_grad value")
    close(g, want_g, dtype, "ntxent d/dz")


@pytest.mark.parametrize("n,d", [(NB, DB), (3, 5), (8, 2), (5, 1)])
def test_ntxent_gradient_matches_finite_differences(losses, n, d):
    f = losses["ntxent"]
    z, pos = ntxent_case(np.float64, seed=8 + n, n=n, d=d)
    _, (g,) = f.value_and_grad(z, pos, tau=0.4)
    fd = central_fd(lambda x: f(x, pos, tau=0.4), z)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_ntxent_reference_matches_finite_differences():
    z, pos = ntxent_case(np.float64, seed=9)
    _, (g,) = ref_ntxent(z, pos, tau=0.4)
    np.testing.assert_allclose(g, central_fd(lambda x: ref_ntxent(x, pos, tau=0.4)[0], z), rtol=1e-6, atol=1e-8)


def test_ntxent_positive_may_be_the_row_itself(losses):
    """pos is class(N): pos[i] = i is in the domain; the formula then subtracts s_ii = ‖u_i‖²/τ."""
    f = losses["ntxent"]
    z, pos = ntxent_case(np.float64, seed=10)
    pos[2] = 2
    v, (g,) = f.value_and_grad(z, pos)
    want, (want_g,) = ref_ntxent(z, pos)
    close(v, want, np.float64, "ntxent pos[i] = i value")
    close(g, want_g, np.float64, "ntxent pos[i] = i grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (4, 3, 0.1), (6, 5, 0.5), (8, 4, 0.07)])
def test_ntxent_simclr_matches_pytorch_metric_learning(losses, dtype, n, d, tau):
    """SimCLR pairing pos = arange(N) ^ 1 (rows 2m, 2m+1) against the transcription of
    pytorch-metric-learning's NTXentLoss (mean over the N ordered positive pairs)."""
    f = losses["ntxent"]
    rng = np.random.default_rng(11 + n)
    z = rng.normal(0, 1, (n, d)).astype(dtype)
    pos = np.arange(n) ^ 1
    v, (g,) = f.value_and_grad(z, pos, tau=tau)
    close(v, pml_ntxent(z, tau), dtype, "ntxent vs pytorch-metric-learning")
    # the pml formula and §3 agree; the gradient of the pml formula by finite differences
    close(ref_ntxent(z, pos, tau)[0], pml_ntxent(z, tau), np.float64, "§3 formula vs pml")
    if dtype == np.float64:
        fd = central_fd(lambda x: pml_ntxent(x, tau), z)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    else:
        close(g, ref_ntxent(z, pos, tau)[1][0], dtype, "ntxent float32 gradient")


def test_ntxent_accepts_int32_positives(losses):
    f = losses["ntxent"]
    z, pos = ntxent_case(np.float64, seed=12)
    np.testing.assert_allclose(f(z, pos.astype(np.int32)), f(z, pos), rtol=1e-15)


def test_ntxent_rejects_a_positive_outside_the_batch(losses):
    f = losses["ntxent"]
    z, pos = ntxent_case(np.float64, seed=13)
    pos[3] = NB
    with pytest.raises(lossdsl.LossError, match="pos"):
        f(z, pos)


def test_ntxent_weight_is_not_silently_ignored(losses):
    f = losses["ntxent"]
    z, pos = ntxent_case(np.float64, seed=14)
    plain = f(z, pos)
    try:
        weighted = f(z, pos, weight=np.array(2.0))
    except lossdsl.LossError:
        return
    np.testing.assert_allclose(weighted, 2 * plain, rtol=1e-12)


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_contrastive_zero_distance_pair(losses, dtype):
    """z1 = z2: d = 0; y = 1 gives 0, y = 0 gives margin²; the gradient is 0 (the norm's
    subgradient at 0), never NaN."""
    f = losses["contrastive"]
    z = np.random.default_rng(15).normal(size=(3, D)).astype(dtype)
    y = np.array([0.0, 1.0, 0.0], dtype)
    v, (g1, g2) = f.value_and_grad(z, z.copy(), y, reduction="none", margin=1.5)
    np.testing.assert_array_equal(v, np.array([2.25, 0.0, 2.25], dtype))
    assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2))
    np.testing.assert_array_equal(g1, 0.0)
    np.testing.assert_array_equal(g2, 0.0)
    # a pair beside it at non-zero distance is unaffected
    z2 = z.copy()
    z2[1] += 0.3
    v, (g1, g2) = f.value_and_grad(z, z2, y, reduction="none", margin=1.5)
    l_ref, (r1, r2) = ref_contrastive(z, z2, y, margin=1.5)
    close(v, l_ref, dtype, "contrastive mixed value")
    close(g1, r1, dtype, "contrastive mixed d/dz1")
    close(g2, r2, dtype, "contrastive mixed d/dz2")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_identical_triplet_members(losses, dtype):
    """a = p = n: the hinge is max(0, margin); with margin > 0 its argument's gradient
    2(n − p) = 0 etc. is exactly 0; with margin = 0 the hinge sits on its kink: value 0,
    subgradient 0 by convention. Also a = p ≠ n and a = n ≠ p."""
    f = losses["triplet"]
    a = np.random.default_rng(16).normal(size=(3, D)).astype(dtype)
    for margin in (1.0, 0.0):
        v, grads = f.value_and_grad(a, a.copy(), a.copy(), reduction="none", margin=margin)
        np.testing.assert_array_equal(v, np.full(3, margin, dtype))
        for g in grads:
            assert g.dtype == dtype
            np.testing.assert_array_equal(g, 0.0)
    far = a + 2.0
    for p, n in ((a, far), (far, a)):
        v, grads = f.value_and_grad(a, p.copy(), n.copy(), reduction="none", margin=0.5)
        l_ref, g_ref = ref_triplet(a, p, n, margin=0.5)
        close(v, l_ref, dtype, "triplet coincident value")
        for g, rg in zip(grads, g_ref):
            close(g, rg, dtype, "triplet coincident grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ntxent_batch_of_two(losses, dtype):
    """N = 2 with pos = [1, 0]: the only negative is the positive, so the loss is 0 and the
    gradient 0; with pos = [0, 1] (each row its own positive) the formula of §3 still holds."""
    f = losses["ntxent"]
    z = np.random.default_rng(17).normal(size=(2, 3)).astype(dtype)
    v, (g,) = f.value_and_grad(z, np.array([1, 0]))
    assert v == 0.0
    np.testing.assert_allclose(g, 0.0, atol=tol(dtype)[1])
    pos = np.array([0, 1])
    v, (g,) = f.value_and_grad(z, pos, tau=0.3)
    want, (want_g,) = ref_ntxent(z, pos, tau=0.3)
    close(v, want, dtype, "ntxent N=2 own positive value")
    close(g, want_g, dtype, "ntxent N=2 own positive grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dimension_one(losses, dtype):
    """D = 1 (and L = 1) for every loss."""
    rng = np.random.default_rng(18)
    a, p, n = (rng.normal(size=(5, 1)).astype(dtype) for _ in range(3))
    v, grads = losses["triplet"].value_and_grad(a, p, n, reduction="none", margin=0.3)
    l_ref, g_ref = ref_triplet(a, p, n, margin=0.3)
    close(v, l_ref, dtype, "triplet D=1")
    for g, rg in zip(grads, g_ref):
        close(g, rg, dtype, "triplet D=1 grad")
    y = np.array([0, 1, 0, 1, 0], dtype)
    v, grads = losses["contrastive"].value_and_grad(a, p, y, reduction="none", margin=1.7)
    l_ref, g_ref = ref_contrastive(a, p, y, margin=1.7)
    close(v, l_ref, dtype, "contrastive D=1")
    for g, rg in zip(grads, g_ref):
        close(g, rg, dtype, "contrastive D=1 grad")
    x = rng.uniform(size=(5, 1)).astype(dtype)
    v, grads = losses["vae_elbo"].value_and_grad(a, p, n, x, reduction="none")
    l_ref, g_ref = ref_vae_elbo(a, p, n, x)
    close(v, l_ref, dtype, "vae_elbo D=L=1")
    for g, rg in zip(grads, g_ref):
        close(g, rg, dtype, "vae_elbo D=L=1 grad")
    # ntxent with D = 1: every u_i = ±1, s_ij = ±1/τ; the gradient is 0 (rescaling a row
    # does not move its direction)
    z = rng.normal(size=(6, 1)).astype(dtype)
    pos = np.arange(6) ^ 1
    v, (g,) = losses["ntxent"].value_and_grad(z, pos)
    want, (want_g,) = ref_ntxent(z, pos)
    close(v, want, dtype, "ntxent D=1")
    np.testing.assert_allclose(g, 0.0, atol=10 * tol(dtype)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ntxent_zero_row_is_defined(losses, dtype):
    """A zero row has u = 0 (library/ntxent.loss): its similarities are 0, the value is the §3
    formula with those zeros and nothing is NaN. Its own gradient is taken as 0 (the derivative
    of z/‖z‖ at 0 does not exist; the norm's convention gives 0)."""
    f = losses["ntxent"]
    z, pos = ntxent_case(dtype, seed=19)
    z[1] = 0
    v, (g,) = f.value_and_grad(z, pos)
    assert np.isfinite(v) and np.all(np.isfinite(g)), (v, g)
    want, (want_g,) = ref_ntxent(z, pos)
    close(v, want, dtype, "ntxent zero row value")
    keep = np.arange(NB) != 1
    close(g[keep], want_g[keep], dtype, "ntxent zero row: gradient of the other rows")
    np.testing.assert_array_equal(g[1], 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", PER_SAMPLE_LOSSES)
def test_empty_batch(losses, name, dtype):
    """A batch of 0 samples: 'none' → an empty array, 'sum' → 0, 'mean' → NaN (as in torch and
    as the README documents); gradients are empty arrays of the inputs' shapes and dtype."""
    f = losses[name]
    inputs, targets, _ = make_case(name, dtype, seed=20)
    inputs = tuple(x[:0] for x in inputs)
    targets = tuple(t[:0] for t in targets)
    for reduction in REDUCTIONS:
        for w in (None, np.zeros(0, dtype)):
            v = f(*inputs, *targets, reduction=reduction, weight=w)
            v2, grads = f.value_and_grad(*inputs, *targets, reduction=reduction, weight=w)
            for val in (v, v2):
                assert np.asarray(val).dtype == dtype
                if reduction == "none":
                    assert np.shape(val) == (0,)
                elif reduction == "sum":
                    assert val == 0.0
                else:
                    assert np.isnan(val)
            for g, x in zip(grads, inputs):
                assert g.shape == x.shape and g.dtype == dtype


def test_empty_batch_for_ntxent(losses):
    """ntxent over N = 0 rows: the API gives NaN (mean over an empty batch; the batch is one
    'sample', so 'none' and 'sum' give the same NaN) and an empty gradient; it does not crash.
    A LossError would be an equally acceptable answer, so either is allowed."""
    f = losses["ntxent"]
    z, pos = np.zeros((0, 3)), np.zeros(0, np.int64)
    for reduction in REDUCTIONS:
        try:
            v, (g,) = f.value_and_grad(z, pos, reduction=reduction)
        except lossdsl.LossError:
            continue
        assert np.shape(v) == () and np.isnan(v)
        assert g.shape == (0, 3) and g.dtype == np.float64


def test_triplet_float32_margin_rounds_once():
    # Σ_d (n - p)(2a - n - p) of realistic float32 points whose terms (1e6) cancel to 1.2e4 (κ 360):
    # summed in float32 the margin is 7 bits off (11967.8125), as is the textbook formula (9 bits); the
    # terms in float64, where float32 differences and products are exact, round once
    from lossdsl.audit import bits_error
    from lossdsl.exact import evaluate
    f = lossdsl.load("triplet")
    a = np.array([204.10466, -832.96027, 972.4525, -172.0625], np.float32)
    p = np.array([330.0161, -846.3114, -518.94464, 604.5263], np.float32)
    n = np.array([-710.84985, 315.9109, 349.1616, -706.7422], np.float32)
    v = f(a[None], p[None], n[None], reduction="none")
    exact = {"a": a.astype(np.float64), "p": p.astype(np.float64), "n": n.astype(np.float64), "margin": 1.0, "D": 4}
    truth = evaluate(f.expr, exact, "float32")
    assert bits_error(v, truth, np.float32)[0] <= 1, (v[0], truth)
    textbook = np.sum((a - p) ** 2) - np.sum((a - n) ** 2) + np.float32(1)
    assert bits_error(np.array([textbook]), truth, np.float32)[0] > 4
