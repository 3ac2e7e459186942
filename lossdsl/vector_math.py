"""Math helpers of the CPU back end as source text for the generated modules (render_cpu).

pip's llvmlite has no vector libm (SVML): a libm call keeps a kernel's loop scalar. These are
branch-free polynomials with exponent-bit tricks (selects, not branches) that LLVM inlines and
vectorizes: EXP32 for float32 kernels, EXP64 for float64 ones. Both define _exp, _expm1, _log,
_log1p, _tanh and _sinh; the modules define F (the dtype), np, math, numba, types, intrinsic and
llvm_ir.
"""

EXP32 = '''
@intrinsic
def _f32_from_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(error_model="numpy")
def _exp(x):
    # Cephes expf, written so LLVM vectorizes it (pip's llvmlite has no SVML): x = n ln2 + r,
    # |r| <= ln2/2, a degree-7 polynomial for e^r, and 2^n as two exponent-bit factors so that
    # subnormal results and overflow to inf stay right. Within 1 ulp of the rounded truth.
    c = min(max(x, F(-104.0)), F(89.0))
    n = np.floor(c * F(1.4426950408889634) + F(0.5))
    r = c - n * F(0.693359375) - n * F(-2.12194440e-4)
    p = (((((F(1.9875691500E-4) * r + F(1.3981999507E-3)) * r + F(8.3334519073E-3)) * r
           + F(4.1665795894E-2)) * r + F(1.6666665459E-1)) * r + F(5.0000001201E-1)) * (r * r) + r + F(1.0)
    ni = np.int32(n)
    h = ni >> 1
    s1 = _f32_from_bits((h + np.int32(127)) << np.int32(23))
    s2 = _f32_from_bits((ni - h + np.int32(127)) << np.int32(23))
    out = p * s1 * s2
    return out if x == x else x


@intrinsic
def _bits_of_f32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], llvm_ir.IntType(32))
    return types.int32(types.float32), codegen


@numba.njit(error_model="numpy")
def _logf(u):
    # Cephes logf of u > 0, exponent and mantissa from the bits (vectorizable; libm's logf is a
    # scalar call); _log and _log1p add the special cases
    tiny = u < F(1.1754944e-38)
    us = u * F(16777216.0) if tiny else u
    bits = _bits_of_f32(us)
    e = ((bits >> np.int32(23)) & np.int32(255)) - np.int32(126) - (np.int32(24) if tiny else np.int32(0))
    m = _f32_from_bits((bits & np.int32(-2139095041)) | np.int32(1056964608))   # mantissa in [0.5, 1)
    small = m < F(0.70710678118654752)
    e = e - (np.int32(1) if small else np.int32(0))
    m = (m + m - F(1.0)) if small else (m - F(1.0))
    fe = F(e)
    z = m * m
    y = ((((((((F(7.0376836292E-2) * m - F(1.1514610310E-1)) * m + F(1.1676998740E-1)) * m
              - F(1.2420140846E-1)) * m + F(1.4249322787E-1)) * m - F(1.6668057665E-1)) * m
           + F(2.0000714765E-1)) * m - F(2.4999993993E-1)) * m + F(3.3333331174E-1)) * m * z
    y = y + fe * F(-2.12194440e-4) - F(0.5) * z
    return m + y + fe * F(0.693359375)


@numba.njit(error_model="numpy")
def _log(x):
    r = _logf(x)
    if x == F(0.0):
        return F(-math.inf)
    if not (x > F(0.0)):       # negative, and NaN
        return F(math.nan)
    return x if x == F(math.inf) else r


@numba.njit(error_model="numpy")
def _log1p(x):
    # log u of u = 1 + x, plus the rounding error of 1 + x, (x - (u - 1)) / u, so small x keep
    # full relative accuracy
    u = F(1.0) + x
    r = _logf(u) + (x - (u - F(1.0))) / u
    if x == F(-1.0):
        return F(-math.inf)
    if not (x > F(-1.0)):      # below -1, and NaN
        return F(math.nan)
    return x if x == F(math.inf) or x == F(0.0) else r     # log1p(-0) is -0


@numba.njit(error_model="numpy")
def _expm1(x):
    # e^x - 1 in double, vectorizable (libm's expm1f is a scalar call): x = n ln2 + r, |r| <= ln2/2,
    # e^r - 1 by its Taylor series to r^9 (relative error 2e-11), then 2^n (e^r - 1) + (2^n - 1),
    # which double keeps free of cancellation; one rounding to float32: within 0.501 ulp.
    # Below -20 the result rounds to -1, above 88.73 to inf; ±0 and NaN are returned as they are.
    c = np.float64(min(max(x, F(-20.0)), F(89.0)))
    n = np.floor(c * 1.4426950408889634 + 0.5)
    r = c - n * 0.6931471805599453
    p = r * (1.0 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 + r * (
        1 / 5040 + r * (1 / 40320 + r * (1 / 362880)))))))))
    ni = np.int32(n)
    h = ni >> 1
    s = (np.float64(_f32_from_bits((h + np.int32(127)) << np.int32(23)))
         * np.float64(_f32_from_bits((ni - h + np.int32(127)) << np.int32(23))))
    out = F(s * p + (s - 1.0))
    return out if x == x and x != F(0.0) else x


@numba.njit(error_model="numpy", forceinline=True)
def _tanh(x):
    # Cephes tanhf, branch-free so LLVM vectorizes it (libm's tanhf is a scalar call): x + x z P(z),
    # z = x^2, for |x| < 0.625, else sign(x) (1 - 2/(e^(2|x|) + 1)); within 2 ulp.
    a = abs(x)
    z = x * x
    p = ((((F(-5.70498872745E-3) * z + F(2.06390887954E-2)) * z - F(5.37397155531E-2)) * z
          + F(1.33314422036E-1)) * z - F(3.33332819422E-1)) * z * x + x
    q = F(1.0) - F(2.0) / (_exp(F(2.0) * min(a, F(44.0))) + F(1.0))     # tanh is 1 from |x| = 9 on
    q = q if x >= F(0.0) else -q
    return x if x == F(0.0) or x != x else (p if a < F(0.625) else q)     # tanh(-0) is -0


@numba.njit(error_model="numpy", forceinline=True)
def _sinh(x):
    # Cephes sinhf, vectorizable: x + x z P(z) for |x| <= 1, else sign(x) (e^|x|/2 - e^-|x|/2) with
    # e^|x|/2 as (e^(|x|/2)/2) e^(|x|/2), which overflows only where sinh does.
    a = abs(x)
    z = x * x
    p = ((F(2.03721912945E-4) * z + F(8.33028376239E-3)) * z + F(1.66667160211E-1)) * z * x + x
    h = _exp(F(0.5) * a)
    q = (F(0.5) * h) * h - F(0.5) / (h * h)
    q = q if x >= F(0.0) else -q
    return p if a <= F(1.0) else (q if x == x else x)
'''


# float64: the helpers EXP32 writes as polynomials are libm calls (accurate, and fast enough in double)
EXP64 = "".join(f'''
@numba.njit(error_model="numpy")
def _{name}(x):
    return math.{name}(x)

''' for name in ("exp", "expm1", "log", "log1p", "tanh", "sinh"))
