"""Root rules: passes over a whole loss (or gradient) that need the declarations' domains or which
symbols are inputs, where the node rules (rules.py) see one node at a time. ``stabilize`` runs
hard_labels before the node rules and the others after them; compiler.py runs unit_adjoint over a
batch loss's adjoints. Each pass's docstring opens with the line rules.ROOT_RULES shows."""
import sympy as sp
from sympy import KroneckerDelta

from .primitives import Norm, Reduce, ScaledSum, Sum, mul0, nanflag, sigmoid, unit, xmul, xsq


def hard_labels(expr, facts):
    """y·A + (1-y)·B at y ∈ {0, 1}: specialize so a power of a vanishing base stays finite.

    Focal's (1 - p_t)^γ with γ < 1 has a gradient γ·u^(γ-1)·u' that is inf·0 = NaN where u
    underflows; specialized at y = 1, u is σ(-z) and the powers combine into σ(-z)^γ·σ(z).
    Binary targets are always in {0, 1} (a select); unit targets keep the general form for
    soft labels, where u stays away from 0.
    """
    out = expr
    for sym, domain in facts.items():
        if domain not in ("unit", "binary") or sym not in out.free_symbols:
            continue
        risky = any(p.base.has(sym) and not p.exp.is_number for p in out.atoms(sp.Pow))
        if domain == "binary":
            out = sp.Piecewise((out.xreplace({sym: 1}), sp.Eq(sym, 1)), (out.xreplace({sym: 0}), True))
        elif risky:
            out = sp.Piecewise((out.xreplace({sym: 1}), sp.Eq(sym, 1)), (out.xreplace({sym: 0}), sp.Eq(sym, 0)),
                               (out, True))
    return out


def zero_weights(expr, is_input, excluded=frozenset()):
    """w·A where w is free of inputs: 0 when w = 0, even where A is ±inf (0·inf is NaN).

    label_smoothing/K · Σ_k z_k with label_smoothing = 0 and a masked (-inf) logit is 0, as in
    the definition; y·softplus(-z) at y = 0, z = -inf likewise.
    """
    if expr.is_Atom:
        return expr
    if isinstance(expr, Reduce):
        k, size, body, cond = expr.args
        return expr.func(k, size, zero_weights(body, is_input, excluded), cond)
    if isinstance(expr, sp.Piecewise):
        pieces, seen = [], set(excluded)
        for ex, c in expr.args:
            pieces.append((zero_weights(ex, is_input, frozenset(seen)), c))
            seen.add(c)
        return sp.Piecewise(*pieces)
    args = [zero_weights(a, is_input, excluded) for a in expr.args]
    new = expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr
    if isinstance(new, xsq) and not is_input(new.args[1]) and _may_be_infinite(new.args[0], is_input):
        # c·x² (scaled_square) is a product too: β/2·μ² of a β-VAE with the weight on each term
        guard = sp.Eq(new.args[1], 0)
        if guard not in excluded and not isinstance(guard, sp.logic.boolalg.BooleanAtom):
            return sp.Piecewise((_nan_of(new.args[0], is_input), guard), (new, True))
    if new.is_Mul:
        weights = [f for f in new.args if not f.is_number and not is_input(f) and not f.is_positive]
        if weights and any(_may_be_infinite(f, is_input) for f in new.args):
            guard = sp.Eq(sp.Mul(*weights), 0)
            if guard not in excluded and not isinstance(guard, sp.logic.boolalg.BooleanAtom):
                # 0·A is 0 for A = ±inf (or inf - inf), but NaN for a NaN input (NaN in, NaN out)
                rest = sp.Mul(*[f for f in new.args if f not in weights])
                return sp.Piecewise((_nan_of(rest, is_input), guard), (new, True))
    return new


def scale_first(expr, is_input):
    """A mean's terms c·f(x)/K as c_n·(...·(c_1·(f(x)/K))): the scale first, then each weight alone.

    pos_weight·y·softplus(-z)/K overflows at pos_weight·softplus(-z) (3·3.4e38 in float32) where the
    term is finite, and pos_weight·y underflows to 0 (0.5·1e-45) where the term is 5e-8.
    """
    if expr.is_Atom:
        return expr
    if type(expr) is ScaledSum and expr.body.is_Mul:
        k, size, body, cond = expr.args
        scale = [f for f in body.args if f.is_Pow and f.exp == -1 and f.base == size]
        if scale:
            rest = sp.Mul(*[f for f in body.args if f not in scale])
            return ScaledSum(k, size, _weights_last(scale_first(rest, is_input), sp.Mul(*scale), is_input), cond)
    args = [scale_first(a, is_input) for a in expr.args]
    return expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr


def _weights_last(e, s, is_input):
    if e.is_Add:
        return sp.Add(*[_weights_last(t, s, is_input) for t in e.args])
    if isinstance(e, sp.Piecewise):
        return sp.Piecewise(*[(_weights_last(ex, s, is_input), c) for ex, c in e.args])
    if e.is_Mul:
        inputs = [f for f in e.args if is_input(f)]
        weights = [f for f in e.args if not f.is_number and not is_input(f)]
        if len(inputs) == 1 and weights:
            out = inputs[0] * s
            # elements (targets: y ∈ [0, 1]) before params (pos_weight may be large)
            for w in sorted(weights, key=lambda w: not w.atoms(sp.core.function.AppliedUndef)):
                out = xmul(w, out)
            return sp.Mul(*[f for f in e.args if f.is_number], out)
    return e * s


def _nan_of(e, is_input):
    """0, or NaN where an input that e reads is NaN: nanflag of each input leaf, reductions kept."""
    if isinstance(e, Reduce):
        k, size, body, cond = e.args
        inner = _nan_of(body, is_input)
        return Sum(k, size, inner, cond) if inner != 0 else sp.S.Zero
    if e.is_Symbol or isinstance(e, sp.core.function.AppliedUndef):
        return nanflag(e) if is_input(e) else sp.S.Zero
    if e.is_Atom or isinstance(e, sp.logic.boolalg.Boolean):
        return sp.S.Zero
    args = [a.expr if isinstance(a, sp.functions.elementary.piecewise.ExprCondPair) else a for a in e.args]
    return sp.Add(*{_nan_of(a, is_input) for a in args})


def _may_be_infinite(e, is_input):
    if e.is_number or not is_input(e) or isinstance(e, (sigmoid, sp.tanh, sp.sign, KroneckerDelta)):
        return False
    if e.is_Mul or e.is_Add or isinstance(e, sp.Piecewise):
        return any(_may_be_infinite(a, is_input) for a in e.args if not isinstance(a, sp.logic.boolalg.Boolean)
                   or a.is_Symbol)
    if isinstance(e, sp.functions.elementary.piecewise.ExprCondPair):
        return _may_be_infinite(e.expr, is_input)
    return True


def annihilate(expr, excluded=frozenset()):
    """In a gradient, a factor that is 0 decides the product, even against inf or NaN partners.

    [cond]·A is A where cond holds and 0 elsewhere (relu(x)^γ at x < 0 has A = 0^(γ-1) = inf);
    e^u·A is 0 where e^u underflows to 0 (the entropy term p·log p of a masked logit has
    A = log p = -inf).
    """
    if expr.is_Atom or isinstance(expr, (Reduce, mul0)):
        if isinstance(expr, Reduce):
            k, size, body, cond = expr.args
            return expr.func(k, size, annihilate(body, excluded), cond)
        return expr
    if isinstance(expr, sp.Piecewise):
        pieces, seen = [], set(excluded)
        for ex, c in expr.args:
            pieces.append((annihilate(ex, frozenset(seen)), c))
            seen.add(c)
        return sp.Piecewise(*pieces)
    args = [annihilate(a, excluded) for a in expr.args]
    new = expr.func(*args) if any(a is not b for a, b in zip(args, expr.args)) else expr
    if not new.is_Mul:
        return new
    for f in new.args:
        if isinstance(f, sp.Piecewise) and any(ex == 0 for ex, _ in f.args):
            # [cond]·A -> A where cond, else 0; (0 if c else w)·A -> 0 if c else w·A
            rest = list(new.args)
            rest.remove(f)
            return sp.Piecewise(*[(ex * sp.Mul(*rest) if ex != 0 else ex, c) for ex, c in f.args])
    unbounded = [f for f in new.args if _may_be_infinite(f, lambda e: True)]
    if any(f.atoms(sp.Function) - f.atoms(sigmoid) - f.atoms(sp.core.function.AppliedUndef)
           for f in unbounded):
        # σ(a) underflows to 0 where a -> -inf, and its partner grows at most like |a| there
        # (softplus(-a)·σ(a) of a focal gradient at z = ±inf is inf·0, the limit 0): the sigmoid
        # decides. A sum whose terms share a sigmoid gives it up first: -y·σ(-z)σ(z) + (1-y)·σ(-z)σ(z).
        factors = []
        for f in new.args:
            g = sp.factor_terms(f) if f.is_Add and f.has(sigmoid) else f
            factors.extend(g.args if g.is_Mul and any(isinstance(a, sigmoid) for a in g.args) else (f,))
        sigs = [f for f in factors if isinstance(f, sigmoid)]
        if sigs:
            rest = list(factors)
            for f in sigs:
                rest.remove(f)
            out = sp.Mul(*rest)
            for f in reversed(sigs):
                out = mul0(f, out)
            return out
    for f in new.args:
        # e^u is never 0 in exact arithmetic (so sympy drops Eq(e^u, 0)), but it is in floats
        if isinstance(f, sp.exp) and len(unbounded) > 1:
            rest = list(new.args)
            rest.remove(f)
            return mul0(f, sp.Mul(*rest))
    return new


def unit_adjoint(locals_, adjoints, grads):
    """The adjoint of a unit-vector local drops its own direction: D(m, m) = 0 in Σ_k D(k, m)·u(k, l).

    u(i, d) = unit(x(i, d), ‖x(i, ·)‖, ...) reaches x only through the Jacobian (I - u_i u_iᵀ)/‖x_i‖,
    which sends u_m itself to 0: a term c_m·u(m, l) of u's adjoint at (m, l) adds nothing in exact
    arithmetic, but in floats the projection cancels it only to c_m·ε (u_m·u_m rounds to 1 ± ε).
    NT-Xent with a row its own positive: s_mm = u_m·u_m/τ gives the adjoint 2u_m/τ, and the z
    gradient of a row whose true gradient is 1e-11 of that lost 15 bits. Where u's adjoint is
    linear in sums Σ_k D(k, m)·u(k, l) or Σ_k D(m, k)·u(k, l) (coefficients free of l), D an earlier
    adjoint read nowhere else, D's diagonal is set to 0 (the sums stay matrix products).
    ``locals_``: (name, fn, idx, axes, body); ``adjoints``: (name, fn, at, axes, expr), in the order
    computed; ``grads``: the inputs' gradients. Returns the adjoints, with the names of those changed.
    """
    bodies = {name: (fn, idx, body) for name, fn, idx, _, body in locals_}
    out, changed = list(adjoints), []
    for name, _, at, _, g in adjoints:
        fn, idx, body = bodies[name]
        if type(body) is not unit or not isinstance(body.args[1], Norm):
            continue
        rows = [p for p, a in enumerate(idx) if a in body.args[1].free_symbols]
        if len(rows) != 1 or len(idx) != 2:
            continue
        r, c = rows[0], 1 - rows[0]
        m, l = at[r], at[c]
        for D in _self_term_coefficients(g, fn, r, c, m, l):
            if D not in {entry[1] for entry in out}:
                continue                                # a target or input array: its diagonal is data
            uses = [e for *_, e in out] + [e for e, _ in grads.values()]
            if sum(len([a for a in e.atoms(sp.core.function.AppliedUndef) if a.func == D]) for e in uses) \
                    != len(_self_term_coefficients(g, fn, r, c, m, l, D)):
                continue
            k = next(q for q, entry in enumerate(out) if entry[1] == D)
            dname, dfn, dat, daxes, dg = out[k]
            out[k] = (dname, dfn, dat, daxes, sp.Piecewise((dg, sp.Ne(*dat)), (0, True)))
            changed.append(dname)
    return out, changed


def _self_term_coefficients(g, fn, r, c, m, l, only=None):
    """The 2-d arrays D read as Σ_k D(k, m)·fn(.., k, .., l, ..) or Σ_k D(m, k)·fn(...), where g is linear in
    the sum with coefficients free of l; with ``only``, the list of those reads of D (to count them)."""
    found = []

    def walk(e):
        if e.is_Add:
            for a in e.args:
                walk(a)
        elif e.is_Mul:
            with_l = [a for a in e.args if l in a.free_symbols]
            if len(with_l) == 1:
                walk(with_l[0])
        elif type(e) is Sum and e.cond is sp.true and e.body.is_Mul and len(e.body.args) == 2:
            k = e.index
            u = [f for f in e.body.args if getattr(f, "func", None) == fn and f.args[r] == k and f.args[c] == l]
            if len(u) == 1:
                d = e.body / u[0]
                if isinstance(d, sp.core.function.AppliedUndef) and set(d.args) == {k, m} and len(d.args) == 2:
                    found.append(d)
    walk(g)
    if only is not None:
        return [d for d in found if d.func == only]
    return list(dict.fromkeys(d.func for d in found))
