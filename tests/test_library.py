"""The library's losses (LANGUAGE.md §3) through the Python API (§4), against references.

Every expected number comes from tests/references.py (numpy float64 transcriptions,
torch.nn.functional + autograd where the spec names torch, mpmath for extreme inputs);
lossdsl is never compared with itself, except that its gradients are checked against
central differences of its own value, whose correctness is pinned in the same test.

The matrix test runs the same cases for every loss: float64/float32 × none/mean/sum ×
unweighted/weighted, with each loss's non-default parameters (and ignore_index for class
targets) as extra cases. Where torch is not installed, the torch half of a check is
skipped with a reason (the numpy half still runs first).
"""
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import references as R  # noqa: E402

import lossdsl  # noqa: E402

# --------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------

CASES = [
    ("bce", {}),
    ("bce", {"pos_weight": 2.5}),
    ("multilabel_bce", {}),
    ("multilabel_bce", {"pos_weight": 0.5}),
    ("cross_entropy", {}),
    ("cross_entropy", {"label_smoothing": 0.1}),
    ("cross_entropy", {"ignore_index": 2}),
    ("cross_entropy", {"label_smoothing": 0.2, "ignore_index": 2}),
    ("soft_cross_entropy", {}),
    ("focal", {}),
    ("focal", {"gamma": 0.5, "alpha": 0.6}),
    ("focal", {"gamma": 0.0}),
    ("hinge", {}),
    ("multiclass_hinge", {}),
    ("multiclass_hinge", {"margin": 0.5}),
    ("multiclass_hinge", {"ignore_index": 1}),
    ("mse", {}),
    ("mae", {}),
    ("huber", {}),
    ("huber", {"delta": 0.3}),
    ("smooth_l1", {}),
    ("smooth_l1", {"beta": 0.4}),
    ("log_cosh", {}),
    ("kl_div", {}),
    ("gaussian_nll", {}),
    ("l2_penalty", {}),
]
assert {name for name, _ in CASES} == set(R.SIGNATURES)


def _case_id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


CASE_IDS = [_case_id(c) for c in CASES]
SEEDS = {_case_id(c): 1000 + i for i, c in enumerate(CASES)}
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]
REDUCTIONS = ["none", "mean", "sum"]

# float64: ~1e-10 relative; float32: ~1e-5 relative; absolute floors scaled to the data
TOL = {np.dtype(np.float64): (1e-10, 1e-12), np.dtype(np.float32): (1e-5, 1e-6)}

_LOSSES = {}


def load(name):
    if name not in _LOSSES:
        _LOSSES[name] = lossdsl.load(name)
    return _LOSSES[name]


def assert_close(got, ref, dtype, what, rtol=None, atol=None):
    rt, at = TOL[np.dtype(dtype)]
    rtol = rt if rtol is None else rtol
    atol = at if atol is None else atol
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size and np.all(np.isfinite(ref)) else 1.0
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), ref, rtol=rtol,
                               atol=atol * scale, err_msg=what)


def per_sample_shape(name, inputs):
    kind = R.SIGNATURES[name][3]
    return inputs[0].shape if kind == "scalar" else inputs[0].shape[:-1]


def check_output_types(name, v, grads, inputs, dtype, reduction):
    v = np.asarray(v)
    assert v.dtype == np.dtype(dtype), f"{name}: value dtype {v.dtype}, inputs are {dtype}"
    if reduction == "none":
        assert v.shape == per_sample_shape(name, inputs), f"{name}: value shape {v.shape}"
    else:
        assert v.ndim == 0, f"{name}: {reduction} must give a 0-d value, got shape {v.shape}"
    assert isinstance(grads, tuple) and len(grads) == len(inputs), \
        f"{name}: expected a tuple of {len(inputs)} gradients, got {type(grads)} {len(grads)}"
    for g, x, nm in zip(grads, inputs, R.SIGNATURES[name][0]):
        g = np.asarray(g)
        assert g.shape == x.shape, f"{name}: d/d{nm} has shape {g.shape}, input {x.shape}"
        assert g.dtype == x.dtype, f"{name}: d/d{nm} has dtype {g.dtype}, input {x.dtype}"


def run_both(f, inputs, targets, **kw):
    """The value from __call__ and (value, grads) from value_and_grad."""
    v = f(*inputs, *targets, **kw)
    v2, grads = f.value_and_grad(*inputs, *targets, **kw)
    return v, v2, grads


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(case, dtype, reduction, weighted):
    name, params = case
    inputs, targets, weight = R.make_case(name, dtype, SEEDS[_case_id(case)], params)
    w = weight if weighted else None
    f = load(name)
    v, v2, grads = run_both(f, inputs, targets, reduction=reduction, weight=w, **params)
    check_output_types(name, v, grads, inputs, dtype, reduction)
    check_output_types(name, v2, grads, inputs, dtype, reduction)

    refs = [("numpy", R.numpy_reference)]
    if name in R.TORCH_CHECKED:
        refs.append(("torch", R.torch_reference))
    for label, ref_fn in refs:
        # the torch reference skips here (after the numpy checks) where torch is absent
        ref_v, ref_g = ref_fn(name, inputs, targets, reduction, w, **params)
        assert_close(v, ref_v, dtype, f"{name} {params} {reduction}: value vs {label}")
        assert_close(v2, ref_v, dtype, f"{name} {params} {reduction}: value_and_grad vs {label}")
        for g, rg, nm in zip(grads, ref_g, R.SIGNATURES[name][0]):
            assert_close(g, rg, dtype, f"{name} {params} {reduction}: d/d{nm} vs {label}")


# --------------------------------------------------------------------------------------
# The references themselves (no lossdsl): a wrong reference would make the matrix lie
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_gradients_match_finite_differences(case):
    name, params = case
    inputs, targets, weight = R.make_case(name, np.float64, SEEDS[_case_id(case)], params)
    _, ref_g = R.numpy_reference(name, inputs, targets, "sum", weight, **params)
    for j, x in enumerate(inputs):
        def fn(xj, j=j):
            args = list(inputs)
            args[j] = xj
            return R.numpy_reference(name, args, targets, "sum", weight, **params)[0]

        np.testing.assert_allclose(ref_g[j], R.central_fd(fn, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in R.TORCH_CHECKED],
                         ids=[_case_id(c) for c in CASES if c[0] in R.TORCH_CHECKED])
def test_numpy_reference_matches_torch(case, reduction):
    name, params = case
    R.require_torch(name)
    inputs, targets, weight = R.make_case(name, np.float64, SEEDS[_case_id(case)], params)
    nv, ng = R.numpy_reference(name, inputs, targets, reduction, weight, **params)
    tv, tg = R.torch_reference(name, inputs, targets, reduction, weight, **params)
    np.testing.assert_allclose(nv, tv, rtol=1e-12, atol=1e-14)
    for a, b in zip(ng, tg):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_reference_mean_is_torchs_mean():
    """The API's "mean" is torch's own reduction: elementwise for multilabel_bce, batchmean for
    kl_div, the non-ignored rows for cross_entropy with ignore_index."""
    torch = R.require_torch("the meaning of reduction='mean'")
    F = torch.nn.functional
    z, y, _ = R.make_case("multilabel_bce", np.float64, 1)
    v, _ = R.torch_reference("multilabel_bce", z, y, "mean")
    assert np.isclose(v, F.binary_cross_entropy_with_logits(torch.tensor(z[0]), torch.tensor(y[0])).item(),
                      rtol=1e-14)
    z, p, _ = R.make_case("kl_div", np.float64, 2)
    v, _ = R.torch_reference("kl_div", z, p, "mean")
    tv = F.kl_div(F.log_softmax(torch.tensor(z[0]), -1), torch.tensor(p[0]), reduction="batchmean")
    assert np.isclose(v, tv.item(), rtol=1e-14)
    z, y, _ = R.make_case("cross_entropy", np.float64, 3, {"ignore_index": 2})
    v, _ = R.numpy_reference("cross_entropy", z, y, "mean", ignore_index=2, label_smoothing=0.2)
    tv = F.cross_entropy(torch.tensor(z[0]), torch.tensor(y[0]), ignore_index=2, label_smoothing=0.2)
    assert np.isclose(v, tv.item(), rtol=1e-13)


def test_literal_transcriptions_agree_with_accurate_forms():
    z = np.linspace(-5, 5, 41)
    for y in (0.0, 1.0, 0.3):
        yy = np.full_like(z, y)
        for gamma, alpha in ((2.0, 0.25), (0.5, 0.6), (0.0, 0.25)):
            np.testing.assert_allclose(R.ps_focal(z, yy, gamma, alpha)[0],
                                       R.torchvision_sigmoid_focal_loss(z, yy, alpha, gamma),
                                       rtol=1e-9, atol=1e-300)
    r = np.linspace(-30, 30, 121)
    np.testing.assert_allclose(R.log_cosh_accurate(r), R.optax_log_cosh(r), rtol=1e-12, atol=1e-15)
    f = np.linspace(-3, 3, 13)
    for s in (-1.0, 1.0):
        np.testing.assert_array_equal(R.ps_hinge(f, np.full_like(f, s))[0], R.optax_hinge_loss(f, s))
    for r in (1e-8, 1e-4, 0.5, 5.0, 1e3, -1e3):
        assert abs(R.log_cosh_accurate(r) - R.mp_log_cosh(r)[0]) <= 4e-16 * R.mp_log_cosh(r)[0]


# --------------------------------------------------------------------------------------
# Gradients against central finite differences (float64, away from kinks)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradient_matches_finite_differences(case):
    """d(sum)/dx from value_and_grad against central differences of the per-sample values.

    Samples are independent (no loss here couples a batch), so the differences are taken
    for all samples at once (R.central_fd_per_sample): two calls per input, or two per
    column for vector losses.
    """
    name, params = case
    kind = R.SIGNATURES[name][3]
    inputs, targets, weight = R.make_case(name, np.float64, SEEDS[_case_id(case)] + 7, params)
    f = load(name)
    v, grads = f.value_and_grad(*inputs, *targets, reduction="sum", weight=weight, **params)
    # the function being differenced is the right one
    ref_v, _ = R.numpy_reference(name, inputs, targets, "none", weight, **params)
    v_none = f(*inputs, *targets, reduction="none", weight=weight, **params)
    assert_close(v_none, ref_v, np.float64, f"{name} {params}: per-sample values")
    assert_close(v, ref_v.sum(), np.float64, f"{name} {params}: summed value")
    for j, x in enumerate(inputs):
        def fn(xj, j=j):
            args = list(inputs)
            args[j] = xj
            return f(*args, *targets, reduction="none", weight=weight, **params)

        fd = R.central_fd_per_sample(fn, x, kind)
        np.testing.assert_allclose(grads[j], fd, rtol=1e-6, atol=1e-7,
                                   err_msg=f"{name} {params}: d/d{R.SIGNATURES[name][0][j]}")


# --------------------------------------------------------------------------------------
# Shapes, layouts, signatures, ignore_index
# --------------------------------------------------------------------------------------

def test_library_signatures():
    names = set(lossdsl.names())
    assert set(R.SIGNATURES) <= names, f"missing from the library: {set(R.SIGNATURES) - names}"
    for name, (inputs, targets, params, _) in R.SIGNATURES.items():
        f = load(name)
        assert tuple(f.inputs) == inputs, (name, f.inputs)
        assert tuple(f.targets) == targets, (name, f.targets)
        assert set(f.params) == set(params), (name, f.params)
        for k, d in params.items():
            assert float(f.params[k]) == d, (name, k, f.params[k])


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (1,)], ids=["1d", "3d", "single"])
@pytest.mark.parametrize("name", ["bce", "mse", "gaussian_nll", "log_cosh", "l2_penalty"])
def test_scalar_losses_take_any_shape(name, shape):
    inputs, targets, weight = R.make_case(name, np.float64, 11, shape=shape)
    f = load(name)
    for reduction in REDUCTIONS:
        v, v2, grads = run_both(f, inputs, targets, reduction=reduction, weight=weight)
        check_output_types(name, v, grads, inputs, np.float64, reduction)
        ref_v, ref_g = R.numpy_reference(name, inputs, targets, reduction, weight)
        assert_close(v, ref_v, np.float64, f"{name} {shape} {reduction}")
        for g, rg in zip(grads, ref_g):
            assert_close(g, rg, np.float64, f"{name} {shape} {reduction} grad")


@pytest.mark.parametrize("name", ["mse", "cross_entropy", "gaussian_nll", "kl_div"])
def test_non_contiguous_arrays(name):
    inputs, targets, weight = R.make_case(name, np.float64, 12)
    # the same values, laid out as strided views of larger arrays
    def strided(a):
        if not np.issubdtype(a.dtype, np.floating):
            big = np.zeros(a.shape + (2,), dtype=a.dtype)
            big[..., 1] = a
            return big[..., 1]
        big = np.zeros(a.shape[::-1] + (2,), dtype=a.dtype)
        big[..., 0] = a.T
        return big[..., 0].T

    s_in = tuple(strided(a) for a in inputs)
    s_tg = tuple(strided(a) for a in targets)
    s_w = strided(weight)
    assert not s_in[0].flags.c_contiguous
    f = load(name)
    v, grads = f.value_and_grad(*s_in, *s_tg, reduction="none", weight=s_w)
    ref_v, ref_g = R.numpy_reference(name, inputs, targets, "none", weight)
    assert_close(v, ref_v, np.float64, f"{name} strided")
    for g, rg in zip(grads, ref_g):
        assert_close(g, rg, np.float64, f"{name} strided grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", sorted(R.CLASS_TARGET))
def test_ignored_rows_are_exactly_zero(name, dtype):
    inputs, targets, weight = R.make_case(name, dtype, 13, {"ignore_index": 3})
    y = targets[0].copy()
    y[[0, 5]] = 3
    y[[1, 2]] = 1  # keep some rows
    f = load(name)
    v, (g,) = f.value_and_grad(inputs[0], y, reduction="none", weight=weight, ignore_index=3)
    ign = y == 3
    assert np.all(np.asarray(v)[ign] == 0), v
    assert np.all(np.asarray(g)[ign] == 0), g
    vm = f(inputs[0], y, reduction="mean", weight=weight, ignore_index=3)
    ref, _ = R.numpy_reference(name, inputs, (y,), "mean", weight, ignore_index=3)
    assert_close(vm, ref, dtype, f"{name}: mean over the kept rows ({int((~ign).sum())})")


def test_cross_entropy_ignore_index_outside_classes():
    """torch's convention: ignore_index=-100 marks rows whose label is not a class at all."""
    inputs, targets, weight = R.make_case("cross_entropy", np.float64, 14)
    y = targets[0].copy()
    y[[2, 3]] = -100
    f = load("cross_entropy")
    for reduction in REDUCTIONS:
        v, (g,) = f.value_and_grad(inputs[0], y, reduction=reduction, weight=weight,
                                   ignore_index=-100, label_smoothing=0.1)
        ref_v, (ref_g,) = R.numpy_reference("cross_entropy", inputs, (y,), reduction, weight,
                                            ignore_index=-100, label_smoothing=0.1)
        assert_close(v, ref_v, np.float64, f"cross_entropy ignore_index=-100 {reduction}")
        assert_close(g, ref_g, np.float64, f"cross_entropy ignore_index=-100 {reduction} grad")
        if R.torch_available():
            tv, (tg,) = R.torch_reference("cross_entropy", inputs, (y,), reduction, weight,
                                          ignore_index=-100, label_smoothing=0.1)
            assert_close(v, tv, np.float64, "vs torch")
            assert_close(g, tg, np.float64, "vs torch grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_subgradient_at_kinks_is_zero(dtype):
    """LANGUAGE.md §1: the subgradient of abs and of max(0, x) at the kink is 0."""
    x = np.array([0.5, -1.25, 3.0], dtype=dtype)
    v, (g,) = load("mae").value_and_grad(x, x.copy(), reduction="none")
    assert np.all(np.asarray(v) == 0) and np.all(np.asarray(g) == 0), (v, g)
    f = np.array([1.0, -1.0, -0.5, 2.0], dtype=dtype)
    y = np.array([1.0, -1.0, -1.0, 1.0], dtype=dtype)  # margins 0, 0, 0.5, -1
    v, (g,) = load("hinge").value_and_grad(f, y, reduction="none")
    np.testing.assert_array_equal(v, np.array([0.0, 0.0, 0.5, 0.0], dtype=dtype))
    np.testing.assert_array_equal(g, np.array([0.0, 0.0, 1.0, 0.0], dtype=dtype))
    z = np.array([[2.0, 1.0, 0.0, -1.0, -2.0],     # 1 - 2 + 1 = 0: at the kink
                  [0.0, 3.0, 0.5, -1.0, 1.0]], dtype=dtype)  # 1 - 0 + 3 = 4
    v, (g,) = load("multiclass_hinge").value_and_grad(z, np.array([0, 0]), reduction="none")
    np.testing.assert_array_equal(v, np.array([0.0, 4.0], dtype=dtype))
    np.testing.assert_array_equal(g, np.array([[0, 0, 0, 0, 0], [-1, 1, 0, 0, 0]], dtype=dtype))


# --------------------------------------------------------------------------------------
# Extreme inputs: the right finite numbers
# --------------------------------------------------------------------------------------

def eps(dtype):
    return float(np.finfo(dtype).eps)


def tiny(dtype):
    return float(np.finfo(dtype).tiny)


@pytest.mark.parametrize("pos_weight", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bce_extreme_logits(dtype, pos_weight):
    zs = [1000.0, -1000.0, 1e4, -1e4, 30.0, -30.0, 0.0]
    ys = [0.0, 1.0, 0.3]
    Z, Y = np.meshgrid(np.array(zs, dtype), np.array(ys, dtype), indexing="ij")
    truth = np.array([[R.mp_bce(z, y, pos_weight) for y in Y[0]] for z in Z[:, 0]])
    tv, tg = truth[..., 0], truth[..., 1]
    f = load("bce")
    v, (g,) = f.value_and_grad(Z, Y, reduction="none", pos_weight=pos_weight)
    v1 = f(Z, Y, reduction="none", pos_weight=pos_weight)
    for got in (v, v1):
        assert np.all(np.isfinite(got)), got
        # values to relative accuracy (bce(30, 1) = softplus(-30) ≈ 9.4e-14 included)
        np.testing.assert_allclose(got, tv, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=tiny(dtype), err_msg=f"bce values, z×y = {zs}×{ys}")
    assert np.all(np.isfinite(g)), g
    # d/dz = -pw·y·σ(-z) + (1-y)·σ(z) (= σ(z) - y for pw = 1), to the precision of the dtype
    np.testing.assert_allclose(g, tg, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=4 * eps(dtype) * pos_weight, err_msg="bce gradients")
    # exact known values
    assert float(v[0, 0]) == 1000.0 and float(v[2, 0]) == 1e4  # bce(1000, 0), bce(1e4, 0)
    assert np.isclose(float(v[1, 1]), 1000.0 * pos_weight, rtol=4 * eps(dtype))  # bce(-1000, 1)
    for reduction in ("mean", "sum"):
        vr, (gr,) = f.value_and_grad(Z, Y, reduction=reduction, pos_weight=pos_weight)
        expect = tv.sum() / (tv.size if reduction == "mean" else 1)
        assert np.isfinite(vr) and np.all(np.isfinite(gr))
        np.testing.assert_allclose(vr, expect, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_huge_logits(dtype, label_smoothing):
    rng = np.random.default_rng(21)
    z = (rng.normal(0, 1, (R.N, R.K)) * 1e4).astype(dtype)
    y = rng.integers(0, R.K, R.N)
    y[0] = int(np.argmax(z[0]))  # a row with (almost) zero loss
    f = load("cross_entropy")
    ref_v, (ref_g,) = R.numpy_reference("cross_entropy", (z,), (y,), "none",
                                        label_smoothing=label_smoothing)
    v, (g,) = f.value_and_grad(z, y, reduction="none", label_smoothing=label_smoothing)
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(g)), (v, g)
    scale = float(np.max(np.abs(z)))
    np.testing.assert_allclose(v, ref_v, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=8 * eps(dtype) * scale)
    np.testing.assert_allclose(g, ref_g, atol=8 * eps(dtype))
    vm, (gm,) = f.value_and_grad(z, y, reduction="mean", label_smoothing=label_smoothing)
    assert np.isfinite(vm) and np.all(np.isfinite(gm))
    np.testing.assert_allclose(vm, ref_v.mean(), rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cross_entropy_neg_inf_logits_are_masks(dtype, reduction):
    inf = np.inf
    z = np.array([
        [1.0, -inf, 2.0, -inf, 0.5],     # target 0, two masked classes
        [0.3, -inf, -inf, 1.2, -inf],    # target 3
        [-inf, -inf, 4.0, -inf, -inf],   # target the only finite class: loss 0, grad 0
        [0.1, -0.2, 0.3, 0.0, -1.0],     # no mask
        [-inf, 5.0, -inf, -inf, -3.0],   # target 4, not the max
    ], dtype=dtype)
    y = np.array([0, 3, 2, 1, 4])
    w = np.array([1.0, 0.5, 2.0, 1.5, 0.7], dtype=dtype)
    f = load("cross_entropy")
    v, (g,) = f.value_and_grad(z, y, reduction=reduction, weight=w)
    ref_v, (ref_g,) = R.numpy_reference("cross_entropy", (z,), (y,), reduction, w)
    assert np.all(np.isfinite(v)), v
    assert np.all(np.isfinite(g)), g
    masked = np.isneginf(z)
    assert np.all(np.asarray(g)[masked] == 0), f"gradient of masked classes: {g[masked]}"
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(v, ref_v, rtol=rtol, atol=8 * eps(dtype))
    np.testing.assert_allclose(g, ref_g, rtol=rtol, atol=8 * eps(dtype))
    if reduction == "none":
        assert abs(float(v[2])) <= 8 * eps(dtype), f"only-finite-class row: loss {v[2]}"
        assert np.all(np.abs(g[2]) <= 8 * eps(dtype)), f"only-finite-class row: grad {g[2]}"


@pytest.mark.parametrize("gamma", [0.5, 0.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_focal_extreme_logits(dtype, gamma):
    zs = [-1000.0, -100.0, -30.0, -5.0, 5.0, 30.0, 100.0, 1000.0]
    Z, Y = np.meshgrid(np.array(zs, dtype), np.array([0.0, 1.0], dtype), indexing="ij")
    truth = np.array([[R.mp_focal(z, y, gamma, 0.25) for y in Y[0]] for z in Z[:, 0]])
    f = load("focal")
    v, (g,) = f.value_and_grad(Z, Y, reduction="none", gamma=gamma)
    assert np.all(np.isfinite(v)), f"focal gamma={gamma}: values {v}"
    assert np.all(np.isfinite(g)), f"focal gamma={gamma}: gradients {g}"
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(v, truth[..., 0], rtol=rtol, atol=eps(dtype),
                               err_msg=f"focal gamma={gamma} values at z×y = {zs}×{{0,1}}")
    np.testing.assert_allclose(g, truth[..., 1], rtol=rtol, atol=eps(dtype),
                               err_msg=f"focal gamma={gamma} gradients at z×y = {zs}×{{0,1}}")
    # misclassified at -1000 with y = 1: alpha·1000
    assert np.isclose(float(v[0, 1]), 250.0, rtol=4 * eps(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_log_cosh_accuracy(dtype):
    if dtype == np.float32:
        rs = [1e-4, -1e-4, 3e-3, 0.5, -2.0, 10.0, 1e3, -1e3]
    else:
        rs = [1e-8, -1e-4, 3e-3, 0.5, 10.0, 1e3, 1e5, -1e5]
    yhat = np.array(rs, dtype=dtype)
    y = np.zeros_like(yhat)
    truth = np.array([R.mp_log_cosh(float(r)) for r in yhat])
    f = load("log_cosh")
    v, (g,) = f.value_and_grad(yhat, y, reduction="none")
    ulps = 4 * eps(dtype)
    np.testing.assert_allclose(v, truth[:, 0], rtol=ulps, atol=0,
                               err_msg=f"log cosh at {rs} (truth {truth[:, 0]})")
    np.testing.assert_allclose(g, truth[:, 1], rtol=ulps, atol=0, err_msg=f"tanh at {rs}")
    # the residual is yhat - y: same numbers with the roles shifted
    v2, (g2,) = f.value_and_grad(np.zeros_like(yhat), -yhat, reduction="none")
    np.testing.assert_allclose(v2, truth[:, 0], rtol=ulps, atol=0)
    np.testing.assert_allclose(g2, truth[:, 1], rtol=ulps, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kl_div_zero_target_probabilities(dtype, reduction):
    rng = np.random.default_rng(31)
    z = rng.normal(0, 2, (4, R.K)).astype(dtype)
    p = np.array([[0.5, 0.0, 0.5, 0.0, 0.0],
                  [0.0, 0.0, 1.0, 0.0, 0.0],
                  [0.2, 0.2, 0.2, 0.2, 0.2],
                  [0.0, 0.7, 0.0, 0.3, 0.0]], dtype=dtype)
    f = load("kl_div")
    v, (g,) = f.value_and_grad(z, p, reduction=reduction)
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(g)), (v, g)
    ref_v, (ref_g,) = R.numpy_reference("kl_div", (z,), (p,), reduction)
    assert_close(v, ref_v, dtype, "kl_div value vs numpy")
    assert_close(g, ref_g, dtype, "kl_div grad vs numpy")
    tv, (tg,) = R.torch_reference("kl_div", (z,), (p,), reduction)  # skips without torch
    assert_close(v, tv, dtype, "kl_div value vs torch")
    assert_close(g, tg, dtype, "kl_div grad vs torch")


# --------------------------------------------------------------------------------------
# Errors: LossError naming the loss and the argument
# --------------------------------------------------------------------------------------

def _a(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(dtype)


def _unit(shape, dtype=np.float64):
    return np.random.default_rng(1).uniform(0, 1, shape).astype(dtype)


def _classes(*vals):
    return np.array(vals, dtype=np.int64)


def _unit_with(shape, at, value):
    y = _unit(shape)
    y[at] = value
    return y


_Z = _a((7, 5))
_Y_OK = _classes(0, 1, 2, 3, 4, 0, 1)

# (id, loss, args, kwargs, words): each word (or one of a tuple of alternatives) must
# appear in the message as a whole word
ERROR_CASES = [
    ("class_target_equal_K", "cross_entropy", (_Z, _classes(0, 1, 5, 3, 4, 0, 1)), {},
     ["cross_entropy", "y"]),
    ("class_target_negative", "cross_entropy", (_Z, _classes(0, 1, -1, 3, 4, 0, 1)), {},
     ["cross_entropy", "y"]),
    ("class_target_huge", "multiclass_hinge", (_Z, _classes(0, 1, 2, 3, 4, 0, 10**6)), {},
     ["multiclass_hinge", "y"]),
    ("class_target_float", "cross_entropy", (_Z, _Y_OK.astype(np.float64)), {},
     ["cross_entropy", "y"]),
    ("vector_target_above_1", "multilabel_bce", (_Z, _unit_with((7, 5), (3, 2), 1.5)), {},
     ["multilabel_bce", "y", "1.5"]),
    ("vector_target_nan", "vae_elbo", (_Z, _a((7, 2)), _a((7, 2)), _unit_with((7, 5), (6, 4), np.nan)), {},
     ["vae_elbo", "x", "nan"]),
    ("shape_scalar", "mse", (_a((4, 6)), _a((6, 4))), {}, ["mse", ("y", "yhat")]),
    ("shape_rows", "cross_entropy", (_Z, _classes(0, 1, 2, 3, 4, 0)), {},
     ["cross_entropy", ("y", "z")]),
    ("shape_vector_target", "multilabel_bce", (_Z, _unit((7, 4))), {},
     ["multilabel_bce", ("y", "z")]),
    ("shape_second_input", "gaussian_nll", (_a((4, 6)), _a((4, 5)), _a((4, 6))), {},
     ["gaussian_nll", ("logvar", "mu")]),
    ("shape_weight", "bce", (_a((4, 6)), _unit((4, 6))), {"weight": np.ones(3)},
     ["bce", "weight"]),
    ("shape_weight_vector", "cross_entropy", (_Z, _Y_OK), {"weight": np.ones((7, 5))},
     ["cross_entropy", "weight"]),
    ("dtype_float16", "bce", (_a((4, 6), np.float16), _unit((4, 6), np.float16)), {},
     ["bce", ("z", "y")]),
    ("dtype_float16_input_only", "bce", (_a((4, 6), np.float16), _unit((4, 6))), {},
     ["bce", "z"]),
    ("dtype_int", "mse", (np.arange(6), np.arange(6.0)), {}, ["mse", "yhat"]),
    ("dtype_int_vector", "soft_cross_entropy", (np.ones((7, 5), dtype=np.int64), _unit((7, 5))),
     {}, ["soft_cross_entropy", "z"]),
    ("dtype_mixed_inputs", "gaussian_nll",
     (_a((4, 6), np.float32), _a((4, 6), np.float64), _a((4, 6), np.float32)), {},
     ["gaussian_nll", ("mu", "logvar")]),
    ("domain_huber_delta_negative", "huber", (_a(6), _a(6, seed=1)), {"delta": -1.0},
     ["huber", "delta"]),
    ("domain_huber_delta_zero", "huber", (_a(6), _a(6, seed=1)), {"delta": 0.0},
     ["huber", "delta"]),
    ("domain_focal_gamma_negative", "focal", (_a(6), _unit(6)), {"gamma": -1.0},
     ["focal", "gamma"]),
    ("domain_focal_alpha_above_1", "focal", (_a(6), _unit(6)), {"alpha": 1.5},
     ["focal", "alpha"]),
    ("domain_label_smoothing", "cross_entropy", (_Z, _Y_OK), {"label_smoothing": 1.5},
     ["cross_entropy", "label_smoothing"]),
    ("domain_smooth_l1_beta", "smooth_l1", (_a(6), _a(6, seed=1)), {"beta": -0.5},
     ["smooth_l1", "beta"]),
    ("unknown_param", "bce", (_a(6), _unit(6)), {"gamma": 2.0}, ["bce", "gamma"]),
    ("unknown_param_no_params", "mse", (_a(6), _a(6, seed=1)), {"delta": 1.0}, ["mse", "delta"]),
    ("too_few_args", "bce", (_a(6),), {}, ["bce", "y"]),
    ("too_few_args_two_inputs", "gaussian_nll", (_a(6), _a(6, seed=1)), {},
     ["gaussian_nll", "y"]),
    ("too_many_args", "bce", (_a(6), _unit(6), _unit(6)), {}, ["bce"]),
    ("too_many_args_no_target", "l2_penalty", (_a(6), _a(6, seed=1)), {}, ["l2_penalty"]),
    ("ignore_index_without_class_target", "bce", (_a(6), _unit(6)), {"ignore_index": 0},
     ["bce", "ignore_index"]),
    ("bad_reduction", "mse", (_a(6), _a(6, seed=1)), {"reduction": "avg"}, ["mse", "reduction"]),
    ("ignore_index_fraction", "cross_entropy", (_Z, _Y_OK), {"ignore_index": 2.5},
     ["cross_entropy", "ignore_index"]),
    ("ignore_index_text", "cross_entropy", (_Z, _Y_OK), {"ignore_index": "none"},
     ["cross_entropy", "ignore_index"]),
]


@pytest.mark.parametrize("method", ["call", "value_and_grad"])
@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_loss_and_the_argument(case, method):
    _, name, args, kwargs, words = case
    f = load(name)
    fn = f if method == "call" else f.value_and_grad
    with pytest.raises(lossdsl.LossError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    for word in words:
        alts = word if isinstance(word, tuple) else (word,)
        assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(a)}(?![A-Za-z0-9_])", msg)
                   for a in alts), f"message does not name {' or '.join(alts)!r}: {msg!r}"


def test_error_family():
    assert issubclass(lossdsl.LossError, Exception)
    with pytest.raises(lossdsl.LossError):
        lossdsl.load("no_such_loss")


# --------------------------------------------------------------------------------------
# NaN propagates
# --------------------------------------------------------------------------------------

NAN_CASES = [(name, 0) for name in R.SIGNATURES] + [("gaussian_nll", 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,which", NAN_CASES,
                         ids=[f"{n}-{R.SIGNATURES[n][0][i]}" for n, i in NAN_CASES])
def test_nan_input_gives_nan(name, which, dtype):
    inputs, targets, _ = R.make_case(name, dtype, 41)
    inputs = [a.copy() for a in inputs]
    kind = R.SIGNATURES[name][3]
    if kind == "scalar":
        where = (1, 2)
    else:
        # a class that is neither the target nor the largest other logit, so that a max
        # or a select that compares instead of propagating would drop it
        row = inputs[0][1]
        y = int(targets[0][1]) if name in R.CLASS_TARGET else int(np.argmax(row))
        order = [j for j in np.argsort(row) if j != y]
        where = (1, int(order[0]))
    inputs[which][where] = np.nan
    f = load(name)
    for reduction in ("mean", "sum"):
        v = f(*inputs, *targets, reduction=reduction)
        assert np.isnan(v), f"{name}: NaN in {R.SIGNATURES[name][0][which]} gave {reduction} {v}"
    v = np.asarray(f(*inputs, *targets, reduction="none"))
    sample = where if kind == "scalar" else where[0]
    assert np.isnan(v[sample]), f"{name}: NaN input gave per-sample loss {v[sample]}"
    others = np.ones(v.shape, dtype=bool)
    others[sample] = False
    assert np.all(np.isfinite(v[others])), f"{name}: NaN leaked into other samples: {v}"
    vg, _ = f.value_and_grad(*inputs, *targets, reduction="mean")
    assert np.isnan(vg), f"{name}: value_and_grad dropped the NaN: {vg}"


@pytest.mark.parametrize("name", ["mse", "mae", "huber", "smooth_l1", "log_cosh", "gaussian_nll"])
def test_nan_real_target_gives_nan(name):
    inputs, targets, _ = R.make_case(name, np.float64, 42)
    targets = [a.copy() for a in targets]
    targets[0][0, 0] = np.nan
    f = load(name)
    v = np.asarray(f(*inputs, *targets, reduction="none"))
    assert np.isnan(v[0, 0]) and np.isnan(f(*inputs, *targets)), v


def test_in_kernel_sum_is_accurate():
    """mean and sum are summed inside the kernel (float64 per block, in float32 runs of 64 samples
    first, 8 to a vector lane, then pairwise, like numpy's pairwise sum): within a few ulps of
    math.fsum where a running sum in the dtype is far off (float32's stays at 2^24: + 1 rounds back)."""
    import math
    f = load("mae")
    n = 1 << 18
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        # large + many small (first, and anywhere), values spread over 16 decades
        big = np.ones(n, dtype)
        big[0] = 2.0 ** (np.finfo(dtype).nmant + 1)
        spread = (rng.random(n) * 10.0 ** rng.integers(-8, 9, n)).astype(dtype)
        lognormal = np.concatenate([[1e12], rng.lognormal(0, 3, n - 1)]).astype(dtype)
        for x in (big, rng.permutation(big), spread, lognormal, rng.permutation(lognormal)):
            exact = math.fsum(x.astype(np.float64))
            got = f(x, np.zeros_like(x), reduction="sum")
            assert abs(float(got) - exact) <= 8 * np.spacing(dtype(exact)), (dtype, got, exact)
            mean = f(x, np.zeros_like(x))
            assert abs(float(mean) - exact / n) <= 8 * np.spacing(dtype(exact / n)), (dtype, mean, exact / n)
        for x in (big, spread):     # where the test has teeth: a running sum is 100+ ulps off
            exact = math.fsum(x.astype(np.float64))
            assert abs(float(np.cumsum(x)[-1]) - exact) > 100 * np.spacing(dtype(exact))
    # the same sum through weights (the weighted losses are what is summed)
    w = rng.random(n)
    got = float(f(spread, np.zeros_like(spread), weight=w, reduction="sum"))
    exact = math.fsum(spread * w)
    assert abs(got - exact) <= 8 * np.spacing(exact), (got, exact)
