"""The middle of the pipeline: IR -> sympy -> stabilize -> derive -> stabilize.

    parse (lower.py) -> to_sympy -> stabilize (rules.py) -> gradient (derive.py) -> stabilize
"""
from dataclasses import dataclass

import sympy as sp

from .derive import fresh_indices, gradient
from .primitives import naive
from .rules import stabilize
from .to_sympy import Lowered, to_sympy


@dataclass
class Compiled:
    lowered: Lowered
    expr: object                # stabilized per-sample loss
    grads: dict                 # input name -> (stabilized gradient, index Symbols)
    fired: tuple                # names of the rules that fired

    @property
    def definition(self):
        return self.lowered.definition


def input_test(low):
    """A predicate: does an expression depend on a differentiated input?"""
    defn = low.definition
    syms = {low.scalars[d.name] for d in defn.of_kind("input") if not d.axes}
    fns = {low.arrays[d.name][0] for d in defn.of_kind("input") if d.axes}

    def is_input(e):
        return bool(e.free_symbols & syms) or any(a.func in fns for a in e.atoms(sp.core.function.AppliedUndef))
    return is_input


def compile_definition(defn, lookup, stable=True):
    """The definition's loss and gradients; ``stable=False`` gives the textbook lowering
    (every primitive replaced by its naive formula, no rules), to show what the rules buy."""
    low = to_sympy(defn, lookup)
    if not stable:
        expr = naive(low.expr)
        grads = {}
        for d in defn.of_kind("input"):
            idx = fresh_indices(expr, d.axes) if d.axes else ()
            wrt = low.arrays[d.name][0] if d.axes else low.scalars[d.name]
            grads[d.name] = (naive(gradient(expr, wrt, idx)), idx)
        return Compiled(low, expr, grads, ())
    facts = {low.scalars[d.name]: d.domain.name for d in defn.of_kind("target") if not d.axes}
    is_input = input_test(low)
    fired = set()
    expr = stabilize(low.expr, facts, is_input, fired)
    grads = {}
    for d in defn.of_kind("input"):
        if d.axes:
            idx = fresh_indices(expr, d.axes)
            g = gradient(expr, low.arrays[d.name][0], idx)
        else:
            idx, g = (), gradient(expr, low.scalars[d.name])
        # zero_weights guards only the forward pass: the guards' Piecewise carries into the gradient.
        grads[d.name] = (stabilize(g, None, None, fired), idx)
    return Compiled(low, expr, grads, tuple(sorted(fired)))
