"""CPU back end: one self-contained numba module per (loss, dtype).

The kernel is fused: one parallel loop over samples computes each sample's reductions, its
loss and the gradient of every input, and accumulates the weighted total. Targets are checked
inside the same loop *before* anything is read through them (a class target indexes the
logits), and a count of bad samples is returned so the caller can raise a clear error.

    kernel(inputs..., targets..., params..., sizes..., w, out, grads..., scale, ignore)
        -> (total, bad)
"""
import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.functions.elementary.piecewise import ExprCondPair

from .emit import Emitter
from .primitives import IsArg, Reduce

# Branch thresholds of the stable primitives, per dtype (Mächler 2012 for softplus).
THRESHOLDS = {
    "float64": dict(sp_lo=-37.0, sp_mid=18.0, sp_hi=33.3, lc_small=0.5),
    "float32": dict(sp_lo=-17.0, sp_mid=9.0, sp_hi=15.0, lc_small=0.5),
}

HELPERS = '''
@numba.njit(inline="always")
def _sigmoid(x):
    # two branches: neither e^x nor e^-x overflows
    if x >= 0:
        return F(1.0) / (F(1.0) + math.exp(-x))
    e = math.exp(x)
    return e / (F(1.0) + e)


@numba.njit(inline="always")
def _softplus(x):
    # log(1 + e^x) within an ulp: e^x far left, x + e^-x right, x far right
    if x < F({sp_lo}):
        return math.exp(x)
    if x < F({sp_mid}):
        return math.log1p(math.exp(x))
    if x < F({sp_hi}):
        return x + math.exp(-x)
    return x


@numba.njit(inline="always")
def _logcosh(x):
    # log cosh x = log1p(2 sinh^2(x/2)) near 0 (keeps relative accuracy), else |x| + log1p(e^-2|x|) - log 2
    a = abs(x)
    if a < F({lc_small}):
        s = math.sinh(a * F(0.5))
        return math.log1p(F(2.0) * s * s)
    return a + math.log1p(math.exp(F(-2.0) * a)) - F(0.6931471805599453)


@numba.njit(inline="always")
def _xlogy(x, y):
    if x == 0 and y == y:
        return F(0.0)
    return x * math.log(y)


@numba.njit(inline="always")
def _xdivy(x, y):
    if x == 0 and y == y:
        return F(0.0)
    return x / y


@numba.njit(inline="always")
def _max2(a, b):
    if a != a or b != b:
        return a + b
    return a if a >= b else b


@numba.njit(inline="always")
def _min2(a, b):
    if a != a or b != b:
        return a + b
    return a if a <= b else b


@numba.njit(inline="always")
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


class Signature:
    """The kernel's arguments, and how sympy atoms map onto them."""

    def __init__(self, compiled):
        defn = compiled.definition
        low = compiled.lowered
        self.inputs = [d for d in defn.of_kind("input")]
        self.targets = [d for d in defn.of_kind("target")]
        self.params = [d for d in defn.of_kind("param")]
        self.sizes = list(low.sizes)                       # axis names, in order
        self.batch = defn.batch
        self.array_of = {d.name: f"a{i}" for i, d in enumerate(self.inputs + self.targets)}
        self.grad_of = {d.name: f"g{i}" for i, d in enumerate(self.inputs)}
        self.has_class = any(d.domain.name == "class" for d in self.targets)

    def args(self):
        names = [self.array_of[d.name] for d in self.inputs + self.targets]
        names += [f"p{i}" for i in range(len(self.params))]
        names += [f"K{i}" for i in range(len(self.sizes))]
        names += ["w", "out"] + [self.grad_of[d.name] for d in self.inputs] + ["scale", "ignore"]
        return names


def render(compiled, dtype):
    """The module source for one dtype ('float32' or 'float64')."""
    sig = Signature(compiled)
    low = compiled.lowered
    lead = "" if sig.batch else "n, "
    names = {}
    for i, d in enumerate(sig.params):
        names[low.scalars[d.name]] = f"p{i}"
    for i, a in enumerate(sig.sizes):
        names[low.sizes[a]] = f"F(K{i})"
    scalar_vars = {}
    for d in sig.inputs + sig.targets:
        if not d.axes:
            var = "v_" + sig.array_of[d.name]
            names[low.scalars[d.name]] = var
            scalar_vars[d.name] = var
    fn_array = {low.arrays[d.name][0]: sig.array_of[d.name] for d in sig.inputs + sig.targets if d.axes}

    def element(fn, idx):
        return f"{fn_array[fn]}[{lead}{', '.join(idx)}]"

    em = Emitter(names, element)
    em.depth = 2 if not sig.batch else 1
    body_start = len(em.lines)
    size_var = {low.sizes[a]: f"K{i}" for i, a in enumerate(sig.sizes)}
    for d in sig.inputs + sig.targets:          # scalars of this sample
        if not d.axes:
            em.line(f"{scalar_vars[d.name]} = {sig.array_of[d.name]}[{lead.rstrip(', ')}]"
                    if not sig.batch else f"{scalar_vars[d.name]} = {sig.array_of[d.name]}[0]")
    _checks(em, sig, low, scalar_vars, size_var)
    # loop-invariant parts of each gradient move out of its per-element loop
    hoisted, maps = [], []
    for d in sig.inputs:
        g, idx = compiled.grads[d.name]
        if d.axes:
            g = _hoist(g, set(idx), hoisted, em)
            maps.append((d, g, idx))
        else:
            hoisted.append((f"d_{sig.grad_of[d.name]}", g))
    em.scope([("val", compiled.expr)] + hoisted, set())
    em.line("wn = F(1.0) if w is None else w[n]" if not sig.batch else "wn = F(1.0)")
    em.line("total += float(wn * val)")
    em.line("if out is not None:")
    em.line(f"    out[{lead.rstrip(', ') or '0'}] = wn * val")
    if sig.inputs:
        em.line(f"if {sig.grad_of[sig.inputs[0].name]} is not None:")
        em.depth += 1
        em.line("c = wn * scale")
        for d in sig.inputs:
            if not d.axes:
                em.line(f"{sig.grad_of[d.name]}[{lead.rstrip(', ') or '0'}] = c * d_{sig.grad_of[d.name]}")
        for d, g, idx in maps:
            _map_loop(em, d, g, idx, sig, lead, size_var, low)
        em.depth -= 1
    body = em.lines[body_start:]
    return _module(sig, dtype, body, compiled)


def _checks(em, sig, low, scalar_vars, size_var):
    """Count bad targets before reading through them; skip ignored samples."""
    lead = "" if sig.batch else "n, "
    em.line("bad_row = False")
    for d in sig.targets:
        if d.domain.name == "class" and not d.axes:
            v, size = scalar_vars[d.name], size_var[low.sizes[d.domain.axis]]
            em.line(f"if {v} == ignore:")
            _zero_sample(em, sig)
            em.line("    continue")
            em.line(f"if {v} < 0 or {v} >= {size}:")
            em.line("    bad_row = True")
            continue
        if d.domain.name == "class":
            size = size_var[low.sizes[d.domain.axis]]
            cond = "({v} >= 0 and {v} < %s)" % size
        else:
            cond = DOMAIN_CHECKS.get(d.domain.name)
        if cond is None:
            continue
        if not d.axes:
            em.line(f"if not {cond.format(v=scalar_vars[d.name])}:")
            em.line("    bad_row = True")
            continue
        idx = ", ".join(f"q{i}" for i in range(len(d.axes)))
        for i, a in enumerate(d.axes):
            em.line("    " * i + f"for q{i} in range(K{sig.sizes.index(a)}):")
        em.line("    " * len(d.axes) + f"if not {cond.format(v=f'{sig.array_of[d.name]}[{lead}{idx}]')}:")
        em.line("    " * len(d.axes) + "    bad_row = True")
    em.line("if bad_row:")
    em.line("    bad += 1")
    _zero_sample(em, sig)
    em.line("    continue")


def _zero_sample(em, sig):
    row = "0" if sig.batch else "n"
    em.line("    if out is not None:")
    em.line(f"        out[{row}] = F(0.0)")
    if sig.inputs:
        em.line(f"    if {sig.grad_of[sig.inputs[0].name]} is not None:")
        for d in sig.inputs:
            em.line(f"        {sig.grad_of[d.name]}[{':' if sig.batch else 'n'}] = F(0.0)")


def _hoist(g, idx, hoisted, em):
    """Replace maximal subexpressions free of the map indices with precomputed variables."""
    if isinstance(g, ExprCondPair):
        return ExprCondPair(_hoist(g.expr, idx, hoisted, em), g.cond)
    if not isinstance(g, sp.Expr) or g.is_Atom:
        return g
    if not (g.free_symbols & idx):
        var = em.fresh("h")
        sym = sp.Symbol("_" + var, real=True)
        em.names[sym] = var
        hoisted.append((var, g))
        return sym
    if isinstance(g, (AppliedUndef, Reduce, sp.KroneckerDelta, IsArg)):
        return g
    args = [_hoist(a, idx, hoisted, em) for a in g.args]
    return g.func(*args) if any(a is not b for a, b in zip(args, g.args)) else g


def _map_loop(em, d, g, idx, sig, lead, size_var, low):
    loops = []
    for i, (s, axis) in enumerate(zip(idx, d.axes)):
        var = em.fresh("j")
        em.loop_vars[s] = var
        em.line(f"for {var} in range({size_var[low.sizes[axis]]}):")
        em.depth += 1
        loops.append(var)
    em.scope([("gv", g)], set(idx))
    em.line(f"{sig.grad_of[d.name]}[{lead}{', '.join(loops)}] = c * gv")
    em.depth -= len(idx)


def _module(sig, dtype, body, compiled):
    args = ", ".join(sig.args())
    th = THRESHOLDS[dtype]
    head = [f"# Generated by lossdsl for loss '{compiled.definition.name}', {dtype}. Do not edit.",
            "import math", "import numba", "import numpy as np", "", f"F = np.{dtype}",
            HELPERS.format(**th), "",
            "@numba.njit(parallel=True, cache=True, error_model='numpy', nogil=True)",
            f"def kernel({args}):"]
    first = f"{sig.array_of[(sig.inputs + sig.targets)[0].name]}.shape[0]"
    if sig.batch:
        lines = head + ["    total = 0.0", "    bad = 0", "    for _once in range(1):",
                        "        n = 0"] + ["    " + ln for ln in body] + ["    return total, bad", ""]
    else:
        lines = head + [f"    N = {first}", "    total = 0.0", "    bad = 0",
                        "    for n in numba.prange(N):"] + body + ["    return total, bad", ""]
    return "\n".join(lines)
