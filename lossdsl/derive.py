"""Symbolic gradients: sympy's diff for the elementwise part, the chain rule over reductions.

The loss is a function of its elementwise symbols, of array elements ``z(t)`` and of reduction
results ``R``. With those replaced by placeholders, sympy differentiates the rest; then

    dL/dz[j] = Σ_elements ∂L/∂z(t)·[t = j]  +  Σ_R ∂L/∂R · dR/dz[j]
    d sum_k b(k)       = Σ_k b'(k)              d logsumexp_k b(k) = Σ_k e^(b(k) - R)·b'(k)
    d max_k b(k)       = Σ_k [k = argmax]·b'(k)  d norm_k b(k)      = Σ_k xdivy(b(k), R)·b'(k)

and a Σ_k whose term carries [k = t] collapses to the term at k = t. The result stays indexed
and small ("softmax minus one-hot"), never a page of KroneckerDelta.
"""
import sympy as sp
from sympy import KroneckerDelta

from .primitives import IsArg, LogSumExp, Max, Min, Norm, Reduce, Sum, indicator, substitute, xdivy


def gradient(expr, wrt, index=()):
    """d expr / d wrt; ``wrt`` is a Symbol, or an UndefinedFunction with ``index`` its free indices."""
    g = _Deriver(wrt, tuple(index)).d(expr)
    g = g.replace(lambda e: isinstance(e, (sp.DiracDelta, sp.Heaviside)), lambda e: sp.S.Zero)
    return g


def fresh_indices(expr, axes, avoid=()):
    """One new index Symbol per axis, named so it clashes with nothing in ``expr``."""
    taken = {s.name for s in expr.free_symbols} | {str(a) for a in avoid}
    taken |= {r.index.name for r in expr.atoms(Reduce)}
    out = []
    for _ in axes:
        name = next(n for n in ("j", "m", "l", "q", "r", "t") + tuple(f"j{i}" for i in range(99)) if n not in taken)
        taken.add(name)
        out.append(sp.Symbol(name, integer=True))
    return tuple(out)


class _Deriver:
    def __init__(self, wrt, index):
        self.wrt, self.index = wrt, index
        self.is_array = not isinstance(wrt, sp.Symbol)

    def depends(self, e):
        if self.is_array:
            return any(a.func == self.wrt for a in e.atoms(sp.core.function.AppliedUndef))
        return self.wrt in e.free_symbols

    def d(self, e):
        if not self.depends(e):
            return sp.S.Zero
        holes = {}
        self._collect(e, holes)
        plain = e.xreplace(holes)
        total = plain.diff(self.wrt) if not self.is_array else sp.S.Zero
        for node, hole in holes.items():
            if isinstance(node, IsArg):
                continue                       # piecewise constant
            dn = self._d_node(node)
            if dn != 0:
                total += plain.diff(hole) * dn
        back = {h: n for n, h in holes.items()}
        return total.xreplace(back)

    def _collect(self, e, holes):
        """Outermost reductions, argmax indicators and elements of wrt become placeholders."""
        if isinstance(e, (Reduce, IsArg)) or (self.is_array and getattr(e, "func", None) == self.wrt):
            if e not in holes and self.depends(e):
                holes[e] = sp.Dummy(real=True)
            return
        for a in e.args:
            self._collect(a, holes)

    def _d_node(self, node):
        if not isinstance(node, Reduce):      # an element z(t): [t = index]
            return sp.Mul(*(KroneckerDelta(t, j) for t, j in zip(node.args, self.index)))
        k, size, body, cond = node.args
        db = self.d(body)
        if db == 0:
            return sp.S.Zero
        weight = {Sum: sp.S.One, LogSumExp: sp.exp(body - node), Max: IsArg(node, k),
                  Min: IsArg(node, k), Norm: xdivy(body, node)}[Sum if isinstance(node, Sum) else type(node)]
        return collapse(k, size, weight * db, cond)


def _split_deltas(term):
    deltas = [f for f in sp.Mul.make_args(term) if isinstance(f, KroneckerDelta)]
    return sp.Mul(*deltas), term / sp.Mul(*deltas)


def delta_terms(e):
    """e as a sum of terms with every KroneckerDelta at the top of its term."""
    if not e.has(KroneckerDelta):
        return [e]
    if e.is_Add:
        return [t for a in e.args for t in delta_terms(a)]
    if e.is_Mul:
        parts = [sp.S.One]
        for f in e.args:
            parts = [p * g for p in parts for g in delta_terms(f)]
        return parts
    if isinstance(e, sp.Piecewise):
        # Piecewise((a·δ, c), (b·δ, True)) = δ·Piecewise((a, c), (b, True))
        by_delta = {}
        for i, (ex, c) in enumerate(e.args):
            for t in delta_terms(ex):
                dl, rest = _split_deltas(t)
                by_delta.setdefault(dl, [sp.S.Zero] * len(e.args))[i] += rest
        return [dl * sp.Piecewise(*[(co, pc.cond) for co, pc in zip(coefs, e.args)])
                for dl, coefs in by_delta.items()]
    return [e]


def collapse(k, size, term, cond):
    """Σ_{k: cond} term, with [k = t] factors summed out: the term at k = t (times cond(t))."""
    out, keep = [], {}
    for t in delta_terms(term):
        deltas, rest = _split_deltas(t)
        hit = next((dl for dl in sp.Mul.make_args(deltas) if k in dl.args and
                    k not in (dl.args[1] if dl.args[0] == k else dl.args[0]).free_symbols), None)
        if hit is None:
            # [t = j] free of k is factored out of the sum; [pos(k) = j] stays inside it
            inside = sp.Mul(*[dl for dl in sp.Mul.make_args(deltas) if k in dl.free_symbols])
            keep.setdefault(deltas / inside, []).append(rest * inside)
            continue
        at = hit.args[1] if hit.args[0] == k else hit.args[0]
        others = substitute(deltas / hit, {k: at})
        guard = substitute(cond, {k: at})
        guard = sp.S.One if guard is sp.true else indicator(guard)
        out.append(others * guard * substitute(rest, {k: at}))
    for deltas, rests in keep.items():
        body = sp.Add(*rests)
        # factors free of k move out of the sum: Σ_k c·b(k) = c·Σ_k b(k)
        outside = [f for f in sp.Mul.make_args(body) if k not in f.free_symbols]
        inside = [f for f in sp.Mul.make_args(body) if k in f.free_symbols]
        out.append(deltas * sp.Mul(*outside) * Sum(k, size, sp.Mul(*inside), cond))
    return sp.Add(*out)
