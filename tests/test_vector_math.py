"""The float32 polynomial helpers of the CPU back end (render_cpu.EXP32: _exp, _expm1, _log, ...),
which replace libm's scalar calls so that LLVM vectorizes the kernels' loops: their error in ulps
over a sample of all float32 bit patterns, against numpy's float64 functions (correctly rounded
to within 2^-29 float32 ulp), and against mpmath at the edges of their ranges."""
import math

import mpmath
import numba
import numpy as np
import pytest
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

from lossdsl.render_cpu import EXP32

# helper -> (float64 reference, largest error in ulps of the float32 result)
HELPERS = {"exp": (np.exp, 1.0), "expm1": (np.expm1, 0.501), "log": (np.log, 1.0),
           "log1p": (np.log1p, 1.5), "tanh": (np.tanh, 2.0), "sinh": (np.sinh, 3.0)}


@pytest.fixture(scope="module")
def helpers():
    """{name: f(x) applying _name over a float32 array}, compiled as a kernel loop (vectorized)."""
    ns = {"math": math, "numba": numba, "np": np, "types": types, "intrinsic": intrinsic,
          "llvm_ir": llvm_ir, "F": np.float32}
    src = EXP32 + "".join(f'''
@numba.njit(error_model="numpy", fastmath={{'nsz', 'contract'}})
def map_{name}(x, out):
    for i in range(x.size):
        out[i] = _{name}(x[i])
''' for name in HELPERS)
    exec(src, ns)

    def apply(name, x):
        out = np.empty_like(x)
        ns["map_" + name](x, out)
        return out
    return lambda name: (lambda x: apply(name, np.asarray(x, np.float32)))


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
