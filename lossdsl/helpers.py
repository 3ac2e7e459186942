"""The stable primitives' numba code, which both back ends print into a generated module: each
helper is a plain function of floats (F, the module's float type; W, the type a cancelling sum's
terms are formed in: float64 on the CPU, F on a GPU), decorated by the back end
(render_cpu: numba.njit, some force-inlined; render_cuda: cuda.jit device functions), so the CPU
and CUDA kernels compute the same stable forms. The names are emit.CALLS's."""

HELPERS = '''
@HELPER
def _logcosh(x):
    # log cosh x = log1p(2 sinh^2(x/2)) near 0 (keeps relative accuracy), else |x| + log1p(e^-2|x|) - log 2;
    # one log1p of either argument, with selects, not branches: LLVM vectorizes that
    a = abs(x)
    near = a < F(0.5)
    s = _sinh_small(a * F(0.5))     # each back end's sinh for |x| < 0.25 (float64: a polynomial)
    t = _log1p(F(2.0) * s * s if near else _exp(F(-2.0) * a))
    return t if near else a + t - F(0.6931471805599453)


@HELPER
def _xlogy(x, y):
    if x == 0 and y == y:
        return F(0.0)
    return x * math.log(y)


@HELPER
def _nanflag(x):
    return F(0.0) if x == x else x


@HELPER
def _mul0(a, b):
    return F(0.0) if a == 0 else a * b


@HELPER
def _subpeak(b, m):
    # b - m for m the max of the b: 0 at the max itself, also an infinite one (inf - inf is NaN)
    return F(0.0) if b == m else b - m


@HELPER
def _halfshift(c, b, m, r):
    # (half of c·(b - m + r) formed from halves, c·((b/2 - m/2) + r/2): exact for normal numbers and finite
    # where b - m overflows between finite b and m (logits of both signs near the float max); whether it
    # does). The callers select, not branch, so the row loops that call them vectorize
    d = b - m
    over = (abs(d) == F(math.inf)) & (abs(b) < F(math.inf)) & (abs(m) < F(math.inf))
    return c * ((b * F(0.5) - m * F(0.5)) + r * F(0.5)), over


@HELPER
def _wshift(c, b, m, r):
    # c·(subpeak(b, m) + r), from halves where b - m overflows
    half, over = _halfshift(c, b, m, r)
    return half * F(2.0) if over else c * ((F(0.0) if b == m else b - m) + r)


@HELPER
def _addshift(a, c, b, m, r):
    # _addexp(a, c·(subpeak(b, m) + r)), from halves where b - m overflows and a is finite
    half, over = _halfshift(c, b, m, r)
    plain = _addexp(a, c * ((F(0.0) if b == m else b - m) + r))
    return (a * F(0.5) + half) * F(2.0) if over & (abs(a) < F(math.inf)) else plain


@HELPER
def _expdiff(b, m):
    # e^(b - m) as e^d·(1 + lo), d + lo = b - m exactly (TwoSum): the rounding of d alone costs
    # |d|·ulp/2, 5 bits of the softmax at d = -70. At the max itself it is 1, also where that max is
    # infinite and shared (several +inf logits split the softmax evenly, the limit along equal rates;
    # inf - inf would make the whole row NaN, the finite logits' gradient included)
    d = b - m
    bd = d - b
    lo = (b - (d - bd)) - (m + bd)
    e = _exp(d)
    r = e + e * lo if abs(d) < F(math.inf) else e
    return F(1.0) if b == m else r


@HELPER
def _xexp(x, s):
    # x·e^s; where e^s alone overflows or loses precision (subnormal), (x·e^(s/2))·e^(s/2)
    if x == 0 and s == s:
        return F(0.0)
    if abs(x) == F(math.inf) and s == s:
        # an infinite x as an unboundedly large one against e^s: inf unless s is far below any
        # float's logarithm (e^-1100·|x| is 0 for |x| up to 2^1500), where the exponential wins
        return x if s > F(-1100.0) else F(0.0)
    e = _exp(s)
    if e < F(math.inf) and e > F(1e-30):
        return x * e
    h = _exp(s * F(0.5))
    if h == 0 and x == x:
        return F(0.0)      # s/2 below the underflow: |x|·e^s < 2^1024·e^(2·-745) for every float x
    return x * h * h


@HELPER
def _xexpm1(x, s):
    # x·expm1(s); where expm1(s) alone overflows, x·e^s - x with e^s in halves
    if x == 0 and s == s:
        return F(0.0)
    e = math.expm1(s)
    if e == F(math.inf) and s < F(math.inf) and x == x:
        return _xexp(x, s) - x
    return x * e


@HELPER
def _sqexp(x, s, c):
    # c·x²·e^s as (t·c)·t, t = x·e^(s/2): x² and e^s would overflow or underflow separately (0·inf),
    # and t·t where c·t·t (c = 1/2) does not
    t = _xexp(x, s * F(0.5))
    return (t * c) * t


@HELPER
def _addexp(a, b):
    # a + b, b dominating a (exponential against linear, lse against a mean): at inf - inf, b decides
    s = a + b
    if s != s and a == a and b == b:
        return b
    return s


@HELPER
def _xsq(x, c):
    # c·x² as (x·c)·x: the square alone would round to a subnormal (or overflow) first
    return (x * c) * x


@HELPER
def _xmul(a, b):
    return a * b


@HELPER
def _xpow(c, u, g):
    # c·u^g with c multiplied in before the power completes: (c·u^(g/2))·u^(g/2), one power as before;
    # for g = 1..4 (a call's specialized γ) c·u·u·u, so a constant g folds to the products it was
    if g == F(1.0):
        return c * u
    if g == F(2.0):
        return (c * u) * u
    if g == F(3.0):
        return ((c * u) * u) * u
    if g == F(4.0):
        return (((c * u) * u) * u) * u
    h = u ** (g * F(0.5))
    return (c * h) * h


@HELPER
def _sqdist_fast(a, p, n):
    # (a - p)² - (a - n)² as (n - p)·((a - p) + (a - n)): no square, n - p exact where the distances are
    # close; NaN where that is not _sqdist_diff's value (0 for n ≠ p; NaN): a select, so a sum of it vectorizes.
    # In W, float64 on the CPU whatever F: the terms of a margin cancel (a, p, n in ±1e3: Σ|terms| 360x the
    # sum, 8 bits), and float32 points' differences and products are exact there, so the margin rounds once
    a, p, n = W(a), W(p), W(n)
    r = (n - p) * ((a - p) + (a - n))
    return r if r != 0 or n == p else W(math.nan)


@HELPER
def _sqdist_diff(a, p, n):
    # _sqdist_fast, and where that is NaN: a coordinate where the infinities cancel (n = p, a infinite or all
    # three the same) is 0, not NaN, so the sum of the other coordinates needs no rescue (scaled by 2^-2h,
    # they could underflow)
    r = _sqdist_fast(a, p, n)
    if r == r:
        return r
    if n == p:
        return r if a != a else F(0.0)
    # (a - p) + (a - n) = 0, n - p perhaps overflowing (p = 1.8e308, n = -1.8e308: inf·0): what rounding left of
    # 2a - p - n is the sum of the two differences' rounding errors (TwoSum), exact; 0 where both are
    u, v = a - p, a - n
    if u + v == 0 and abs(u) < F(math.inf):
        e = _twosum_err(a, -p, u) + _twosum_err(a, -n, v)
        return F(0.0) if e == 0 else (n - p) * e
    return (n - p) * (u + v)


@HELPER
def _twosum_err(x, y, s):
    # the rounding error of s = x + y (Knuth's TwoSum)
    yy = s - x
    return (x - (s - yy)) + (y - yy)


@HELPER
def _inf_weight(a, p):
    # (a - p)²/Z² where a or p is infinite (Z): 1, 4 for opposite infinities, 0 for the same one or none
    # (a finite a - p that overflows, ±FLT_MAX, is none: a term of the scaled sum)
    if a == p or abs(a) < F(math.inf) and abs(p) < F(math.inf):
        return F(0.0)
    return F(4.0) if abs(a) == abs(p) else F(1.0)


@HELPER
def _sqdist_diff_small(a, p, n):
    # 4^-h·sqdist_diff from the points shrunk by 2^-h (exact): no term overflows. An infinite coordinate
    # stands for an order of infinity, as in the limit where the infinities are equal: a distance
    # infinite alone (Z²) as its weight times 2^o2, an infinite a alone ((n - p)·2Z) as (n - p)·2^(o1 + 1)
    # (at most 2^c); the sum then keeps the sign of the highest order present (for D < 2^(o2 - c - 2)),
    # and overflow_or's scale-back makes it ±inf.
    h, o1, c, o2 = (F(2.0 ** -100), F(2.0 ** 50), F(2.0 ** 100), F(2.0 ** 110)) if F(1e300) == F(math.inf) \
        else (F(2.0 ** -700), F(2.0 ** 400), F(2.0 ** 850), F(2.0 ** 900))
    big = F(math.inf)
    if abs(a) < big and abs(p) < big and abs(n) < big or a != a or p != p or n != n:
        return _sqdist_diff(a * h, p * h, n * h)
    wu = _inf_weight(a, p)
    wv = _inf_weight(a, n)
    if wu != wv:
        return (wu - wv) * o2
    if wu == 0 or abs(p) == big or abs(n) == big:
        return F(0.0)
    t = min(max(F(2.0) * (n - p) * o1, -c), c)
    return t if a > 0 else -t


@HELPER
def _overflow_or(a, b):
    # a, or where it is not finite (its terms overflowed, or met infinities), b scaled back by 4^h
    if abs(a) < F(math.inf) or a != a and b != b:
        return a
    if F(1e300) == F(math.inf):
        return b * F(2.0 ** 100) * F(2.0 ** 100)
    return b * F(2.0 ** 700) * F(2.0 ** 700)


@HELPER
def _at_peak(a, b, flag):
    return a if flag == 1 else b


@HELPER
def _fsum3(a, b, c):
    # a + b + c with the errors of both additions (TwoSum) added back: any two may cancel. b and c
    # are an element and a max over its array (-z_y, max z): equal infinities there cancel to 0
    if b == -c and abs(c) == F(math.inf):
        return a
    s = a + b
    bs = s - a
    e = (a - (s - bs)) + (b - bs)
    t = s + c
    ct = t - s
    e += (s - (t - ct)) + (c - ct)
    return t + e if abs(t) < F(math.inf) and abs(s) < F(math.inf) else a + b + c


@HELPER
def _xdivy(x, y):
    if x == 0 and y == y:
        return F(0.0)
    return x / y


@HELPER
def _unit(x, n, c, m, q):
    # x/n as (x/m)/q, n = m·q: n overflows or rounds to a subnormal where q, in [1, sqrt(size)], does not;
    # a row with c > 0 infinite coordinates is their unit vector sign/sqrt(c) (inf/inf is NaN)
    if c > 0 and n == n:
        return (F(1.0) if x > 0 else F(-1.0)) / math.sqrt(c) if abs(x) == F(math.inf) else F(0.0)
    if x == 0 and n == n:
        return F(0.0)
    return (x / m) / q


@HELPER
def _isinf(x):
    return F(1.0) if abs(x) == F(math.inf) else F(0.0)


@HELPER
def _max2(a, b):
    if a != a or b != b:
        return a + b
    return a if a >= b else b


@HELPER
def _min2(a, b):
    if a != a or b != b:
        return a + b
    return a if a <= b else b


@HELPER
def _sign(x):
    if x > 0:
        return F(1.0)
    if x < 0:
        return F(-1.0)
    return x * F(0.0)
'''

# What a target's domain allows, as a condition on its value v (NaN never passes).
DOMAIN_CHECKS = {"unit": "({v} >= 0 and {v} <= 1)", "binary": "({v} == 0 or {v} == 1)",
                 "sign": "({v} == 1 or {v} == -1)", "positive": "({v} > 0)", "nonnegative": "({v} >= 0)",
                 "simplex": "({v} >= 0)", "real": None}
