"""The middle of the pipeline: IR -> sympy -> stabilize -> derive -> stabilize.

    parse (lower.py) -> to_sympy -> stabilize (rules.py) -> gradient (derive.py) -> stabilize
"""
from dataclasses import dataclass

import sympy as sp

from .derive import fresh_indices, gradient
from .primitives import Sum, naive
from .root_rules import unit_adjoint
from .rules import stabilize
from .to_sympy import Lowered, to_sympy


@dataclass
class Compiled:
    lowered: Lowered
    expr: object                # stabilized per-sample loss
    grads: dict                 # input name -> (stabilized gradient, index Symbols)
    fired: tuple                # names of the rules that fired
    locals: tuple = ()          # batch losses: (name, fn, index Symbols, axes, body), forward order
    adjoints: tuple = ()        # (name, adjoint fn, index Symbols, axes, expr), in the order computed

    @property
    def definition(self):
        return self.lowered.definition


def input_test(low):
    """A predicate: does an expression depend on a differentiated input?"""
    defn = low.definition
    syms = {low.scalars[d.name] for d in defn.of_kind("input") if not d.axes}
    fns = {low.arrays[d.name][0] for d in defn.of_kind("input") if d.axes} | {fn for _, fn, *_ in low.locals}

    def is_input(e):
        return bool(e.free_symbols & syms) or any(a.func in fns for a in e.atoms(sp.core.function.AppliedUndef))
    return is_input


def compile_definition(defn, lookup, stable=True, fixed=()):
    """The definition's loss and gradients; ``stable=False`` gives the textbook lowering
    (every primitive replaced by its naive formula, no rules), to show what the rules buy.
    ``fixed``: (param, value) pairs compiled in as constants (a kernel specialized for the values
    a call passes, e.g. γ = 2: the power becomes a product instead of a powf per element); the
    kernel still takes those params as arguments, and ignores them.

    Batch losses keep their indexed locals as buffers and differentiate in reverse: the
    adjoint of a local X is d(loss + Σ_Y Σ Ȳ·Y)/dX over the locals Y computed from X.
    """
    low = to_sympy(defn, lookup)
    if fixed:
        consts = {low.scalars[name]: sp.Integer(v) for name, v in fixed}
        low.expr = low.expr.subs(consts)
        low.locals = [(n, fn, idx, axes, body.subs(consts)) for n, fn, idx, axes, body in low.locals]
    facts = {low.scalars[d.name]: d.domain.name for d in defn.of_kind("target") if not d.axes}
    is_input = input_test(low)
    fired = set()
    if stable:
        def before(e):
            return stabilize(e, facts, is_input, fired)

        def after(e):
            # zero_weights guards only the forward pass: its Piecewise carries into the gradient.
            return stabilize(e, None, None, fired, gradient=True)
    else:
        before = after = naive
    expr = before(low.expr)
    local_list = [(n, fn, idx, axes, before(body)) for n, fn, idx, axes, body in low.locals]
    terms, adjoints = [expr], []
    for name, fn, idx, axes, body in reversed(local_list):
        at = fresh_indices(sp.Add(*terms), axes, avoid=idx)
        g = after(sp.Add(*[gradient(t, fn, at) for t in terms]))
        adj = sp.Function("d_" + name, real=True)
        adjoints.append((name, adj, at, axes, g))
        terms.append(_sum_over(adj(*idx) * body, idx, [low.sizes[a] for a in axes]))
    grads = {}
    for d in defn.of_kind("input"):
        idx = fresh_indices(sp.Add(*terms), d.axes) if d.axes else ()
        wrt = low.arrays[d.name][0] if d.axes else low.scalars[d.name]
        grads[d.name] = (after(sp.Add(*[gradient(t, wrt, idx) for t in terms])), idx)
    if stable:
        adjoints, changed = unit_adjoint(local_list, adjoints, grads)
        if changed:
            fired.add("unit_adjoint")
    return Compiled(low, expr, grads, tuple(sorted(fired)), tuple(local_list), tuple(adjoints))


def _sum_over(expr, idx, sizes):
    for k, size in reversed(list(zip(idx, sizes))):
        expr = Sum(k, size, expr, sp.true)
    return expr
