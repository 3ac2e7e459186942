"""Interval arithmetic over mpmath's libmp, and correct rounding to a float format.

A value is an exact ``Fraction``, an ``Iv`` (a closed interval of raw libmp mpf tuples, both ends
finite, computed with directed rounding: the kernels behind ``mpmath.iv``) or ``NAN``. Inputs
are floats, hence dyadic rationals, and ``+ - * /`` and integer powers of rationals stay
``Fraction`` (while they stay small) until a transcendental function needs an interval, so
comparisons of exact values are decided exactly. ``Arithmetic`` holds the operations at a
working precision ``prec``; one that cannot decide at that precision (a sign, a comparison)
raises ``_Imprecise`` so that the caller raises the precision, and one without a mathematical
value raises ``NoTruth``.

Rounding is to nearest, ties to even, in a format given as (precision, emin, emax).
"""
import functools
import math
from fractions import Fraction

import numpy as np
from mpmath.libmp import (fnan, fone, fzero, from_man_exp, from_rational, mpf_add, mpf_cmp, mpf_div, mpf_exp,
                          mpf_log, mpf_mul, mpf_neg, mpf_shift, mpf_sign, mpf_sqrt, mpf_sub, mpi_mul, mpi_pow_int,
                          round_ceiling, round_floor, to_str)

__all__ = ["FORMATS", "NAN", "Iv", "Arithmetic", "NoTruth", "round_to"]

# target float formats: (precision in bits incl. the hidden one, emin, emax)
FORMATS = {"float64": (53, -1022, 1023), "float32": (24, -126, 127)}
_FL, _CE = round_floor, round_ceiling
_FRACTION_BITS = 20000     # an exact rational larger than this becomes an interval


class NoTruth(Exception):
    """The math has no value here (log of a negative, 0/0, an undecidable tie...)."""


class _Imprecise(Exception):
    """The working precision cannot decide: raise it."""


_VERY_NEGATIVE = from_man_exp(-1, 14)          # -16384
_LOG2E_LO, _LOG2E_HI = from_rational(144, 100, 64, _FL), from_rational(145, 100, 64, _CE)


def _floor_int(x):
    sign, man, exp, _ = x
    v = (-man if sign else man)
    return v << exp if exp >= 0 else v >> -exp          # >> floors negative numbers too


def _ceil_int(x):
    sign, man, exp, bc = x
    return -_floor_int((sign ^ 1, man, exp, bc))


class _NaNType:
    __slots__ = ()

    def __repr__(self):
        return "NaN"


NAN = _NaNType()


class Iv:
    """A closed interval [lo, hi] of mpf values (raw libmp tuples), both finite."""
    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def __repr__(self):
        return f"[{to_str(self.lo, 20)}, {to_str(self.hi, 20)}]"


# --- rounding to a float format -------------------------------------------------------------
def _inf(neg):
    return -math.inf if neg else math.inf


def _round_ratio(neg, n, d, fmt):
    """n/d (n, d > 0 integers) rounded to nearest-even in ``fmt``, as a Python float."""
    p, emin, emax = fmt
    e0 = n.bit_length() - d.bit_length()
    # floor(log2(n/d)) is e0 or e0 - 1
    e = e0 if (n << max(0, -e0)) >= (d << max(0, e0)) else e0 - 1
    if e > emax:
        return _inf(neg)
    q = max(e - p + 1, emin - p + 1)              # the quantum (ulp) at that binade
    if q <= 0:
        num, den = n << -q, d
    else:
        num, den = n, d << q
    k, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and k & 1):
        k += 1
    if k and k.bit_length() + q - 1 > emax:        # rounded up past the largest float
        return _inf(neg)
    v = math.ldexp(k, q)
    return -v if neg else v


def _round_fraction(q, fmt):
    return _round_ratio(q < 0, abs(q.numerator), q.denominator, fmt) if q else 0.0


def _round_mpf(x, fmt):
    if x == fzero:
        return 0.0
    if x == fnan:
        return math.nan
    sign, man, exp, bc = x
    if not man:                                     # ±inf
        return _inf(sign)
    p, emin, emax = fmt
    top = exp + bc - 1                              # x in [2^top, 2^(top+1))
    if top > emax:
        return _inf(sign)
    if top < emin - p - 1:                          # below half the smallest subnormal
        return -0.0 if sign else 0.0
    if exp >= 0:
        return _round_ratio(bool(sign), man << exp, 1, fmt)
    return _round_ratio(bool(sign), man, 1 << -exp, fmt)


def _rounded(v, fmt):
    """A value (NAN, a Fraction or an Iv) rounded to ``fmt``; None where the two ends of the
    interval round to different floats (more precision needed)."""
    if v is NAN:
        return math.nan
    if isinstance(v, Fraction):
        return _round_fraction(v, fmt)
    lo, hi = _round_mpf(v.lo, fmt), _round_mpf(v.hi, fmt)
    if lo == hi:
        return hi if hi != 0 or math.copysign(1, lo) == math.copysign(1, hi) else 0.0
    return None


def round_to(value, dtype="float64"):
    """A Fraction, an mpf tuple, an mpmath ``mpf`` or an int, rounded to nearest-even in ``dtype``."""
    fmt = FORMATS[str(np.dtype(dtype))]
    if isinstance(value, (int, Fraction)):
        return _round_fraction(Fraction(value), fmt)
    if hasattr(value, "_mpf_"):
        value = value._mpf_
    return _round_mpf(value, fmt)


# --- values: Fraction (exact), Iv (interval) or NAN -------------------------------------------
def _is_dyadic(q):
    d = q.denominator
    return d & (d - 1) == 0


def _iv(v, prec):
    if isinstance(v, Iv):
        return v
    if _is_dyadic(v):
        m = from_man_exp(v.numerator, -(v.denominator.bit_length() - 1))
        return Iv(m, m)
    return Iv(from_rational(v.numerator, v.denominator, prec, _FL),
              from_rational(v.numerator, v.denominator, prec, _CE))


def _small(q):
    return q.numerator.bit_length() + q.denominator.bit_length() < _FRACTION_BITS


def _exact_zero(v):
    return isinstance(v, Fraction) and v == 0


def _sgn(v):
    """-1, 0, 1 for a decidable sign; raises _Imprecise if the interval straddles 0."""
    if isinstance(v, Fraction):
        return (v > 0) - (v < 0)
    if mpf_sign(v.lo) > 0:
        return 1
    if mpf_sign(v.hi) < 0:
        return -1
    raise _Imprecise


def _pointwise(at_zero=None):
    """A method of one value: NaN in gives NaN out, and with ``at_zero`` an exact 0 in gives that
    exact value out (f(0) is exact, so no interval is needed)."""
    def wrap(f):
        @functools.wraps(f)
        def method(self, a):
            if a is NAN:
                return NAN
            if at_zero is not None and _exact_zero(a):
                return at_zero
            return f(self, a)
        return method
    return wrap


def _binary(f):
    """A method of two values (and maybe options): NaN in either gives NaN out."""
    @functools.wraps(f)
    def method(self, a, b, *rest):
        if a is NAN or b is NAN:
            return NAN
        return f(self, a, b, *rest)
    return method


class Arithmetic:
    """The operations on values at the working precision ``self.prec`` (bits)."""

    prec = 64

    def _increasing(self, f, a):
        """[f(lo), f(hi)] rounded outwards, for an increasing libmp function ``f(x, prec, rnd)``."""
        return Iv(f(a.lo, self.prec, _FL), f(a.hi, self.prec, _CE))

    def _exact(self, q):
        """An exact result: kept a Fraction while it is small, an interval past that."""
        return q if _small(q) else _iv(q, self.prec)

    # arithmetic ------------------------------------------------------------------------------
    @_binary
    def add(self, a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return self._exact(a + b)
        a, b = _iv(a, self.prec), _iv(b, self.prec)
        return Iv(mpf_add(a.lo, b.lo, self.prec, _FL), mpf_add(a.hi, b.hi, self.prec, _CE))

    @_pointwise()
    def neg(self, a):
        if isinstance(a, Fraction):
            return -a
        return Iv(mpf_neg(a.hi), mpf_neg(a.lo))

    def sub(self, a, b):
        return self.add(a, self.neg(b))

    @_binary
    def mul(self, a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return self._exact(a * b)
        if _exact_zero(a) or _exact_zero(b):
            return Fraction(0)
        a, b = _iv(a, self.prec), _iv(b, self.prec)
        lo, hi = mpi_mul((a.lo, a.hi), (b.lo, b.hi), self.prec)
        return Iv(lo, hi)

    @_pointwise()
    def inv(self, a):
        if isinstance(a, Fraction):
            if a == 0:
                raise NoTruth("division by zero")
            return 1 / a
        _sgn(a)                           # an interval containing 0 needs more precision
        return self.inv_pos(a)

    @_binary
    def div(self, a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            if b == 0:
                raise NoTruth("division by zero")
            return self._exact(a / b)
        if _exact_zero(a):
            if _exact_zero(b):
                raise NoTruth("0/0")
            _sgn(b)
            return Fraction(0)
        if _exact_zero(b):
            raise NoTruth("division by zero")
        b = _iv(b, self.prec)
        if _sgn(b) > 0:
            a = _iv(a, self.prec)
            return self._div_pos(a, b)
        a = _iv(a, self.prec)
        return self.neg(self._div_pos(a, self.neg(b)))

    def _div_pos(self, a, b):
        p = self.prec
        lo = mpf_div(a.lo, b.hi if mpf_sign(a.lo) >= 0 else b.lo, p, _FL)
        hi = mpf_div(a.hi, b.lo if mpf_sign(a.hi) >= 0 else b.hi, p, _CE)
        return Iv(lo, hi)

    @_binary
    def pow(self, base, ex):
        if isinstance(ex, Fraction) and ex.denominator == 1:
            n = int(ex)
            if isinstance(base, Fraction):
                if base == 0 and n < 0:
                    raise NoTruth("0 to a negative power")
                if abs(n) * max(1, base.numerator.bit_length() + base.denominator.bit_length()) < _FRACTION_BITS:
                    return base ** n
            if n < 0:
                return self.inv(self.pow(base, Fraction(-n)))
            b = _iv(base, self.prec)
            lo, hi = mpi_pow_int((b.lo, b.hi), n, self.prec)
            return Iv(lo, hi)
        if isinstance(ex, Fraction) and ex == Fraction(1, 2):
            return self.sqrt(base)
        if _exact_zero(base):
            s = _sgn(ex)
            if s > 0:
                return Fraction(0)
            raise NoTruth("0 to a non-positive power")
        if _sgn(base) < 0:
            raise NoTruth("a negative number to a non-integer power")
        if _exact_zero(ex):
            return Fraction(1)
        return self.exp(self.mul(ex, self.log(base)))

    # elementary functions ----------------------------------------------------------------------
    @_pointwise(at_zero=Fraction(1))
    def exp(self, a):
        a = _iv(a, self.prec)
        if mpf_cmp(a.hi, _VERY_NEGATIVE) < 0:
            # e^x < 2^-23000: bound it by powers of two (1.44 < log2 e < 1.45), cheap at any
            # precision and tight enough for anything a float can show (the limit at -inf)
            lo = mpf_mul(a.lo, _LOG2E_HI, 64, _FL)
            hi = mpf_mul(a.hi, _LOG2E_LO, 64, _CE)
            return Iv(from_man_exp(1, _floor_int(lo)), from_man_exp(1, _ceil_int(hi)))
        return Iv(self._exp_end(a.lo, _FL), self._exp_end(a.hi, _CE))

    def _exp_end(self, x, rnd):
        """e^x rounded in direction ``rnd``. For tiny x mpmath rounds e^x to 1 both ways
        (mpf_exp(3.8e-26, 70, ceiling) is 1, so e^x - 1 came out exactly 0): 1 + x <= e^x <= 1 + 2x
        for 0 <= x <= 1, and 1 + x <= e^x <= 1 + x/2 for -1 <= x <= 0."""
        if self._tiny(x):
            up = mpf_add(x, x, 0) if mpf_sign(x) > 0 else mpf_shift(x, -1)
            return mpf_add(fone, x, self.prec, _FL) if rnd == _FL else mpf_add(fone, up, self.prec, _CE)
        return mpf_exp(x, self.prec, rnd)

    @_pointwise()
    def log(self, a):
        if isinstance(a, Fraction):
            if a <= 0:
                raise NoTruth("log of a non-positive number")
            if a == 1:
                return Fraction(0)
        s = _sgn(a)
        if s <= 0:
            raise NoTruth("log of a non-positive number")
        a = _iv(a, self.prec)
        if mpf_sign(a.lo) <= 0:
            raise _Imprecise
        return self._increasing(mpf_log, a)

    def _tiny(self, x):
        """|x| < 2^-(prec + 8): too small for 1 + x to be worth forming exactly."""
        return x[2] + x[3] < -(self.prec + 8)

    @_pointwise(at_zero=Fraction(0))
    def log1p(self, a):
        a = _iv(a, self.prec)
        hi = self._log1p_end(a.hi, _CE)
        if hi is None:
            raise NoTruth("log1p of a number <= -1")
        lo = self._log1p_end(a.lo, _FL)
        if lo is None:
            raise _Imprecise
        return Iv(lo, hi)

    def _log1p_end(self, x, rnd):
        """log1p(x) rounded in direction ``rnd``; None where 1 + x <= 0."""
        if x == fzero:
            return fzero
        if self._tiny(x):
            # |x| tiny: x/(1+x) <= log1p(x) <= x, and the exact 1 + x would be huge
            return x if rnd == _CE else mpf_div(x, mpf_add(fone, x, self.prec, _CE), self.prec, _FL)
        s = mpf_add(fone, x, self.prec + max(0, -(x[2] + x[3])) + 20, rnd)
        if mpf_sign(s) <= 0:
            return None
        return mpf_log(s, self.prec, rnd)

    @_pointwise(at_zero=Fraction(0))
    def expm1(self, a):
        a = _iv(a, self.prec)
        return Iv(self._expm1_end(a.lo, _FL), self._expm1_end(a.hi, _CE))

    def _expm1_end(self, x, rnd):
        """expm1(x) rounded in direction ``rnd``."""
        if x == fzero:
            return fzero
        if self._tiny(x):
            # |x| tiny: x <= expm1(x) <= x + 2x²
            return x if rnd == _FL else mpf_add(x, mpf_mul(x, mpf_add(x, x, 0), self.prec, _CE), self.prec, _CE)
        # e^x - 1 with the subtraction's cancellation paid for by extra working precision
        wp = self.prec + max(0, -(x[2] + x[3])) + 10
        return mpf_sub(mpf_exp(x, wp, rnd), fone, self.prec, rnd)

    @_pointwise(at_zero=Fraction(0))
    def sqrt(self, a):
        s = _sgn(a)
        if s < 0:
            raise NoTruth("sqrt of a negative number")
        return self._increasing(mpf_sqrt, _iv(a, self.prec))

    @_pointwise()
    def abs(self, a):
        if isinstance(a, Fraction):
            return abs(a)
        if mpf_sign(a.lo) >= 0:
            return a
        if mpf_sign(a.hi) <= 0:
            return self.neg(a)
        hi = a.hi if mpf_cmp(a.hi, mpf_neg(a.lo)) >= 0 else mpf_neg(a.lo)
        return Iv(fzero, hi)

    @_pointwise()
    def sign(self, a):
        return Fraction(_sgn(a))

    @_pointwise(at_zero=Fraction(1, 2))
    def sigmoid(self, a):
        return self.inv_pos(self.add(Fraction(1), self.exp(self.neg(a))))

    def inv_pos(self, a):
        """1/a for an a known not to contain 0 (the ends swap, whatever the sign)."""
        a = _iv(a, self.prec)
        return Iv(mpf_div(fone, a.hi, self.prec, _FL), mpf_div(fone, a.lo, self.prec, _CE))

    @_pointwise()
    def softplus(self, a):
        return self.log1p(self.exp(a))

    def _odd(self, a, f):
        """An odd function of a nonzero a, as ±f(|a|): f is monotone with no cancellation there."""
        s = _sgn(a)
        t = f(self.abs(a))
        return t if s > 0 else self.neg(t)

    @_pointwise(at_zero=Fraction(0))
    def tanh(self, a):
        # tanh(|x|) = E/(E + 2), E = expm1(2|x|) >= 0: monotone pieces, no cancellation
        def f(m):
            e = self.expm1(self.mul(Fraction(2), m))
            return self.div(e, self.add(e, Fraction(2)))
        return self._odd(a, f)

    @_pointwise(at_zero=Fraction(0))
    def sinh(self, a):
        def f(m):
            e = self.expm1(m)                      # sinh(|x|) = (E + E/(E + 1))/2
            return self.mul(Fraction(1, 2), self.add(e, self.div(e, self.add(e, Fraction(1)))))
        return self._odd(a, f)

    @_pointwise(at_zero=Fraction(1))
    def cosh(self, a):
        m = self.abs(a)
        return self.mul(Fraction(1, 2), self.add(self.exp(m), self.exp(self.neg(m))))

    @_pointwise(at_zero=Fraction(0))
    def logcosh(self, a):
        # log cosh x = log1p(2 sinh²(x/2)): relative accuracy near 0, no overflow far out
        sh = self.sinh(self.mul(Fraction(1, 2), a))
        return self.log1p(self.mul(Fraction(2), self.pow(sh, Fraction(2))))

    @_binary
    def max2(self, a, b, smaller=False):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return min(a, b) if smaller else max(a, b)
        a, b = _iv(a, self.prec), _iv(b, self.prec)
        pick = (lambda x, y: x if mpf_cmp(x, y) <= 0 else y) if smaller else \
               (lambda x, y: x if mpf_cmp(x, y) >= 0 else y)
        return Iv(pick(a.lo, b.lo), pick(a.hi, b.hi))

    # comparisons: True / False / NAN, or _Imprecise -----------------------------------------------
    def compare(self, op, a, b):
        if a is NAN or b is NAN:
            return NAN
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return _OPS[op](a, b)
        a, b = _iv(a, self.prec), _iv(b, self.prec)
        if op in ("==", "!="):
            if mpf_cmp(a.hi, b.lo) < 0 or mpf_cmp(b.hi, a.lo) < 0:
                return op == "!="
            if a.lo == a.hi == b.lo == b.hi:
                return op == "=="
            raise _Imprecise
        if op in (">", ">="):
            a, b, op = b, a, "<" if op == ">" else "<="
        # a < b or a <= b
        if mpf_cmp(a.hi, b.lo) < 0:
            return True
        if mpf_cmp(a.lo, b.hi) > 0:
            return False
        if a.lo == a.hi == b.lo == b.hi:
            return op == "<="
        raise _Imprecise


_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
