"""Rewrites of norms, unit vectors and squared distances (ntxent, contrastive, triplet), for the
rule table in rules.py: each function takes a node and returns its stable form or None.

‖b‖ overflows at b = [fmax, fmax] and is 0/0 in its gradient at 0; b/‖b‖ is inf/inf at an infinite
coordinate; x² - y² cancels where x ≈ y; the adjoint of u = z/‖z‖ cancels at the largest |z_L|.
"""
import sympy as sp

from .primitives import (IsArg, Max, Norm, Sum, at_peak, isinf, nanflag, overflow_or, sqdist_diff,
                         sqdist_diff_small, subpeak, substitute, unit, xdivy)


def difference_of_squares(node):
    # x² - y² -> (x - y)(x + y): no cancellation when x ≈ y, no overflow where x² alone overflows
    if not node.is_Add:
        return None
    sq = [(t, t.as_coeff_Mul()) for t in node.args]
    sq = [(t, c, r.base) for t, (c, r) in sq if r.is_Pow and r.exp == 2 and not r.base.is_number and c in (1, -1)]
    for t1, c1, x_ in sq:
        for t2, c2, y_ in sq:
            if c1 == 1 and c2 == -1:
                rest = [a for a in node.args if a is not t1 and a is not t2]
                common = set(sp.Add.make_args(x_)) & set(sp.Add.make_args(y_))
                if len(common) == 1 and len(x_.args) == len(y_.args) == 2:
                    # (a - p)² - (a - n)²: squared distances from a common point, with their limits at
                    # infinite coordinates (sympy's (n - p)(2a - n - p) is inf·0 at a = inf, n = p)
                    a = common.pop()
                    return sp.Add(sqdist_diff(a, a - x_, a - y_), *rest)
                return sp.Add(sp.Mul(x_ - y_, x_ + y_), *rest)
    return None


def rescue_overflow(node):
    # ... + Σ_k sqdist_diff(...) -> ... + overflow_or(Σ_k sqdist_diff(...), Σ_k sqdist_diff_small(...)):
    # the terms overflow (inf - inf, or inf where they cancel) or meet infinite coordinates where the
    # sum's sign is still defined; the scaled copy is summed in the same loop. (On the sum's parent, so
    # the copy is not rescued again.)
    if isinstance(node, overflow_or) or node.is_Atom:
        return None
    for r in node.args:
        if type(r) is Sum and type(r.body) is sqdist_diff:
            small = Sum(r.index, r.size, sqdist_diff_small(*r.body.args), r.cond)
            return node.func(*[overflow_or(r, small) if a is r else a for a in node.args])
    return None


def norm_times_unit(node):
    # ‖b‖·xdivy(a, ‖b‖) -> a (the gradient of ‖b‖²): a/‖b‖ underflows to 0 for a small coordinate next
    # to a huge one (3e-28 vs 0) before the product restores it; at b = 0 both are 0
    if not node.is_Mul:
        return None
    for f in node.args:
        if not (isinstance(f, (xdivy, unit)) and isinstance(f.args[1], Norm)):
            continue
        r = f.args[1]
        rest = list(node.args)
        rest.remove(f)
        if r in rest:
            rest.remove(r)
            return sp.Mul(f.args[0], *rest)
        for pw in rest:
            # (c·‖b‖ if cond else d)·xdivy(a, ‖b‖): into the branches, where the norm cancels in one
            if isinstance(pw, sp.Piecewise) and any(r in sp.Mul.make_args(ex) for ex, _ in pw.args):
                others = sp.Mul(*[g for g in rest if g is not pw])
                return others * sp.Piecewise(*[(ex * f, c) for ex, c in pw.args])
    return None


def tangent_projection(node):
    # x_l/‖z‖ - (Σ_d x_d·z_d/‖z‖²)·z_l/‖z‖ (the adjoint x of u = z/‖z‖ carried to z) -> at the largest
    # |z_L|: (x_L·Σ_{d≠L} u_d² - u_L·Σ_{d≠L} x_d·u_d)/‖z‖, elsewhere (x_l - u_l·Σ_d x_d·u_d)/‖z‖. At L,
    # 1 - u_L² and x_L - u_L·x_L·u_L cancel (Σ u² = 1): small coordinates next to a huge one are lost
    if not node.is_Add:
        return None
    for t in node.args:
        f = [a for a in sp.Mul.make_args(t) if type(a) is Sum]
        if len(f) != 1 or not isinstance(f[0].body, sp.Mul):
            continue
        r, rest = f[0], t / f[0]
        inner = [a for a in r.body.args if isinstance(a, xdivy) and isinstance(a.args[0], (xdivy, unit))]
        if len(inner) != 1 or inner[0].args[1] != inner[0].args[0].args[1] or r.cond is not sp.true:
            continue
        norm = inner[0].args[1]
        if not isinstance(norm, Norm) or norm.cond is not sp.true:
            continue
        el_d = inner[0].args[0].args[0]                # z(m, d)
        x_d = r.body / inner[0]
        outer = [a for a in sp.Mul.make_args(rest) if isinstance(a, (xdivy, unit)) and a.args[1] == norm]
        if len(outer) != 1 or sp.Mul.make_args(rest / outer[0]) != (-1,):
            continue
        el_l = outer[0].args[0]                        # z(m, l)
        at = {el_d.args[i]: el_l.args[i] for i in range(len(el_d.args)) if el_d.args[i] == r.index}
        if len(at) != 1 or substitute(el_d, at) != el_l:
            continue
        l = at[r.index]
        x_l = substitute(x_d, at)
        forms = (x_l / norm, xdivy(x_l, norm), sp.Piecewise((0, sp.Eq(norm, 0)), (x_l / norm, True)),
                 x_l * sp.Piecewise((0, sp.Eq(norm, 0)), (1 / norm, True)))
        first = next((a for a in node.args if a in forms), None)
        if first is None:
            continue
        k = r.index
        peak = Max(k, r.size, sp.Abs(el_d), sp.true)
        u = lambda e: _unit_of(e, norm)                # noqa: E731
        others = sp.Eq(IsArg(peak, k), 0)
        peak_form = x_l * Sum(k, r.size, u(el_d) ** 2, others) - u(el_l) * Sum(k, r.size, x_d * u(el_d), others)
        elsewhere = x_l - u(el_l) * Sum(k, r.size, x_d * u(el_d), sp.true)
        over = lambda e: _over_norm(e, norm)          # noqa: E731
        new = sp.Piecewise((0, sp.Eq(norm, 0)), (at_peak(over(peak_form), over(elsewhere), IsArg(peak, l)), True))
        rest_terms = [a for a in node.args if a is not t and a is not first]
        return sp.Add(new, *rest_terms)
    return None


def _over_norm(a, norm):
    """a/‖b‖ as unit(a, ‖b‖, ...), (a/m)/q with m = max_k |b_k| and q = ‖b/m‖: ‖b‖ itself overflows at
    b = [fmax, fmax] (a/inf is 0 where the truth is 1e-307); at an infinite b_k, the limit 0 (NaN for a NaN a,
    which unit would drop: another row's NaN reaches this one through a similarity)."""
    return _unit_of(a, norm) + nanflag(a)


def _unit_of(a, norm):
    """unit(a, ‖b‖, ...): its count of infinite b_k, max |b_k| and norm of b/max, over the norm's range."""
    k, size, body, cond = norm.args
    peak = Max(k, size, sp.Abs(body), cond)
    return unit(a, norm, Sum(k, size, isinf(body), cond), peak, Norm(k, size, xdivy(body, peak), cond))


def unit_vector(node):
    # xdivy(b(t), norm_k b(k)) -> unit(b(t), norm, Σ_k isinf(b(k)), m, norm_k b(k)/m), m = max_k |b(k)|: a
    # coordinate of the unit vector, (b(t)/m)/‖b/m‖ (‖b‖ overflows at b = [fmax, fmax]: u = 0, not 0.707;
    # it rounds to a subnormal for subnormal b), with its limit at infinite coordinates sign(b(t))/sqrt(count)
    # (b(t)/‖b‖ is inf/inf = NaN)
    if not (isinstance(node, xdivy) and isinstance(node.args[1], Norm)):
        return None
    a, r = node.args
    if isinstance(a, sp.core.function.AppliedUndef) and any(substitute(r.body, {r.index: t}) == a for t in a.args):
        return _unit_of(a, r)
    return None


def norm(node):
    # sqrt(Σ_k b_k²) -> norm_k b_k: scaled (no overflow) and with gradient 0 at 0, not 0/0.
    if node.is_Pow and node.exp == sp.Rational(1, 2) and isinstance(node.base, Sum):
        s = node.base
        if s.body.is_Pow and s.body.exp == 2:
            return Norm(s.index, s.size, s.body.base, s.cond)
    return None


def norm_difference(node):
    # norm_k (a(k) - b(k)) -> norm_k subpeak(a(k), b(k)): a coordinate where both points are the same
    # infinity contributes 0, not NaN, so the other (infinite) coordinates decide the distance
    if isinstance(node, Norm) and node.body.is_Add and len(node.body.args) == 2:
        element = sp.core.function.AppliedUndef
        pos = [t for t in node.body.args if isinstance(t, element)]
        neg = [-t for t in node.body.args if isinstance(-t, element)]
        if len(pos) == 1 and len(neg) == 1:
            return Norm(node.index, node.size, subpeak(pos[0], neg[0]), node.cond)
    return None


def div_norm(node):
    # a / norm_k b -> xdivy(a, norm): a zero vector divided by its norm is 0, not 0/0
    if not node.is_Mul:
        return None
    for f in node.args:
        if f.is_Pow and f.exp == -1 and isinstance(f.base, Norm):
            return xdivy(node / f, f.base)
    return None
