"""Contractions as matrix products: Σ_k P(p, k)·Q(k, q) over two free indices p, q.

A sum whose body splits into a factor of (p, k) and a factor of (k, q) is element (p, q) of the
product P·Q. A batch kernel computes the whole product once through BLAS (np.dot, blocked for
the cache) rather than as a scalar triple loop per element: ntxent's similarities u·uᵀ/τ, and
the adjoint reverse mode gives it, (d_sᵀ·u + d_s·u)/τ, as one product (A + Aᵀ)·u
(``merge_transposed``).
"""
from dataclasses import dataclass
from itertools import permutations

import sympy as sp

from sympy.core.function import AppliedUndef

from .primitives import Reduce, Sum, substitute


@dataclass(frozen=True)
class Product:
    total: Sum          # the sum it replaces, Σ_k left·right
    p: sp.Symbol        # row index of the result
    q: sp.Symbol        # column index
    left: sp.Expr       # P(p, k): every factor free of q
    right: sp.Expr      # Q(k, q): every factor free of p


def products(e, is_index, order=()):
    """The contractions in ``e``, each once, outer before inner. ``is_index(s)``: is Symbol s a
    loop index (not a param or a size)? Rows follow ``order`` (the map's own indices) where it
    names them, so that a product read as X[i, j] in a loop over (i, j) is laid out that way."""
    found = {}
    for node in sp.preorder_traversal(e):
        if type(node) is Sum and node not in found:
            prod = _split(node, is_index, order)
            if prod is not None:
                found[node] = prod
    return list(found.values())


def merge_transposed(e):
    """Σ_k A(k, p)·R + Σ_k A(p, k)·R as Σ_k (A(p, k) + A(k, p))·R: one matrix product of A + Aᵀ
    for two, where reverse mode differentiates a Gram matrix s = u·uᵀ (both factors read u): the
    adjoint of u is d_sᵀ·u + d_s·u. Matched on a sum of two such reductions, R the same."""
    def merge(add):
        sums = [a for a in add.args if type(a) is Sum and a.cond is sp.true and a.body.is_Mul]
        for i, s1 in enumerate(sums):
            for s2 in sums[i + 1:]:
                k = s1.index
                if s2.size != s1.size:
                    continue
                b2 = substitute(s2.body, {s2.index: k})
                for f in s1.body.args:
                    if not (isinstance(f, AppliedUndef) and len(f.args) == 2 and k in f.args
                            and f.args[0] != f.args[1]):
                        continue
                    ft = f.func(*f.args[::-1])
                    if s1.body.xreplace({f: ft}) == b2:
                        rest = [a for a in add.args if a is not s1 and a is not s2]
                        pk = f if f.args[1] == k else ft
                        merged = Sum(k, s1.size, (pk + pk.func(*pk.args[::-1])) * (s1.body / f), sp.true)
                        return sp.Add(merged, *rest)
        return add
    return e.replace(lambda x: x.is_Add and any(type(a) is Sum for a in x.args), merge)


def read_locals(e, local_defs):
    """``e`` reading each local (name, fn, idx, axes, body) where it has the local's definition at
    other indices: the chain rule writes ntxent's u = z/‖z‖ out again in the gradient of z, as
    unit(z(m, d), ‖z(m)‖, ...), which the kernel then computed 3 times per element, 6 divisions,
    where the buffer of u holds it (float64 1024 x 128: the last pass 0.77 -> 0.55 ms)."""
    fns = {d[1] for d in local_defs}
    for _, fn, idx, _, body in local_defs:
        if not idx or any(a.func in fns for a in body.atoms(AppliedUndef)):
            continue            # one of other locals (s = u·uᵀ/τ): its adjoint may take its buffer
        fixed = body.free_symbols - set(idx)

        found = {}
        for node in sp.preorder_traversal(e):
            free = list(node.free_symbols - fixed)
            if node.func != body.func or len(free) != len(idx) or node in found:
                continue
            for order in permutations(free):
                if substitute(body, dict(zip(idx, order))) == node:
                    found[node] = fn(*order)
                    break
        e = e.xreplace(found)
    return e


def _split(r, is_index, order):
    if r.cond is not sp.true or not r.body.is_Mul or r.body.atoms(Reduce):
        return None
    free = sorted((s for s in r.free_symbols if is_index(s)),
                  key=lambda s: (order.index(s) if s in order else len(order), s.name))
    if len(free) != 2:
        return None
    p, q = free
    left, right = [], []
    for f in r.body.args:
        used = f.free_symbols
        if p in used and q in used:
            return None
        (right if q in used else left).append(f)
    left, right = sp.Mul(*left), sp.Mul(*right)
    if r.index not in left.free_symbols or r.index not in right.free_symbols:
        return None
    return Product(r, p, q, left, right)


def index_sizes(e, idx=(), sizes=()):
    """The size each index symbol of ``e`` ranges over: the map's own, then each reduction's
    (None for an index two reductions use over different sizes)."""
    out = dict(zip(idx, sizes))
    for node in sp.preorder_traversal(e):
        if isinstance(node, Reduce) and out.setdefault(node.index, node.size) != node.size:
            out[node.index] = None
    return out
