"""Math helpers of the CPU back end as source text for the generated modules (render_cpu).

pip's llvmlite has no vector libm (SVML): a libm call keeps a kernel's loop scalar. These are
branch-free polynomials with exponent-bit tricks (selects, not branches) that LLVM inlines and
vectorizes: EXP32 for float32 kernels, EXP64 for float64 ones. Both define _exp, _expm1, _log,
_log1p, _tanh and _sinh; the modules define F (the dtype), np, math, numba, types, intrinsic and
llvm_ir.
"""


def _bitcast(name, llvm_type, signature):
    """The source of an intrinsic that reads a value's bits as another type (exponent tricks)."""
    return f'''
@intrinsic
def {name}(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], {llvm_type})
    return {signature}, codegen

'''


EXP32 = (_bitcast("_f32_from_bits", "llvm_ir.FloatType()", "types.float32(types.int32)")
         + _bitcast("_bits_of_f32", "llvm_ir.IntType(32)", "types.int32(types.float32)") + '''
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
    # z = x^2, for |x| < 0.625, else sign(x) (1 - e)/(1 + e), e = e^(-2|x|) <= 0.29 (no cancellation;
    # within 2 ulp). The same e^(-2|x|) as _logcosh's: LLVM computes it once for log_cosh's value
    # and gradient.
    a = abs(x)
    z = x * x
    p = ((((F(-5.70498872745E-3) * z + F(2.06390887954E-2)) * z - F(5.37397155531E-2)) * z
          + F(1.33314422036E-1)) * z - F(3.33332819422E-1)) * z * x + x
    e = _exp(F(-2.0) * a)
    q = (F(1.0) - e) / (F(1.0) + e)
    q = q if x >= F(0.0) else -q
    return x if x == F(0.0) or x != x else (p if a < F(0.625) else q)     # tanh(-0) is -0


@numba.njit(error_model="numpy", forceinline=True)
def _sinh_small(x):
    # sinh of |x| <= 1 alone: x + x z P(z), z = x^2 (Cephes sinhf); no exponential, for _logcosh's
    # half angle
    z = x * x
    return ((F(2.03721912945E-4) * z + F(8.33028376239E-3)) * z + F(1.66667160211E-1)) * z * x + x


@numba.njit(error_model="numpy", forceinline=True)
def _sinh(x):
    # Cephes sinhf, vectorizable: the polynomial for |x| <= 1, else sign(x) (e^|x|/2 - e^-|x|/2)
    # with e^|x|/2 as (e^(|x|/2)/2) e^(|x|/2), which overflows only where sinh does.
    a = abs(x)
    h = _exp(F(0.5) * a)
    q = (F(0.5) * h) * h - F(0.5) / (h * h)
    q = q if x >= F(0.0) else -q
    return _sinh_small(x) if a <= F(1.0) else (q if x == x else x)
''')

# float64: the algorithms of Cephes/FreeBSD msun/musl, written branch-free so that LLVM vectorizes
# them (libm's exp, log1p, tanh are scalar calls: cross_entropy, bce, log_cosh ran 0.3-0.8x the peers).
# All are forceinline: above LLVM's inlining threshold a helper stays a call, and the loop scalar.
EXP64 = (_bitcast("_f64_from_bits", "llvm_ir.DoubleType()", "types.float64(types.int64)")
         + _bitcast("_bits_of_f64", "llvm_ir.IntType(64)", "types.int64(types.float64)") + '''
@intrinsic
def _fma(typingctx, a, b, c):
    # a*b + c rounded once (llvm.fma: one instruction where the CPU has FMA, x86-64 since Haswell;
    # elsewhere LLVM calls libm's fma, exact but slow)
    def codegen(context, builder, sig, args):
        d = llvm_ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], llvm_ir.FunctionType(d, [d, d, d]))
        return builder.call(fn, args)
    return types.float64(types.float64, types.float64, types.float64), codegen


@numba.njit(error_model="numpy", forceinline=True)
def _two_sum(a, b):
    # s + e = a + b exactly (Knuth's TwoSum, no order needed)
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@numba.njit(error_model="numpy", forceinline=True)
def _expk(x):
    # e^x = (sh + sl) 2^n, |sh + sl| within 2^-60 of the truth, sh in [0.7, 1.42], 2^n = s1 s2 (two
    # exponent-bit factors: subnormal results and overflow stay right). Tang's table-free reduction:
    # n = round(x/ln2) by the 1.5*2^52 shifter (no float-int conversion), x - n ln2 = hi - lo with
    # ln2 in two parts (n ln2_hi and hi exact, as in msun), r = hi - lo and its rounding error cc;
    # e^r = 1 + r + r^2 Q(r), Q a degree-10 Chebyshev fit on |r| <= ln2/2 (error 2^-58).
    c = min(max(x, -746.0), 711.0)
    t = c * 1.4426950408889634 + 6755399441055744.0
    n = t - 6755399441055744.0
    ni = _bits_of_f64(t) - np.int64(0x4338000000000000)
    hi = c - n * 6.93147180369123816490e-01
    lo = n * 1.90821492927058770002e-10
    r = hi - lo
    cc = (hi - r) - lo
    q = (((((((((2.0914679595617734e-09 * r + 2.510520668068106e-08) * r + 2.7557273660822466e-07) * r
              + 2.7557255425009614e-06) * r + 2.480158732553378e-05) * r + 0.00019841269874801073) * r
           + 0.0013888888888883752) * r + 0.008333333333326141) * r + 0.04166666666666667) * r
         + 0.1666666666666667) * r + 0.5
    pl = cc + r * (cc + r * q)         # e^(r + cc) - 1 - r
    s = 1.0 + r
    tl = (r - (s - 1.0)) + pl          # s exact pair (|r| < 1), then the small part
    sh = s + tl
    h = ni >> 1
    return (sh, tl - (sh - s), _f64_from_bits((h + 1023) << 52),
            _f64_from_bits((ni - h + 1023) << 52))


@numba.njit(error_model="numpy", forceinline=True)
def _exp(x):
    sh, sl, s1, s2 = _expk(x)
    out = (sh * s1) * s2
    return out if x == x else x


@numba.njit(error_model="numpy", forceinline=True)
def _exppair(sh, sl, s1, s2):
    # e^x and e^x - 1 as unevaluated pairs (eh + el, nh + nl) from _expk(x), for x below 709
    p2 = s1 * s2
    eh = p2 * sh
    el = p2 * sl
    nh, nl = _two_sum(eh, -1.0)
    nh, nl = _two_sum(nh, nl + el)      # normalized: nh is e^x - 1 rounded, even where eh - 1 cancels
    return eh, el, nh, nl


@numba.njit(error_model="numpy", forceinline=True)
def _expm1(x):
    # e^x - 1 from the exact pair: no cancellation near 0 or where 2^n meets -1 (x near ln2/2);
    # from 700 on it is e^x (2^n alone would overflow)
    sh, sl, s1, s2 = _expk(max(x, -50.0))
    eh, el, nh, nl = _exppair(sh, sl, s1, s2)
    out = nh if x < 700.0 else (sh * s1) * s2
    return out if x == x and x != 0.0 else x       # expm1(-0) is -0


@numba.njit(error_model="numpy", forceinline=True)
def _dd_div(ah, al, bh, bl):
    # (ah + al)/(bh + bl) as q + ql: q near the quotient, ql its remainder by an exact FMA residual
    inv = 1.0 / bh
    q = ah * inv
    rr = _fma(-q, bh, ah) + (al - q * bl)
    return q, rr * inv


@numba.njit(error_model="numpy", forceinline=True)
def _tanh(x):
    # (1 - e)/(1 + e), e = e^(-2|x|): both pairs exact to 2^-60 and a pair division (1 - 2/(e^y + 1)
    # in double loses up to 1.3 ulp at |x| ~ 0.6). e underflows to 0 where tanh rounds to 1. The
    # same _expk(-2|x|) as _logcosh's e^(-2|x|): LLVM computes it once for log_cosh's value and
    # gradient.
    sh, sl, s1, s2 = _expk(F(-2.0) * abs(x))
    eh, el, nh, nl = _exppair(sh, sl, s1, s2)
    dh, dl = _two_sum(eh, 1.0)
    q, ql = _dd_div(nh, nl, dh, dl + el)
    out = -(q + ql)
    out = out if x >= 0.0 else -out
    return x if x == 0.0 or x != x else out       # tanh(-0) is -0


@numba.njit(error_model="numpy", forceinline=True)
def _sinh(x):
    # (N + N/e^y)/2, y = |x|, N = e^y - 1 (no cancellation near 0), in pairs; above y = 22 the
    # e^-y half is below 2^-63 of the result: e^y/2 with the 2^n factors apart, which overflows
    # only where sinh does
    y = abs(x)
    sh, sl, s1, s2 = _expk(y)
    eh, el, nh, nl = _exppair(sh, sl, s1, s2)
    q, ql = _dd_div(nh, nl, eh, el)
    s, e = _two_sum(nh, q)
    out = 0.5 * (s + (e + (nl + ql))) if y <= 22.0 else ((0.5 * sh) * s1) * s2
    out = out if x >= 0.0 else -out
    return x if x == 0.0 or x != x else out


@numba.njit(error_model="numpy", forceinline=True)
def _sinh_small(x):
    # sinh of |x| <= 0.5 alone: x + x z P(z), z = x^2, P a degree-5 Chebyshev fit (error 2^-56); no
    # exponential, for _logcosh's half angle (render_cpu puts it there for float64: log_cosh 1.5x faster)
    z = x * x
    return x + x * z * (((((1.6116496514371548e-10 * z + 2.505194670972162e-08) * z + 2.755731943362024e-06) * z
                          + 0.00019841269841146993) * z + 0.00833333333333336) * z + 0.16666666666666666)


@numba.njit(error_model="numpy", forceinline=True)
def _log_split(u):
    # u > 0 (subnormal too) as 2^k (1 + f), sqrt(2)/2 <= 1 + f < sqrt(2), from the bits (musl's log):
    # k as a double built in the bits of 2^52 + k (no int-float conversion)
    tiny = u < 2.2250738585072014e-308
    ix = _bits_of_f64(u * 18014398509481984.0 if tiny else u) + np.int64(0x95F6200000000)
    dk = (_f64_from_bits((ix >> 52) + np.int64(0x4330000000000000))
          - (4503599627370496.0 + 1023.0 + (54.0 if tiny else 0.0)))
    m = _f64_from_bits((ix & np.int64(0xFFFFFFFFFFFFF)) + np.int64(0x3FE6A09E00000000))
    return dk, m - 1.0


@numba.njit(error_model="numpy", forceinline=True)
def _log_red(dk, f, c):
    # k ln2 + log(1 + f) + c (c: a correction much below the result's ulp), FreeBSD msun e_log.c /
    # musl: s = f/(2 + f), log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), R a degree-7 minimax; < 1 ulp
    hfsq = 0.5 * f * f
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01))
    t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01
                                                                          + w * 1.479819860511658591e-01)))
    return s * (hfsq + t2 + t1) + (dk * 1.90821492927058770002e-10 + c) - hfsq + f + dk * 6.93147180369123816490e-01


@numba.njit(error_model="numpy", forceinline=True)
def _log(x):
    dk, f = _log_split(x)
    r = _log_red(dk, f, 0.0)
    if x == 0.0:
        return -math.inf
    if not (x > 0.0):          # negative, and NaN
        return math.nan
    return x if x == math.inf else r


@numba.njit(error_model="numpy", forceinline=True)
def _log1p(x):
    # musl's log1p: log of u = 1 + x plus the rounding error of u over u; where k = 0, f = x exactly
    u = 1.0 + x
    dk, f = _log_split(u)
    c = (1.0 - (u - x) if dk >= 2.0 else x - (u - 1.0)) / u
    near = dk == 0.0
    r = _log_red(dk, x if near else f, 0.0 if near else c)
    if x == -1.0:
        return -math.inf
    if not (x > -1.0):         # below -1, and NaN
        return math.nan
    return x if x == math.inf or x == 0.0 else r     # log1p(-0) is -0
''')
