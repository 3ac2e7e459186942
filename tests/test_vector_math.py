"""The polynomial helpers of the CPU back end (vector_math.EXP32 and EXP64: _exp, _expm1, _log, ...),
which replace libm's scalar calls so that LLVM vectorizes the kernels' loops: their error in ulps
over a sample of all float32 bit patterns, against numpy's float64 functions (correctly rounded
to within 2^-29 float32 ulp), and against mpmath at the edges of their ranges; the float64 ones
against mpmath at 130 bits over bit patterns, realistic values and the special cases."""
import math

import mpmath
import numba
import numpy as np
import pytest
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

from lossdsl.vector_math import EXP32, EXP64

# helper -> (float64 reference, largest error in ulps of the float32 result)
HELPERS = {"exp": (np.exp, 1.0), "expm1": (np.expm1, 0.501), "log": (np.log, 1.0),
           "log1p": (np.log1p, 1.5), "tanh": (np.tanh, 2.0), "sinh": (np.sinh, 3.0)}


def _compiled(src, dtype, names=tuple(HELPERS)):
    """{name: f(x) applying _name over an array}, compiled as a kernel loop (vectorized, with the
    kernels' fast-math flags)."""
    ns = {"math": math, "numba": numba, "np": np, "types": types, "intrinsic": intrinsic,
          "llvm_ir": llvm_ir, "F": dtype}
    exec(src + "".join(f'''
@numba.njit(error_model="numpy", fastmath={{'nsz', 'contract'}})
def map_{name}(x, out):
    for i in range(x.size):
        out[i] = _{name}(x[i])
''' for name in names), ns)

    def apply(name, x):
        x = np.asarray(x, dtype)
        out = np.empty_like(x)
        ns["map_" + name](x, out)
        return out
    return lambda name: (lambda x: apply(name, x))


@pytest.fixture(scope="module")
def helpers():
    return _compiled(EXP32, np.float32)


def _sample():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2 ** 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1.1754942e-38, -1.0, 1.0, 2.0 ** -25,
               -(2.0 ** -25), 88.72283, 88.72284, -17.32868, -20.0, -103.97, -87.33655, 0.34657359, -0.34657359]
    return np.concatenate([bits.view(np.float32), np.float32(special)])


def _ulps(got, want):
    """|got - want| in ulps of want rounded to float32 (want in float64)."""
    with np.errstate(all="ignore"):
        return np.abs(got.astype(np.float64) - want) / np.spacing(np.abs(want.astype(np.float32))).astype(np.float64)


@pytest.mark.parametrize("name", HELPERS)
def test_helper_within_its_ulps_on_bit_patterns(helpers, name):
    ref, bound = HELPERS[name]
    x = _sample()
    got = helpers(name)(x)
    with np.errstate(all="ignore"):
        want = ref(x.astype(np.float64))
        want32 = want.astype(np.float32)
    finite = np.isfinite(want32) & (want32 != 0)
    worst = np.nanmax(_ulps(got[finite], want[finite]))
    assert worst <= bound, f"_{name}: {worst:.3f} ulps"
    # where the result rounds to 0 or ±inf, or is NaN: exactly that, with the sign of a zero
    same = (got == want32) & (np.signbit(got) == np.signbit(want32)) | np.isnan(got) & np.isnan(want32)
    assert same[~finite].all(), (x[~finite][~same[~finite]][:5], got[~finite][~same[~finite]][:5])


def test_expm1_special_cases(helpers):
    expm1 = helpers("expm1")
    x = np.float32([-np.inf, np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45, 1e-20, -3e-8, 89.0, 1e30, -1e30])
    got = expm1(x)
    want = np.float32([-1.0, np.inf, np.nan, 0.0, -0.0, 1e-45, -1e-45, 1e-20, -3e-8, np.inf, np.inf, -1.0])
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[4]) and not np.signbit(got[3])


def test_expm1_against_mpmath_at_the_edges(helpers):
    """Around the overflow threshold (88.7228), where the result reaches -1, near the reduction's
    boundaries ±ln2/2 and for tiny x: within half an ulp (plus the double's 1e-3) of the truth."""
    x = np.concatenate([np.float32(88.72283) + np.arange(-3, 1, dtype=np.float32) * np.float32(7.6e-6),
                        np.float32([-17.32868, -17.3, -16.6, 0.3465735, 0.3465736, -0.3465735, 1.0397207,
                                    2.0 ** -24, -(2.0 ** -24), 2.0 ** -12, -0.5, 1.5, 20.0, 60.0])])
    got = helpers("expm1")(x)
    with mpmath.workprec(200):
        want = np.array([float(mpmath.expm1(mpmath.mpf(float(v)))) for v in x])
    assert np.all(np.isfinite(got))
    assert np.max(_ulps(got, want)) <= 0.501


def test_float32_kernels_call_no_libm_expm1():
    import lossdsl
    src = lossdsl.load("vae_elbo").source("cpu", "float32")
    assert "math.expm1(" not in src and "_expm1(" in src


# ---- float64 (EXP64): mpmath truth, max error 1 ulp (the kernels' accuracy audit allows 1 bit)

MP = {"exp": mpmath.exp, "expm1": mpmath.expm1, "log": mpmath.log, "log1p": mpmath.log1p,
      "tanh": mpmath.tanh, "sinh": mpmath.sinh, "sinh_small": mpmath.sinh}


@pytest.fixture(scope="module")
def helpers64():
    return _compiled(EXP64, np.float64, tuple(HELPERS) + ("sinh_small",))


def _sample64(name):
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2 ** 64, 2000, dtype=np.uint64).view(np.float64)
    values = rng.uniform(-1, 1, 2000) * 10.0 ** rng.integers(-4, 3, 2000)   # |x| from 1e-4 to 100
    near = rng.uniform(-1.1, 1.1, 1000)          # the reduction boundaries ±ln2/2, the pair cancellations
    edges = np.concatenate([np.linspace(-745.2, -700, 300), np.linspace(700, 710.5, 300),
                            np.float64([2.0 ** -1074, 2.0 ** -1022, 1e-300, 2.0 ** -54, 1.1e-16, 0.34657359027997264,
                                        -0.34657359027997264, 0.6931471805599453, 709.782712893384, -708.3964185322641,
                                        -745.1332191019411, 19.06, 22.0, 22.000000000000004, 36.7, 37.5])])
    x = np.concatenate([bits, values, near, edges, -edges])
    if name in ("log", "log1p"):                 # also their whole domain, subnormals included
        x = np.concatenate([x, np.abs(bits), np.abs(values) - 1.0 if name == "log1p" else np.abs(values)])
    return x[np.isfinite(x)]


def _truth(name, x):
    """The truth rounded to nearest (want) and its rounding residual truth - want, as floats."""
    want, resid = np.empty_like(x), np.zeros_like(x)
    with mpmath.workprec(130):
        for i, v in enumerate(x.tolist()):
            if name in ("log", "log1p") and v <= (0.0 if name == "log" else -1.0):
                want[i] = -np.inf if v == (0.0 if name == "log" else -1.0) else np.nan
                continue
            t = MP[name](mpmath.mpf(v))
            w = mpmath.libmp.to_float(t._mpf_, rnd="n")      # float(t) rounds down
            want[i] = w
            if math.isfinite(w):
                resid[i] = float(t - mpmath.mpf(w))
    return want, resid


@pytest.mark.parametrize("name", list(HELPERS) + ["sinh_small"])
def test_float64_helper_within_1_ulp_of_mpmath(helpers64, name):
    x = _sample64(name)
    if name == "sinh_small":                     # its domain: |x| <= 0.5 (_logcosh's half angle)
        x = np.concatenate([x[np.abs(x) <= 0.5], np.linspace(-0.5, 0.5, 2001)])
    got = helpers64(name)(x)
    want, resid = _truth(name, x)
    finite = np.isfinite(want) & (want != 0)
    with np.errstate(all="ignore"):
        ulps = np.abs((got - want) - resid) / np.spacing(np.abs(want))
    bad = finite & ~(ulps <= 1.0)                # NaN counts as bad
    assert not bad.any(), f"_{name}: {np.nanmax(ulps[finite]):.3f} ulps at {x[bad][:4]}"
    # where the truth rounds to 0 or ±inf, or is NaN: exactly that, with the sign of a zero
    same = (got == want) & (np.signbit(got) == np.signbit(want)) | np.isnan(got) & np.isnan(want)
    assert same[~finite].all(), (x[~finite][~same[~finite]][:5], got[~finite][~same[~finite]][:5])


INF, NAN, TINY = np.inf, np.nan, 2.0 ** -1074
SPECIAL64 = {
    "exp": [(-INF, 0.0), (INF, INF), (NAN, NAN), (0.0, 1.0), (-0.0, 1.0), (TINY, 1.0), (710.0, INF),
            (1e300, INF), (-746.0, 0.0), (-1e300, 0.0)],
    "expm1": [(-INF, -1.0), (INF, INF), (NAN, NAN), (0.0, 0.0), (-0.0, -0.0), (TINY, TINY), (-TINY, -TINY),
              (-40.0, -1.0), (-1e300, -1.0), (710.0, INF), (1e300, INF)],
    "log": [(0.0, -INF), (-0.0, -INF), (-TINY, NAN), (-1.0, NAN), (-INF, NAN), (INF, INF), (NAN, NAN), (1.0, 0.0)],
    "log1p": [(-1.0, -INF), (-1.0000000000000002, NAN), (-INF, NAN), (INF, INF), (NAN, NAN), (0.0, 0.0),
              (-0.0, -0.0), (TINY, TINY), (-TINY, -TINY)],
    "tanh": [(0.0, 0.0), (-0.0, -0.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN), (TINY, TINY), (-TINY, -TINY),
             (20.0, 1.0), (-1e300, -1.0)],
    "sinh": [(0.0, 0.0), (-0.0, -0.0), (INF, INF), (-INF, -INF), (NAN, NAN), (TINY, TINY), (-TINY, -TINY),
             (710.5, INF), (-711.0, -INF), (1e300, INF)],
}


@pytest.mark.parametrize("name", list(HELPERS))
def test_float64_special_cases(helpers64, name):
    x, want = np.float64(SPECIAL64[name]).T
    got = helpers64(name)(x)
    np.testing.assert_array_equal(got, want)
    assert (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all(), (x, got)


def test_float64_kernels_call_no_libm():
    import lossdsl
    for name in ("cross_entropy", "log_cosh", "vae_elbo", "kl_div"):
        src = lossdsl.load(name).source("cpu", "float64")
        assert not any(f"math.{f}(" in src for f in HELPERS), name
