"""Stabilization rules, as data: each says the unstable form, the stable one, why, and a witness.

``stabilize(expr, facts)`` runs the root rules (root_rules.py: passes over a whole loss that
need the declarations' domains) and the node rules, bottom-up until nothing changes. The
pipeline calls it before and after differentiating, since a stable forward pass can still have
an unstable gradient.

A rule's ``naive``/``stable`` are templates in one variable ``x`` (``y`` for two-argument
rules); ``witness`` is a float64 point where the naive form is wrong and the stable one right
(tests/test_rules.py checks each against mpmath).
"""
from dataclasses import dataclass
from typing import Callable, Optional

import sympy as sp
from sympy import KroneckerDelta

from .norm_rules import (difference_of_squares, div_norm, norm, norm_difference, norm_times_unit, rescue_overflow,
                         tangent_projection, unit_vector)
from .primitives import (LogSumExp, Max, Min, Reduce, ScaledSum, Sum, addexp, expm1, fsum, log1p, logcosh, lse_minus,
                         sigmoid, softplus, sqexp, substitute, xexp, xexpm1, xlogy, xpow, xsq)
from .root_rules import annihilate, hard_labels, scale_first, unit_adjoint, zero_weights

x, y = sp.symbols("x y", real=True)
_w = sp.Wild("w")


@dataclass(frozen=True)
class Rule:
    name: str
    why: str
    naive: object                        # unstable template (in x, y)
    stable: object                       # its stable replacement
    witness: tuple                       # (x,) or (x, y) where float64 naive fails
    rewrite: Optional[Callable] = None   # node -> replacement or None; default: match the template
    post: bool = False                   # only after the node's children are rewritten
    final: bool = False                  # once, after every other rule and pass (a lowering)

    def apply(self, node):
        if self.rewrite is not None:
            return self.rewrite(node)
        m = node.match(self.naive.xreplace({x: _w}))
        if m and _w in m:
            return self.stable.xreplace({x: m[_w]})
        return None


def _one_minus_sigmoid(node):
    # 1 - σ(a) (possibly inside a longer sum) -> σ(-a)
    if not node.is_Add or sp.S.One not in node.args:
        return None
    for t in node.args:
        if isinstance(t, sp.Mul) and t.args[0] == -1 and len(t.args) == 2 and isinstance(t.args[1], sigmoid):
            rest = [a for a in node.args if a not in (sp.S.One, t)]
            return sp.Add(sigmoid(-t.args[1].args[0]), *rest)
    return None


def _one_minus_mixed_sigmoid(node):
    # 1 - c·σ(a) - (1-c)·σ(-a) (possibly inside a longer sum) -> c·σ(-a) + (1-c)·σ(a):
    # 1 - p_t of a soft label; σ(a) + σ(-a) = 1, so each weight takes the other side's sigmoid
    if not node.is_Add or sp.S.One not in node.args:
        return None
    sig = {}
    for t in node.args:
        coef, fs = t.as_coeff_mul()
        hits = [f for f in fs if isinstance(f, sigmoid)]
        if len(hits) == 1:
            sig.setdefault(hits[0].args[0], []).append((t, t / hits[0]))
    for a, terms in sig.items():
        for t1, c1 in terms:
            for t2, c2 in sig.get(-a, ()):
                if sp.expand(c1 + c2 + 1) == 0:
                    rest = [u for u in node.args if u not in (sp.S.One, t1, t2)]
                    return sp.Add(-c1 * sigmoid(-a), -c2 * sigmoid(a), *rest)
    return None


def _one_minus_exp(node):
    # 1 - e^a (possibly inside a longer sum) -> -expm1(a): 1 - softmax_y of a confident row
    if not node.is_Add or sp.S.One not in node.args:
        return None
    for t in node.args:
        if isinstance(t, sp.Mul) and t.args[0] == -1 and len(t.args) == 2 and isinstance(t.args[1], sp.exp):
            rest = [a for a in node.args if a not in (sp.S.One, t)]
            return sp.Add(-expm1(t.args[1].args[0]), *rest)
    return None


def _one_minus_softmax(node):
    # 1 - e^(b_t - logsumexp_k b_k) -> Σ_{k != t} e^(b_k - logsumexp): 1 - p_y of a confident row
    # is 1e-17, not 0 (the logsumexp itself rounds to b_t)
    if not node.is_Add or sp.S.One not in node.args:
        return None
    for t in node.args:
        if not (t.is_Mul and t.args[0] == -1 and len(t.args) == 2 and isinstance(t.args[1], sp.exp)):
            continue
        for r in t.args[1].args[0].atoms(LogSumExp):
            if r.cond is not sp.true:
                continue
            for at in _element_indices(r.body, r.index, t.args[1].args[0] + r):
                if at is not None:
                    rest = [a for a in node.args if a not in (sp.S.One, t)]
                    return sp.Add(Sum(r.index, r.size, sp.exp(r.body - r), sp.Ne(r.index, at)), *rest)
    return None


def _zero_outside(term):
    """(e, c) for a term that is e where c holds and 0 elsewhere: (e if c else 0), or [c]·e; else None."""
    def zero_default(p):
        return isinstance(p, sp.Piecewise) and len(p.args) == 2 and p.args[1].cond is sp.true and p.args[1].expr == 0
    if zero_default(term):
        return term.args[0]
    flags = [f for f in sp.Mul.make_args(term) if zero_default(f) and f.args[0].expr == 1]
    if term.is_Mul and len(flags) == 1:
        return sp.Mul(*[f for f in term.args if f is not flags[0]]), flags[0].args[0].cond
    return None


def _softmax_minus_onehot(node):
    # (c·e^(b_l - lse_k b_k) if cond(l) else 0) - c·[l = t] -> at l = t (cond(t)): c·expm1(b_t - lse), a row's
    # softmax against its target (NT-Xent's positive pair): p_t - 1 of a confident row is -1e-140, not 0. The
    # logsumexp is m + log1p(Σ_{k≠argmax} e^(b_k - m)), so b_t - lse at the argmax is exactly -log1p(...)
    if not node.is_Add:
        return None
    for pw in node.args:
        guarded = _zero_outside(pw)
        if guarded is None:
            continue
        e1, c1 = guarded
        ex = [f for f in sp.Mul.make_args(e1) if isinstance(f, sp.exp)]
        if len(ex) != 1:
            continue
        coef = sp.Mul(*[f for f in sp.Mul.make_args(e1) if f is not ex[0]])
        arg = ex[0].args[0]
        for r in arg.atoms(LogSumExp):
            at = next((a for a in _element_indices(r.body, r.index, arg + r) if a is not None), None)
            if at is None or not isinstance(at, sp.Symbol) or substitute(r.cond, {r.index: at}) != c1:
                continue
            for d in node.args:
                deltas = [f for f in sp.Mul.make_args(d) if isinstance(f, KroneckerDelta) and at in f.args]
                if len(deltas) != 1 or sp.expand(d / deltas[0] + coef) != 0:
                    continue
                t = deltas[0].args[1] if deltas[0].args[0] == at else deltas[0].args[0]
                if at in t.free_symbols:
                    continue
                rest = [a for a in node.args if a is not pw and a is not d]
                # [l = t] kept as a factor: the emitter fills the row with the plain softmax and the element
                # at t after it (a branch-free loop)
                at_t = sp.Piecewise((coef * expm1(arg), c1), (-coef, True))
                return sp.Add(pw * (1 - deltas[0]) + deltas[0] * at_t, *rest)
    return None


def _element_indices(body, k, target):
    """The t with body(k := t) == target, tried over the index arguments of body's elements."""
    for el in body.atoms(sp.core.function.AppliedUndef):
        for i, a in enumerate(el.args):
            if a == k:
                yield next((other.args[i] for other in target.atoms(sp.core.function.AppliedUndef)
                            if other.func == el.func and substitute(body, {k: other.args[i]}) == target),
                           None)


def _pow_combine(node):
    # γ·b^γ/b -> γ·b^(γ-1): sympy's derivative of b^γ is 0/0 at b = 0 where the truth is 0 (γ > 1)
    if not node.is_Mul:
        return None
    bases = {}
    for f in node.args:
        b, e = f.as_base_exp()
        bases.setdefault(b, []).append(e)
    if any(len(es) > 1 and any(not e.is_number for e in es) for es in bases.values()):
        new = sp.powsimp(node, combine="exp", deep=False)
        return new if new != node else None
    return None


def _sqexp(node):
    # c·b²·e^s -> sqexp(b, s, |c|) = (t·|c|)·t, t = b·e^(s/2), c the product's number (its sign stays out,
    # so ±c·b²·e^s share one sqexp): the square and the exponential over/underflow separately, and the
    # square overflows where c·b² does not (½(y - μ)²·e^(-logvar) at μ = 1.5e154)
    if not node.is_Mul:
        return None
    exps = [f for f in node.args if isinstance(f, sp.exp) and f.args[0].free_symbols]
    squares = [f for f in node.args if f.is_Pow and f.exp == 2 and f.base.free_symbols]
    if len(exps) != 1 or not squares:
        return None
    c = sp.Mul(*[f for f in node.args if f.is_Number])
    rest = [f for f in node.args if f is not exps[0] and f is not squares[0] and not f.is_Number]
    return sp.Mul(sp.sign(c), sqexp(squares[0].base, exps[0].args[0], abs(c)), *rest)


def _scaled_square(node):
    # c·b² -> xsq(b, c), c not a number (a param: 1/(2β)): (b·c)·b keeps b² from rounding to a subnormal
    if not node.is_Mul:
        return None
    sq = [f for f in node.args if f.is_Pow and f.exp == 2 and not f.base.is_number]
    if len(sq) != 1:
        return None
    c = node / sq[0]
    if c.is_number or c.has(sp.exp, sqexp, xexp):
        return None
    return xsq(sq[0].base, c)


def _scaled_power(node):
    # c·u^g -> xpow(c, u, g) = (c·u^(g/2))·u^(g/2), g not a number (a param: focal's γ) or an integer
    # above 2 (a specialized γ; 2 is scaled_square's): the power and its weight meet before either
    # alone under- or overflows. Last of all, so the other rules and passes see the plain product.
    if not node.is_Mul:
        return None
    for f in node.args:
        if f.is_Pow and not f.base.is_number and (not f.exp.is_number or (f.exp.is_Integer and f.exp > 2)):
            c = sp.Mul(*[a for a in node.args if a is not f])
            if not c.is_number:
                return xpow(c, f.base, f.exp)
    return None


def _tanh_grad(node):
    # c - c·tanh²(a) (possibly inside a longer sum, c a number: 2 - 2tanh² of a chain rule) -> c/cosh²(a)
    if not node.is_Add:
        return None
    for c in node.args:
        if not c.is_number or c == 0:
            continue
        for t in node.args:
            k, r = t.as_coeff_Mul()
            if k == -c and r.is_Pow and r.exp == 2 and isinstance(r.base, sp.tanh):
                rest = [a for a in node.args if a is not c and a is not t]
                return sp.Add(c * sp.cosh(r.base.args[0]) ** -2, *rest)
    return None


def _exp_only(e, s):
    """e depends on s, and only through exponentials e^(k·s + ...) (k a nonzero number)."""
    if not e.has(s):
        return True
    if isinstance(e, (sp.exp, expm1)) or (isinstance(e, (sqexp, xexp)) and not e.args[0].has(s)):
        k = e.args[-1].diff(s)
        return k.is_number and k != 0
    if e.is_Add or e.is_Mul:
        return all(_exp_only(a, s) for a in e.args)
    return False


def _linear_vs_exp(node):
    # c·s + b(e^(k·s)) -> addexp(c·s, b): at s = ±inf the exponential term wins, not inf - inf = NaN
    if not node.is_Add:
        return None
    for lin in node.args:
        for s in sp.Mul.make_args(lin):
            if not (s.is_Symbol or isinstance(s, sp.core.function.AppliedUndef)) or (lin / s).has(s):
                continue
            for t in node.args:
                if t is not lin and t.has(s) and t.has(sp.exp, expm1, sqexp, xexp) and _exp_only(t, s):
                    rest = [a for a in node.args if a is not lin and a is not t]
                    return sp.Add(addexp(lin, t), *rest)
    return None


def _into_piecewise(node):
    # c·(a if cond else b) -> (c·a if cond else c·b) where c cancels in a branch: huber(δ=β)/β
    # computes β·(|r| - β/2)/β, which overflows at the product where |r| - β/2 does not
    if not node.is_Mul:
        return None
    for f in node.args:
        if not isinstance(f, sp.Piecewise):
            continue
        rest = sp.Mul(*[a for a in node.args if a is not f])
        if rest.has(sp.Piecewise) or rest.is_number:
            continue
        pieces = [(rest * ex, c) for ex, c in f.args]
        if any(sp.count_ops(p) < sp.count_ops(ex) for (p, _), (ex, _) in zip(pieces, f.args)):
            return sp.Piecewise(*pieces)
    return None


def _scale_into_sum(node):
    # Σ_k b(k)/K -> Σ_k b(k)/K with the division inside the loop (a mean over K): the sum
    # overflows where the scaled sum does not (mean of K logits at 1.8e308)
    if not node.is_Mul:
        return None
    for r in node.args:
        if type(r) is not Sum:
            continue
        # (not a number: sympy would distribute it over the terms of the body, undoing expm1 and
        # the like)
        scale = [f for f in node.args if f.is_Pow and f.exp == -1 and f.base == r.size]
        if scale:
            rest = [f for f in node.args if f is not r and f not in scale]
            return sp.Mul(ScaledSum(r.index, r.size, sp.Mul(*scale) * r.body, r.cond), *rest)
    return None


def _weight_into_sum(node):
    # c·Σ_k b(k) -> Σ_k c·b(k), c a product of params (-β/2 of a β-VAE's KL term) and b an exponential
    # expression: the sum overflows where the weighted terms do not (e^709.79/2 = 9.05e307). c goes onto
    # each term of the body and through addexp (c·(a + b) = c·a + c·b), where it meets the exponential
    # (scaled_expm1)
    if not node.is_Mul:
        return None
    sums = [f for f in node.args if type(f) is Sum]
    if len(sums) != 1 or not sums[0].body.has(sp.exp, expm1, addexp):
        return None
    r = sums[0]
    c = node / r
    if c.is_number or c.has(sp.core.function.AppliedUndef, Reduce):
        return None

    def scaled(t):
        return addexp(scaled(t.args[0]), scaled(t.args[1])) if isinstance(t, addexp) else c * t
    return Sum(r.index, r.size, sp.Add(*[scaled(t) for t in sp.Add.make_args(r.body)]), r.cond)


def _scaled_expm1(node):
    # c·expm1(s) -> xexpm1(c, s): expm1 overflows at s = 709.79 where c·(e^s - 1) with c < 1 does not
    if not node.is_Mul:
        return None
    ms = [f for f in node.args if isinstance(f, expm1)]
    if len(ms) != 1:
        return None
    rest = sp.Mul(*[f for f in node.args if f is not ms[0]])
    if rest in (sp.S.One, sp.S.NegativeOne):
        return None
    return xexpm1(rest, ms[0].args[0])


def _xexp_minus_weight(node):
    # xexp(c, s) - c (possibly inside a longer sum) -> xexpm1(c, s): c·e^s - c cancels near s = 0 (the logvar
    # gradient of a β-VAE, -β/2 + β/2·e^logvar, once the weight is on each term: 0 vs 5e-21 at 1e-20)
    if not node.is_Add:
        return None
    for t in node.args:
        if not isinstance(t, xexp):
            continue
        c = t.args[0]
        for w in node.args:
            if w == -c or _guarded(w, -c):
                rest = [a for a in node.args if a is not t and a is not w]
                return sp.Add(xexpm1(c, t.args[1]), *rest)
    return None


def _guarded(w, c):
    """w is c under a zero-weight guard, (0 if β = 0 else c), where c vanishes at β = 0 anyway."""
    if not (isinstance(w, sp.Piecewise) and len(w.args) == 2 and w.args[0].expr == 0 and w.args[1].expr == c):
        return False
    cond = w.args[0].cond
    return isinstance(cond, sp.Eq) and cond.rhs == 0 and cond.lhs.is_Symbol and c.subs(cond.lhs, 0) == 0


def _fsum_max(node):
    # m - c + max_k b(k), c an element of the array b reads -> fsum: the terms cancel in pairs
    # whatever the order of the additions (equal logits 1e30: 0 vs 1 left to right; z_y = 1,
    # max = 2.2e-308, m = 1: 0 vs 2.2e-308 right to left)
    if not node.is_Add or len(node.args) != 3:
        return None
    for r in node.args:
        if not isinstance(r, (Max, Min)):
            continue
        arrays = {a.func for a in r.body.atoms(sp.core.function.AppliedUndef)}
        for t in node.args:
            if t is not r and r.index not in t.free_symbols and not t.has(Reduce) \
                    and any(a.func in arrays for a in t.atoms(sp.core.function.AppliedUndef)):
                # fsum(m, -c, max): the last two are the element and the max it is compared with
                return fsum(next(a for a in node.args if a is not r and a is not t), t, r)
    return None


def _merge_sums(node):
    # c·Σ_k a(k) - d·Σ_k b(k) -> Σ_k (c·a(k) - d·b(k)) over the same range: the terms cancel
    # element by element (‖a - p‖² - ‖a - n‖² of a triplet loss is inf - inf where each sum overflows)
    if not node.is_Add:
        return None
    sums = []
    for t in node.args:
        c, r = t.as_coeff_Mul()
        if type(r) is Sum:
            sums.append((t, c, r))
    for i, (t1, c1, r1) in enumerate(sums):
        for t2, c2, r2 in sums[i + 1:]:
            if (c1 > 0) == (c2 > 0) or r1.size != r2.size:
                continue
            b2 = substitute(r2.body, {r2.index: r1.index})
            if substitute(r2.cond, {r2.index: r1.index}) != r1.cond:
                continue
            rest = [a for a in node.args if a is not t1 and a is not t2]
            return sp.Add(Sum(r1.index, r1.size, c1 * r1.body + c2 * b2, r1.cond), *rest)
    return None


def _log_softmax_split(node):
    # logsumexp_k b(k) + c·b(t) -> lse_minus(logsumexp, b(t)) + (1 + c)·b(t), c ≠ -1: the log-softmax
    # difference is formed first (0 at a +inf b(t) that is the max, not inf - inf), the rest weighted
    if not node.is_Add:
        return None
    for r in node.args:
        if not isinstance(r, LogSumExp) or r.cond is not sp.true:
            continue
        for t in node.args:
            parts = [f for f in sp.Mul.make_args(t) if isinstance(f, sp.core.function.AppliedUndef)]
            if t is r or len(parts) != 1:
                continue
            el = parts[0]
            c = t / el
            if c.has(el) or not any(substitute(r.body, {r.index: a}) == el for a in el.args):
                continue
            rest = sp.Add(sp.expand(c + 1) * el, *[a for a in node.args if a is not r and a is not t])
            if rest != 0 and _weighs_nothing(rest, r):
                # ε·(b(t) - mean_k b(k)) of label smoothing, where infinities meet: the element grows like
                # itself and the mean like its share of it (b(t) = ±inf = mean: b(t) wins), and the
                # lse - b(t) like the max against the mean's share (+inf, -inf at a +inf b(k), k ≠ t:
                # the lse wins, for weights up to 1 as a smoothing in [0, 1])
                elems = [a for a in sp.Add.make_args(rest) if not a.has(Reduce)]
                if len(elems) == 1:
                    rest = addexp(rest - elems[0], elems[0])
                return addexp(rest, lse_minus(r, el))
            return sp.Add(lse_minus(r, el), rest)
    return None


def _weighs_nothing(e, r):
    """e = Σ c_i·(an element, or a sum over elements, of the array r reduces), with Σ c_i·(count) = 0."""
    arrays = {a.func for a in r.body.atoms(sp.core.function.AppliedUndef)}

    def weight(t):
        # the weight of a term c·b(t) or c·Σ_k b(k)·w: c, c·Σ_k w; None if it is not of that form
        inner = [f for f in sp.Mul.make_args(t) if f.has(sp.core.function.AppliedUndef)]
        if len(inner) != 1:
            return None
        f, c = inner[0], t / inner[0]
        if isinstance(f, sp.core.function.AppliedUndef):
            return c if f.func in arrays else None
        if type(f) in (Sum, ScaledSum) and f.cond is sp.true:
            ws = [weight(b) for b in sp.Add.make_args(sp.expand(f.body))]
            return None if None in ws or any(w.has(f.index) for w in ws) else c * f.size * sp.Add(*ws)
        return None
    ws = [weight(t) for t in sp.Add.make_args(sp.expand(e))]
    return None not in ws and sp.expand(sp.Add(*ws)) == 0


def _log1p(node):
    # log(1 + a) -> log1p(a), only where the sum literally holds the 1
    if isinstance(node, sp.log) and node.args[0].is_Add and sp.S.One in node.args[0].args:
        return log1p(node.args[0] - 1)
    return None


def _xlogy(node):
    # a·log(b) -> xlogy(a, b) when a is not a plain number: 0·log(0) is 0, not NaN.
    if not node.is_Mul:
        return None
    logs = [f for f in node.args if isinstance(f, sp.log)]
    if len(logs) != 1:
        return None
    coef = node / logs[0]
    if coef.is_number or not coef.free_symbols:
        return None
    return xlogy(coef, logs[0].args[0])


def _logsumexp(node):
    # log Σ_k exp(b_k) -> max-shifted logsumexp (guarded for all -inf rows)
    if isinstance(node, sp.log) and isinstance(node.args[0], Sum) and isinstance(node.args[0].body, sp.exp):
        s = node.args[0]
        return LogSumExp(s.index, s.size, s.body.args[0], s.cond)
    return None


def _log_softmax(node):
    # log(exp(a) / Σ_k exp(b_k)) -> a - logsumexp_k b_k
    if not (isinstance(node, sp.log) and node.args[0].is_Mul):
        return None
    for f in node.args[0].args:
        if f.is_Pow and f.exp == -1 and isinstance(f.base, Sum) and isinstance(f.base.body, sp.exp):
            s = f.base
            return sp.log(node.args[0] / f) - LogSumExp(s.index, s.size, s.body.args[0], s.cond)
    return None


NODE_RULES = (
    Rule("log_sigmoid", "log σ(x) = -softplus(-x); σ(x) underflows to 0 for x < -745, log gives -inf",
         sp.log(sigmoid(x)), -softplus(-x), (-800.0,)),
    Rule("log1m_sigmoid", "log(1 - σ(x)) = -softplus(x); 1 - σ(x) cancels to 0 for x > 37",
         sp.log(1 - sigmoid(x)), -softplus(x), (40.0,)),
    Rule("one_minus_sigmoid", "1 - σ(x) = σ(-x); the subtraction cancels to 0 for x > 37",
         1 - sigmoid(x), sigmoid(-x), (40.0,), _one_minus_sigmoid),
    Rule("one_minus_mixed_sigmoid", "1 - y·σ(x) - (1-y)·σ(-x) = y·σ(-x) + (1-y)·σ(x) (1 - p_t of a soft "
                                    "label); the subtraction cancels to 0 when the weights round: 0 vs 1e-20 at "
                                    "x = -800, y = 1e-20",
         1 - y * sigmoid(x) - (1 - y) * sigmoid(-x), y * sigmoid(-x) + (1 - y) * sigmoid(x), (-800.0, 1e-20),
         _one_minus_mixed_sigmoid),
    Rule("softplus", "log(1 + e^x) = softplus(x); e^x overflows for x > 709",
         sp.log(1 + sp.exp(x)), softplus(x), (800.0,)),
    Rule("softplus_log1p", "log1p(e^x) = softplus(x); e^x overflows for x > 709",
         log1p(sp.exp(x)), softplus(x), (800.0,)),
    Rule("sigmoid_ratio", "e^x / (1 + e^x) = σ(x); inf/inf is NaN for x > 709",
         sp.exp(x) / (1 + sp.exp(x)), sigmoid(x), (800.0,)),
    Rule("sigmoid_reciprocal", "1 / (1 + e^-x) = σ(x); e^-x overflows for x < -709, giving 0 for e^x",
         1 / (1 + sp.exp(-x)), sigmoid(x), (-740.0,)),
    Rule("one_minus_softmax", "1 - softmax_t = Σ_{k≠t} softmax_k; the subtraction cancels to 0 for a "
                              "confident row (the logsumexp rounds to the top logit)", None, None, (),
         _one_minus_softmax),
    Rule("softmax_minus_onehot", "p_l - [l = t] = expm1(b_t - lse) at l = t (p a softmax over a masked row): p_t - 1 "
                                 "cancels to 0 for a confident row (NT-Xent at τ = 0.001: 0 for -1e-140)", None, None,
         (), _softmax_minus_onehot),
    Rule("one_minus_exp", "1 - e^x = -expm1(x); cancels to 0 for |x| < 1e-16 (1 - p of a confident softmax)",
         1 - sp.exp(x), -expm1(x), (1e-17,), _one_minus_exp),
    Rule("pow_combine", "γ·b^γ/b = γ·b^(γ-1), the derivative of b^γ, is 0/0 at b = 0",
         x ** y / x, x ** (y - 1), (0.0, 2.0), _pow_combine, post=True),
    Rule("sqexp", "c·x²·e^y = (x·e^(y/2)·c)·(x·e^(y/2)); x² underflows (or overflows) where e^y overflows "
                  "(underflows): 0 vs 1e-96 at x = 1e-200, y = 700, and 0·inf = NaN further out; (x·e^(y/2))² "
                  "overflows where c·x²·e^y with c = 1/2 does not (x = 1.5e154, y = 0: inf vs 1.1e308)",
         x ** 2 * sp.exp(y), sqexp(x, y, sp.S.One), (1e-200, 700.0), _sqexp),
    Rule("scaled_square", "c·x² = (x·c)·x: x² is subnormal at x = 1e-160 (1e-320, 11 bits), where c·x² with c = 1e10 "
                          "keeps 52; x² overflows at x = 1e160 where c·x² with c = 1e-10 does not",
         y * x ** 2, xsq(x, y), (1e-160, 1e10), _scaled_square),
    Rule("scaled_power", "c·u^g = (c·u^(g/2))·u^(g/2): c·u^g underflows in either order where the product is "
                         "finite (a_t·(1 - p_t)^γ·bce of focal at y = 1.3e-92, z = -1.4e228, α = 1, γ = 3: 0 vs "
                         "4.9e-232; c = 1e200, u = 1e-120, g = 3: 0 vs 1e-160)",
         y * x ** 3, xpow(y, x, 3), (1e-120, 1e200), _scaled_power, final=True),
    Rule("linear_vs_exp", "c·x + b·e^(kx): at x = ∓inf the terms are ∓inf and ±inf (NaN) where the exponential "
                          "wins (s + r²e^(-s) at s = -inf is inf)",
         x + sp.exp(-x), addexp(x, sp.exp(-x)), (-float("inf"),), _linear_vs_exp),
    Rule("into_piecewise", "c·(a if cond else b) = (c·a if cond else c·b) where c cancels in a branch: "
                           "(y·(x - y/2))/y overflows at the product for x = 1e308, y = 4 (inf vs 1e308)",
         None, None, (), _into_piecewise),
    Rule("scale_into_sum", "(Σ_k b_k)/K = Σ_k b_k/K (a mean): the sum overflows first (the mean of "
                           "[1e308, 1e308] is inf, not 1e308)", None, None, (), _scale_into_sum),
    Rule("weight_into_sum", "c·Σ_k b_k = Σ_k c·b_k for a param weight c: the sum overflows where the weighted "
                            "terms do not (-β/2·Σ(1 + logvar - μ² - e^logvar) at logvar = 709.79, β = 1: inf, "
                            "not 9.05e307)", None, None, (), _weight_into_sum, post=True),
    Rule("scaled_expm1", "y·expm1(x) = xexpm1(y, x): expm1 overflows at x = 709.79 where the product with "
                         "y < 1 does not (inf vs 9.05e307 for y = 1/2)",
         y * expm1(x), xexpm1(y, x), (709.79, 0.5), _scaled_expm1),
    Rule("xexp_minus_weight", "c·e^x - c = xexpm1(c, x); cancels to 0 for |x| < 1e-16",
         None, None, (), _xexp_minus_weight),
    Rule("fsum_max", "m - c + max_k b_k, c an element of the same array, summed with TwoSum: two of the terms "
                     "cancel in any order of additions (equal logits 1e30: 0 vs 1 for m = 1)",
         None, None, (), _fsum_max),
    Rule("merge_sums", "Σ_k a_k - Σ_k b_k = Σ_k (a_k - b_k): the sums overflow (inf - inf) or cancel where the "
                       "terms do not", None, None, (), _merge_sums),
    Rule("difference_of_squares", "x² - y² = (x - y)(x + y): x² overflows at x = 1.5e154 (inf vs 1.25e308 for "
                                  "y = 1e154), and cancels for x ≈ y",
         x ** 2 - y ** 2, (x - y) * (x + y), (1.5e154, 1e154), difference_of_squares),
    Rule("rescue_overflow", "Σ_k ((a_k - p_k)² - (a_k - n_k)²) redone with the points scaled by 2^-h where it is "
                            "not finite: at a = [1e200, 0], p = [-1e200, 0], n = [0, 3e200] the terms are 3e400 "
                            "and -9e400 (inf - inf = NaN), the sum -6e400 (value 0 of a triplet loss)",
         None, None, (), rescue_overflow),
    Rule("norm_times_unit", "‖b‖·(a/‖b‖) = a: the quotient underflows (or is inf/inf) where a is finite; the "
                            "gradient of ‖b‖²", None, None, (), norm_times_unit, post=True),
    Rule("tangent_projection", "x_l/‖z‖ - (Σ_d x_d·u_d)·u_l/‖z‖ (u = z/‖z‖) = (x_L·Σ_{d≠L} u_d² - "
                               "u_L·Σ_{d≠L} x_d·u_d)/‖z‖ at the largest |z_L|: 1 - u_L² cancels (z = [1e11, "
                               "1e-3], x = [1, 0]: 0 vs 1e-39)",
         None, None, (), tangent_projection, post=True),
    Rule("log_softmax_split", "lse_k b_k + c·b_t = (lse_k b_k - b_t) + (1 + c)·b_t: the log-softmax first "
                              "(cross-entropy with label smoothing at a +inf target logit: 0, not inf - inf)",
         None, None, (), _log_softmax_split),
    Rule("log1p", "log(1 + x) = log1p(x); 1 + x rounds to 1 for |x| < 1e-16",
         sp.log(1 + x), log1p(x), (1e-17,), _log1p),
    Rule("expm1", "e^x - 1 = expm1(x); cancels to 0 for |x| < 1e-16",
         sp.exp(x) - 1, expm1(x), (1e-17,)),
    Rule("logcosh", "log cosh x: cosh overflows for |x| > 710, and rounds to 1 for |x| < 1e-8",
         sp.log(sp.cosh(x)), logcosh(x), (1000.0,)),
    Rule("tanh_grad", "c - c·tanh²(x) = c/cosh²(x); the subtraction cancels to 0 for |x| > 19 (and loses bits "
                      "well before: 41 ulps at x = 6)",
         1 - sp.tanh(x) ** 2, sp.cosh(x) ** -2, (20.0,), _tanh_grad),
    Rule("xlogy", "x·log(y) = xlogy(x, y), which is 0 at x = 0 (0·log 0 = 0·-inf is NaN)",
         x * sp.log(y), xlogy(x, y), (0.0, 0.0), _xlogy, post=True),
    Rule("logsumexp", "log Σ e^b = m + log Σ e^(b-m), m = max b; e^b overflows for b > 709",
         None, None, (), _logsumexp),
    Rule("log_softmax", "log(e^a / Σ e^b) = a - logsumexp(b); both exponentials overflow",
         None, None, (), _log_softmax),
    Rule("norm", "sqrt(Σ b²) = m·sqrt(Σ (b/m)²); b² overflows for |b| > 1e154, and the gradient "
                 "b/sqrt(Σ b²) is 0/0 at b = 0 where the convention is 0",
         None, None, (), norm),
    Rule("norm_difference", "‖a - b‖ with the coordinates a_k - b_k taken as 0 where both are the same infinity "
                            "(inf - inf is NaN; the other coordinates decide)", None, None, (), norm_difference),
    Rule("div_norm", "a / ‖b‖ = xdivy(a, ‖b‖): normalizing a zero vector gives 0 (and gradient 0), not 0/0",
         None, None, (), div_norm, post=True),
    Rule("unit_vector", "b_t/‖b‖ = unit(b_t, ‖b‖, count of infinite b_k): at b = [inf, 1] the unit vector is "
                        "[1, 0], where b_t/‖b‖ is inf/inf = NaN", None, None, (), unit_vector, post=True),
)


ROOT_RULES = (
    Rule("hard_labels", hard_labels.__doc__.splitlines()[0], None, None, (), None),
    Rule("zero_weights", zero_weights.__doc__.splitlines()[0], None, None, (), None),
    Rule("scale_first", scale_first.__doc__.splitlines()[0], None, None, (), None),
    Rule("annihilate", annihilate.__doc__.splitlines()[0], None, None, (), None),
    Rule("unit_adjoint", unit_adjoint.__doc__.splitlines()[0], None, None, (), None),
)


def _try_rules(node, fired, pre=False):
    for rule in NODE_RULES:
        if rule.final or (pre and rule.post):
            continue
        out = rule.apply(node)
        if out is not None and out != node:
            fired.add(rule.name)
            return out
    return None


def _bottom_up(expr, fired):
    """Rewrite a node before its children (the widest pattern wins), then after them."""
    if expr.is_Atom:
        return expr
    out = _try_rules(expr, fired, pre=True)
    if out is not None:
        return _bottom_up(out, fired)
    new = _with_args(expr, lambda a: _bottom_up(a, fired))
    out = _try_rules(new, fired)
    return _bottom_up(out, fired) if out is not None else new


def _with_args(expr, rewrite):
    """``expr`` with its arguments rewritten; a reduction's body only (rules never look through a
    reduction's index)."""
    if isinstance(expr, Reduce):
        k, size, body, cond = expr.args
        return expr.func(k, size, rewrite(body), cond)
    args = [rewrite(a) for a in expr.args]
    return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr


def _named(name, rewrite, expr, fired):
    """One named pass over ``expr``: its result, with ``name`` in ``fired`` where it changed anything."""
    new = rewrite(expr)
    if new != expr:
        fired.add(name)
    return new


def stabilize(expr, facts=None, is_input=None, fired=None, gradient=False):
    """Rewrite ``expr`` to its stable form.

    ``facts``: {Symbol: domain name} of scalar targets; ``is_input(e)``: does e depend on an
    input (enables the zero_weights guard); ``fired`` collects the names of the rules that fired;
    ``gradient``: the expression is a gradient (enables the annihilate pass).
    """
    fired = set() if fired is None else fired
    if facts:
        expr = _named("hard_labels", lambda e: hard_labels(e, facts), expr, fired)
    while True:
        new = _bottom_up(expr, fired)
        if new == expr:
            break
        expr = new
    if is_input is not None:
        expr = _named("zero_weights", lambda e: zero_weights(e, is_input), expr, fired)
        expr = _named("scale_first", lambda e: scale_first(e, is_input), expr, fired)
    if gradient:
        expr = _named("annihilate", annihilate, expr, fired)
    return _lower(expr, fired)


def _lower(expr, fired):
    """The final rules, bottom-up, once: lowerings the other rules and passes need not see through."""
    if expr.is_Atom:
        return expr
    new = _with_args(expr, lambda a: _lower(a, fired))
    for rule in NODE_RULES:
        out = rule.apply(new) if rule.final else None
        if out is not None and out != new:
            fired.add(rule.name)
            return out.func(*[_lower(a, fired) for a in out.args])
    return new
