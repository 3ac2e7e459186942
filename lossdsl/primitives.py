"""Stable primitives: sympy Functions that know their derivative and their naive form.

Each elementwise primitive has
  * ``fdiff``  -- a derivative written in stable primitives again (so gradients stay stable),
  * ``naive``  -- the textbook formula, used to show what the stable form buys,
and a printer entry in ``render_cpu`` that emits a branch-guarded implementation.

Reductions (``Sum``, ``LogSumExp``, ``Max``, ``Min``, ``Norm``) are our own nodes rather than
sympy's ``Sum``/``IndexedBase``: differentiating those gives KroneckerDelta/Piecewise soup,
while the chain rule over a reduction's result (``derive``) keeps gradients small.
"""
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

__all__ = ["sigmoid", "softplus", "logcosh", "xlogy", "xdivy", "xexp", "xexpm1", "sqexp", "addexp", "xsq", "xpow", "xmul",
           "sqdist_diff", "sqdist_diff_small", "sqdist_fast", "overflow_or", "at_peak", "Max2", "Min2",
           "log1p", "expm1",
           "Reduce", "Sum", "ScaledSum", "LogSumExp", "Max", "Min", "Norm", "IsArg", "indicator", "REDUCTIONS",
           "substitute", "naive", "expand", "Select", "mul0", "fsum", "nanflag", "subpeak", "wshift", "addshift", "lse_minus",
           "unit", "isinf"]


def _power(text, exp):
    return "%s^{%s}" % (text, exp) if exp else text


def indicator(cond):
    """1 where ``cond`` holds, else 0 (a Piecewise so that sympy and printers understand it)."""
    return sp.Piecewise((sp.S.One, cond), (sp.S.Zero, True))


class _Elementwise(sp.Function):
    is_real = True

    def _latex(self, printer, exp=None):
        args = ", ".join(printer._print(a) for a in self.args)
        return _power(r"\operatorname{%s}\left(%s\right)" % (self.latex_name, args), exp)


class sigmoid(_Elementwise):
    """σ(x) = 1/(1+e^-x); printed with two branches so neither e^x nor e^-x overflows."""
    nargs = 1
    latex_name = r"\sigma"

    def _latex(self, printer, exp=None):
        return _power(r"\sigma\left(%s\right)" % printer._print(self.args[0]), exp)

    def fdiff(self, argindex=1):
        # σ' = σ(x)·σ(-x), not σ(1-σ): 1-σ(40) is 0 in float64, σ(-40) is 4e-18.
        x = self.args[0]
        return sigmoid(x) * sigmoid(-x)

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.Rational(1, 2)

    def naive(self):
        return 1 / (1 + sp.exp(-self.args[0]))

    def expanded(self):
        # e = e^-|x|, r = 1/(1+e): σ(x) = r for x >= 0, e·r below; e and r are shared by CSE
        # with σ(-x) and softplus(±x), so a logit costs one exp.
        x = self.args[0]
        e = sp.exp(-sp.Abs(x))
        r = 1 / (1 + e)
        return Select(r, e * r, x >= 0)


class Select(sp.Function):
    """a if cond else b, evaluated branch-free (both sides are cheap and safe to compute)."""
    nargs = 3
    is_real = True


class softplus(_Elementwise):
    """log(1 + e^x), printed with Mächler's branches (exact to about 1 ulp, never overflows)."""
    nargs = 1
    latex_name = "softplus"

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def naive(self):
        return sp.log(1 + sp.exp(self.args[0]))

    def expanded(self):
        # max(x, 0) + log1p(e^-|x|): never overflows, within an ulp everywhere
        x = self.args[0]
        return Select(x, sp.S.Zero, x > 0) + log1p(sp.exp(-sp.Abs(x)))


class logcosh(_Elementwise):
    """log(cosh x): log1p(2 sinh²(x/2)) near 0 keeps relative accuracy; |x| + softplus(-2|x|) - log 2 far out."""
    nargs = 1
    latex_name = r"\log\cosh"

    def fdiff(self, argindex=1):
        return sp.tanh(self.args[0])

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.S.Zero

    def naive(self):
        return sp.log(sp.cosh(self.args[0]))


class xdivy(_Elementwise):
    """x / y, except 0 where x = 0 (so 0/0 -> 0: the gradient of a norm at zero, of xlogy at 0)."""
    nargs = 2
    latex_name = "xdivy"

    def fdiff(self, argindex=1):
        # where the quotient is defined as 0 (y = 0, so x = 0: a zero vector over its norm),
        # its gradient is defined as 0 too
        x, y = self.args
        # d/dy is -(x/y)/y, not -x/y²: y² overflows for |y| > 1e154 where (x/y)/y does not
        return sp.Piecewise((0, sp.Eq(y, 0)), (1 / y, True)) if argindex == 1 else -xdivy(xdivy(x, y), y)

    def naive(self):
        return self.args[0] / self.args[1]


class unit(_Elementwise):
    """x/n for x a coordinate of a vector with norm n, computed as (x/m)/q with m the largest |coordinate| and
    q the norm of the vector over m (n = m·q, which can overflow or round to a subnormal where q cannot);
    where the vector has c > 0 infinite coordinates, the limit sign(x)/sqrt(c) at those and 0 at the others
    (x/n is inf/inf = NaN there); 0 at x = 0."""
    nargs = 5
    latex_name = "unit"

    def fdiff(self, argindex=1):
        # as xdivy(x, n): c, m and q are n in other forms, their derivatives are carried by n's
        x, n = self.args[:2]
        if argindex == 1:
            return sp.Piecewise((0, sp.Eq(n, 0)), (1 / n, True))
        return -xdivy(self, n) if argindex == 2 else sp.S.Zero

    def naive(self):
        return xdivy(self.args[0], self.args[1])


class _Flag(_Elementwise):
    """A piecewise constant of x, 0 in exact arithmetic (and in the naive form): derivative 0."""
    nargs = 1

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def naive(self):
        return sp.S.Zero


class isinf(_Flag):
    """1 where |x| is infinite, else 0: the count of a unit vector's infinite coordinates."""
    latex_name = "isinf"


class xexp(_Elementwise):
    """x·e^s, with e^s taken in two halves where it alone would overflow or underflow: 5e-324·e^745.13
    is 1.99, not 0·inf; 0 where x = 0."""
    nargs = 2
    latex_name = "xexp"

    def fdiff(self, argindex=1):
        x, s = self.args
        return sp.exp(s) if argindex == 1 else xexp(x, s)

    @classmethod
    def eval(cls, x, s):
        if x.is_zero:
            return sp.S.Zero

    def naive(self):
        return self.args[0] * sp.exp(self.args[1])


class xexpm1(_Elementwise):
    """x·(e^s - 1), where expm1(s) overflows but the product does not: β/2·expm1(logvar) at
    logvar = 709.79 is 9.05e307, not inf."""
    nargs = 2
    latex_name = r"x\operatorname{expm1}"

    def fdiff(self, argindex=1):
        x, s = self.args
        return expm1(s) if argindex == 1 else xexp(x, s)

    @classmethod
    def eval(cls, x, s):
        if x.is_zero:
            return sp.S.Zero

    def naive(self):
        return self.args[0] * (sp.exp(self.args[1]) - 1)


class sqexp(_Elementwise):
    """c·x²·e^s (c ≥ 0 a number), computed as (t·c)·t with t = x·e^(s/2): x² and e^s overflow or underflow
    separately (0·inf) where the product is finite, e.g. the scaled residual (y - μ)²·e^(-logvar) of a
    Gaussian likelihood, and t² overflows where c·t² (its half) does not."""
    nargs = 3
    latex_name = "sqexp"

    def fdiff(self, argindex=1):
        x, s, c = self.args
        if argindex == 1:
            return 2 * c * xexp(x, s)
        return sqexp(x, s, c) if argindex == 2 else sqexp(x, s, sp.S.One)

    @classmethod
    def eval(cls, x, s, c):
        if x.is_zero or c.is_zero:
            return sp.S.Zero

    def naive(self):
        return self.args[2] * self.args[0] ** 2 * sp.exp(self.args[1])


class addexp(_Elementwise):
    """a + b where b dominates a: where both are infinite with opposite signs (inf - inf is NaN), b's limit
    wins. b grows exponentially in the variable a grows linearly in (s + r²e^(-s) at s = -inf), or b is
    lse_k z_k - z_y against a label smoothing ε·(z_y - mean z), or z_y against -mean z."""
    nargs = 2
    latex_name = "addexp"

    def fdiff(self, argindex=1):
        return sp.S.One

    def naive(self):
        return self.args[0] + self.args[1]


class xsq(_Elementwise):
    """c·x², computed as (x·c)·x: x² alone underflows to a subnormal (or overflows) where c·x² does not,
    e.g. r²/(2β) of a smooth L1 loss at r = 1.4e-21, β = 0.001 in float32 (8 bits lost)."""
    nargs = 2
    latex_name = "xsq"

    def fdiff(self, argindex=1):
        x, c = self.args
        return 2 * c * x if argindex == 1 else x ** 2

    @classmethod
    def eval(cls, x, c):
        if x.is_zero or c.is_zero:
            return sp.S.Zero

    def naive(self):
        return self.args[1] * self.args[0] ** 2


class xpow(_Elementwise):
    """c·u^g, computed as (c·u^(g/2))·u^(g/2) (for g = 1..4, c times u one factor at a time): c·u^g
    in either order under- or overflows first where the product is finite, e.g. focal's
    a_t·(1 - p_t)^γ·bce at y = 1.3e-92, z = -1.4e228, α = 1, γ = 3: a_t·(1 - p_t)^3 is 3e-368 -> 0,
    then times 1.8e136; the truth is 4.9e-232."""
    nargs = 3
    latex_name = "xpow"

    def fdiff(self, argindex=1):
        c, u, g = self.args
        if argindex == 1:
            return u ** g
        return c * g * u ** (g - 1) if argindex == 2 else c * u ** g * sp.log(u)

    @classmethod
    def eval(cls, c, u, g):
        if c.is_zero:
            return sp.S.Zero

    def naive(self):
        return self.args[0] * self.args[1] ** self.args[2]


class xmul(_Elementwise):
    """a·b kept as one product of two (sympy flattens a Mul and orders its factors): a weight multiplied
    into a term after the term's scale, pos_weight·(y·(softplus(-z)/K)), where pos_weight·y underflows
    first (0.5·1e-45 in float32) or pos_weight·softplus(-z) overflows before the division by K."""
    nargs = 2
    latex_name = "xmul"

    def fdiff(self, argindex=1):
        return self.args[1] if argindex == 1 else self.args[0]

    def naive(self):
        return self.args[0] * self.args[1]


class sqdist_fast(_Elementwise):
    """sqdist_diff's common case, (n - p)·((a - p) + (a - n)), or NaN where that is not sqdist_diff's value
    (0 for n ≠ p, where TwoSum recovers it, and NaN, as inf - inf at infinite coordinates). A kernel sums
    this, no branch or call in the loop, so that LLVM vectorizes it, and sums again with sqdist_diff only
    where the sum is NaN (emit.Emitter.reduction_loops): triplet float32 65536 x 128, 21 -> 7 ms."""
    nargs = 3
    latex_name = "sqdist\\_diff"

    def naive(self):
        a, p, n = self.args
        return (a - p) ** 2 - (a - n) ** 2


class sqdist_diff(_Elementwise):
    """(a - p)² - (a - n)², the difference of the squared distances from a common point, computed as
    (n - p)·((a - p) + (a - n)): no square overflows, and n - p is exact where the distances are close."""
    nargs = 3
    latex_name = "sqdist\\_diff"
    fast = sqdist_fast          # a sum of these is first summed as that

    def fdiff(self, argindex=1):
        # subpeak: a coordinate where two points are the same infinity moves nothing (0, not inf - inf)
        a, p, n = self.args
        return 2 * (subpeak(n, p) if argindex == 1 else subpeak(p, a) if argindex == 2 else subpeak(a, n))

    def naive(self):
        a, p, n = self.args
        return (a - p) ** 2 - (a - n) ** 2


class sqdist_diff_small(sqdist_diff):
    """sqdist_diff scaled by 4^-h (h = 700 in float64, 100 in float32; exact), from the points scaled by
    2^-h: no term overflows. At infinite coordinates, the orders of infinity of the limit (the infinities
    taken equal): an infinite distance (Z²) outweighs an infinite a alone ((n - p)·2Z), which outweighs
    the finite terms. Only inside overflow_or, which scales back; as a formula it stands for sqdist_diff."""
    latex_name = "sqdist\\_diff"
    fast = None


class overflow_or(_Elementwise):
    """a, or where a is not finite, b·4^h: b is a computed from its inputs scaled by 2^-h (a form of
    degree 2 in them), so its terms do not overflow where a's do (inf - inf is NaN, and inf where the
    terms cancel has the wrong sign). As a formula it is a; its gradient is a's."""
    nargs = 2
    latex_name = "overflow\\_or"

    def fdiff(self, argindex=1):
        return sp.S.One if argindex == 1 else sp.S.Zero

    def naive(self):
        return self.args[0]


class at_peak(_Elementwise):
    """a where flag (an argmax indicator [l = argmax]) is 1, else b: a is b rewritten for the largest
    coordinate, where b cancels (tangent_projection). Both are cheap per element (their reductions are
    per row); on paper, and as a formula, it is b."""
    nargs = 3
    latex_name = "at\\_peak"

    def naive(self):
        return self.args[1]


class fsum(_Elementwise):
    """a + b + c computed with the rounding errors of its additions added back (TwoSum): margin -
    z_y + max z cancels in some order whatever the order (1 + (-1e30) + 1e30 is 0 left to right,
    2.2e-308 - 1 + 1 is 0 right to left). Made by the rule fsum_max as fsum(m, -z_y, max z): an
    infinite z_y equal to the max cancels (0, as the max shift of a logsumexp does)."""
    nargs = 3
    latex_name = "fsum"

    def fdiff(self, argindex=1):
        return sp.S.One

    def naive(self):
        return sp.Add(*self.args)


class lse_minus(_Elementwise):
    """logsumexp_k b(k) - b(t), kept as one term (sympy would merge b(t) with the other terms of a sum):
    the emitter forms (m - b(t)) + log1p(...), 0 + 0 at a +inf b(t) that is the max."""
    nargs = 2
    latex_name = "lse_minus"

    def fdiff(self, argindex=1):
        return sp.S.One if argindex == 1 else sp.S.NegativeOne

    def naive(self):
        return self.args[0] - self.args[1]

    def expanded(self):
        return self.args[0] - self.args[1]


class subpeak(_Elementwise):
    """b - m, 0 where b equals m, also an infinite m (inf - inf is NaN): the max shift of a logsumexp
    (made by the emitter), and the coordinates of a distance whose points share an infinite one."""
    nargs = 2
    latex_name = "subpeak"

    def fdiff(self, argindex=1):
        return sp.S.One if argindex == 1 else sp.S.NegativeOne

    def naive(self):
        return self.args[0] - self.args[1]


class wshift(_Elementwise):
    """c·(subpeak(b, m) + r): a weight times a logit shifted by its row's max, as p_k·(z_k - lse) of a
    soft-label row loss (made by the emitter). Where b - m overflows (finite logits of both signs near the
    float max) the product need not: it is then formed from halves, exactly, (c·((b/2 - m/2) + r/2))·2."""
    nargs = 4
    latex_name = "wshift"

    def naive(self):
        c, b, m, r = self.args
        return c * (b - m + r)


class addshift(_Elementwise):
    """addexp(a, c·(subpeak(b, m) + r)): a term plus a weighted shifted logit, as ε·(z_y - mean z) + (lse - z_y)
    of label smoothing (made by the emitter); where b - m overflows between finite logits and a is finite,
    from halves, (a/2 + c·((b/2 - m/2) + r/2))·2."""
    nargs = 5
    latex_name = "addshift"

    def naive(self):
        a, c, b, m, r = self.args
        return a + c * (b - m + r)


class nanflag(_Flag):
    """0, or NaN where x is NaN: a zero weight's guard 0·A = 0 (A = ±inf) keeps a NaN input's NaN."""
    latex_name = "nanflag"


class mul0(_Elementwise):
    """a·b, except 0 where a = 0: a vanishing factor (an underflowed e^u) decides the product
    even when b is infinite (0·inf is NaN)."""
    nargs = 2
    latex_name = "mul0"

    def fdiff(self, argindex=1):
        a, b = self.args
        return b if argindex == 1 else a

    def naive(self):
        return self.args[0] * self.args[1]


class xlogy(_Elementwise):
    """x·log(y), except 0 where x = 0: the convention 0·log 0 = 0 of entropies and KL."""
    nargs = 2
    latex_name = "xlogy"

    def fdiff(self, argindex=1):
        x, y = self.args
        return sp.log(y) if argindex == 1 else xdivy(x, y)

    @classmethod
    def eval(cls, x, y):
        if x.is_zero:
            return sp.S.Zero

    def naive(self):
        return self.args[0] * sp.log(self.args[1])


class Max2(_Elementwise):
    """max(a, b); at a tie the gradient goes to a (so max(0, x) has gradient 0 at the kink)."""
    nargs = 2
    latex_name = "max"

    def fdiff(self, argindex=1):
        a, b = self.args
        return indicator(a >= b) if argindex == 1 else indicator(a < b)

    def naive(self):
        # as a Piecewise, not sympy's Max, whose derivative is a Heaviside
        a, b = self.args
        return sp.Piecewise((a, a >= b), (b, True))


class Min2(_Elementwise):
    """min(a, b); at a tie the gradient goes to a."""
    nargs = 2
    latex_name = "min"

    def fdiff(self, argindex=1):
        a, b = self.args
        return indicator(a <= b) if argindex == 1 else indicator(a > b)

    def naive(self):
        a, b = self.args
        return sp.Piecewise((a, a <= b), (b, True))


class Reduce(sp.Function):
    """op over index k in [0, size) where cond(k) holds, of body(k): args (k, size, body, cond)."""
    nargs = 4
    is_real = True
    symbol = "?"

    @property
    def index(self):
        return self.args[0]

    @property
    def size(self):
        return self.args[1]

    @property
    def body(self):
        return self.args[2]

    @property
    def cond(self):
        return self.args[3]

    @property
    def free_symbols(self):
        return (self.body.free_symbols | self.cond.free_symbols | self.size.free_symbols) - {self.index}

    def _subscript(self, printer):
        sub = printer._print(self.index)
        if self.cond is not sp.true:
            sub += r" \,:\, " + printer._print(self.cond)
        return sub

    def _latex(self, printer, exp=None):
        text = r"%s_{%s} \left(%s\right)" % (self.latex_op, self._subscript(printer), printer._print(self.body))
        return _power(r"\left(%s\right)" % text if exp else text, exp)

    def _sympystr(self, printer):
        cond = self.cond
        if cond is sp.true:
            sub = printer._print(self.index)
        elif isinstance(cond, sp.Ne) and cond.args[0] == self.index:   # as written: [j != y]
            sub = f"{printer._print(self.index)} != {printer._print(cond.args[1])}"
        elif isinstance(cond, sp.Ne) and cond.args[1] == self.index:
            sub = f"{printer._print(self.index)} != {printer._print(cond.args[0])}"
        else:
            sub = f"{printer._print(self.index)} : {printer._print(cond)}"
        return "%s[%s](%s)" % (self.symbol, sub, printer._print(self.body))


class Sum(Reduce):
    symbol, latex_op = "sum", r"\sum"

    @classmethod
    def eval(cls, k, size, body, cond):
        # Σ_k c·b(k) = c·Σ_k b(k): constant factors leave the loop
        if body.is_Mul:
            outside = [f for f in body.args if k not in f.free_symbols]
            if outside:
                return sp.Mul(*outside) * cls(k, size, sp.Mul(*[f for f in body.args if k in f.free_symbols]), cond)
        return None


class ScaledSum(Sum):
    """Σ_k b(k)/K, a mean over K with the division kept inside the loop (Sum pulls it out): Σ b
    overflows where Σ b/K does not. Over nothing it is NaN (0/0), as the mean is."""

    @classmethod
    def eval(cls, k, size, body, cond):
        return None


class LogSumExp(Reduce):
    symbol, latex_op = "logsumexp", r"\operatorname{LSE}"

    def naive(self):
        k, size, body, cond = self.args
        return sp.log(Sum(k, size, sp.exp(body), cond))


class Max(Reduce):
    symbol, latex_op = "max", r"\max"


class Min(Reduce):
    symbol, latex_op = "min", r"\min"


class Norm(Reduce):
    """Euclidean norm sqrt(Σ body²), printed scaled by the max so it neither overflows nor underflows."""
    symbol, latex_op = "norm", r"\operatorname{norm}"

    def naive(self):
        k, size, body, cond = self.args
        return sp.sqrt(Sum(k, size, body ** 2, cond))


REDUCTIONS = {"sum": Sum, "logsumexp": LogSumExp, "max": Max, "min": Min, "norm": Norm}


class IsArg(sp.Function):
    """1 if k is the (first) index where the Max/Min reduction R is attained, else 0."""
    nargs = 2
    is_real = True

    def _latex(self, printer, exp=None):
        return _power(r"[%s = \operatorname{arg}%s]" % (printer._print(self.args[1]), printer._print(self.args[0])),
                      exp)

    def _sympystr(self, printer):
        return "[%s == argof %s]" % (printer._print(self.args[1]), printer._print(self.args[0]))


def substitute(expr, mapping):
    """xreplace that respects binding: a reduction's own index is never replaced inside it."""
    if not mapping or expr.is_Atom:
        return mapping.get(expr, expr)
    if isinstance(expr, Reduce) and expr.index in mapping:
        inner = {a: b for a, b in mapping.items() if a != expr.index}
        k, size, body, cond = expr.args
        return expr.func(k, substitute(size, inner), substitute(body, inner), substitute(cond, inner))
    args = [substitute(a, mapping) for a in expr.args]
    return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr


def expand(expr):
    """Primitives in their branch-free stable forms, for CSE to share work between them."""
    return expr.replace(lambda e: hasattr(e, "expanded"), lambda e: e.expanded())


def naive(expr):
    """The textbook form of an expression: every stable primitive replaced by its naive formula."""
    forms = {log1p: lambda a: sp.log(1 + a), expm1: lambda a: sp.exp(a) - 1}
    return expr.replace(lambda e: isinstance(e, sp.Function) and (hasattr(e, "naive") or e.func in forms),
                        lambda e: e.naive() if hasattr(e, "naive") else forms[e.func](*e.args))
