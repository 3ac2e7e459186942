"""Losses and gradients as on paper (LANGUAGE.md section 7).

The kernel's expression carries branches that exist only to get edge cases exactly right:
``(0 if label_smoothing == 0 else -label_smoothing/K)`` avoids 0·∞ at a masked logit,
``mul0``/``xdivy``/``xlogy`` are products and quotients that are 0 where a factor vanishes.
For reading, ``paper()`` takes a display copy of the expression and

* writes the stable primitives that have no paper name (fsum, xexp, xexpm1, sqexp, addexp,
  lse_minus, nanflag, a ScaledSum's mean, ...) as their naive formulas (``primitives.naive``),
* keeps the general branch of each Piecewise whose condition is an equality (a zero
  parameter, a hard label in a vanishing term, a zero norm) and lists the others as edge cases,
* shows hard-label specializations (``y = 1``, ``y = 0``) and genuine regions (``|r| <= delta``)
  as cases, the general case last ("otherwise"),
* writes known forms by name (``softmax(z)[j]``, ``log_softmax(z)[k]``, ``‖a - p‖``) and
  simplifies (factoring out common factors).

Nothing here changes the kernels: ``--exact`` prints the form they compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p
from sympy.core.function import AppliedUndef
from sympy.logic.boolalg import ITE, Boolean

from .primitives import LogSumExp, Max2, Min2, Reduce, ScaledSum, Sum, logcosh, mul0, sigmoid, softplus, xdivy, xlogy

HARD = {"binary", "unit", "sign"}        # target domains whose values ±1, 0, 1 are hard labels


# --------------------------------------------------------------------------- display nodes

class Display(sp.Function):
    """A node that exists only for printing."""
    is_real = True


class softmax(Display):
    """softmax(z)[j]: args (z as a Symbol or a row s[i], j[, the filter: k ≠ i])."""
    nargs = (2, 3)


class log_softmax(Display):
    nargs = (2, 3)


class Ind(Display):
    """[cond]: 1 where cond holds, else 0."""
    nargs = 1


class NormOf(Display):
    """‖body‖ with the reduction index dropped (``‖a - p‖`` for Σ_d (a[d] - p[d])²)."""
    nargs = 1


# --------------------------------------------------------------------------- result

@dataclass
class Edge:
    """One edge case: where ``conds`` hold, ``kind`` happens to ``term``."""
    conds: tuple            # sympy conditions (the path of cases, then the edge's own)
    kind: str               # "zero" | "value" | "mul0" | "xdivy" | "xlogy"
    term: object            # the general expression affected (None: the whole gradient)
    value: object = None    # for "value": what the kernel uses instead
    other: object = None    # for mul0/xdivy/xlogy: the other operand


@dataclass
class Form:
    cases: list             # [(cond or None for "otherwise"/the only case, display expr)]
    edges: list = field(default_factory=list)
    notes: list = field(default_factory=list)   # [(text words, expr)]
    where: list = field(default_factory=list)   # [(Symbol, display expr)]: the definition's names used


class Context:
    """What is known about the loss's symbols: hard-label and simplex targets, which names
    are inputs and targets (terms are printed inputs first)."""

    def __init__(self, loss=None):
        self.hard, self.simplex = set(), set()
        self.input_names, self.target_names = set(), set()
        if loss is None:
            return
        self.input_names, self.target_names = set(loss.inputs), set(loss.targets)
        low = loss._c.lowered
        for d in low.definition.of_kind("target"):
            if d.domain.name in HARD and not d.axes:
                self.hard.add(low.scalars[d.name])
            elif d.domain.name == "simplex":
                self.simplex.add(low.arrays[d.name][0])

    def rank(self, term):
        """0 for a term with an input, 1 with a target, 2 for parameters alone (printing order)."""
        names = {s.name for s in term.free_symbols} | {f.func.__name__ for f in term.atoms(AppliedUndef)}
        return 0 if names & self.input_names else 1 if names & self.target_names else 2


# --------------------------------------------------------------------------- naive display

# Primitives with a paper name of their own (σ, softplus, log(cosh), max, min), and the guarded
# products and quotients the splitter turns into edge cases. Every other stable primitive
# (fsum, xexp, xexpm1, sqexp, addexp, lse_minus, subpeak, nanflag, ...) is shown through its
# naive formula, the textbook form it computes accurately.
NAMED = (sigmoid, softplus, logcosh, Max2, Min2, mul0, xdivy, xlogy)


def _naive_display(e):
    """Stable primitives without a paper name written as their naive formulas; a ScaledSum (a mean
    with 1/K inside the loop) as the Sum it is on paper (1/K back outside)."""
    if e.is_Atom:
        return e
    args = [_naive_display(a) for a in e.args]
    if isinstance(e, (Sum, ScaledSum)) and e.args[2] != 0 and args[2] == 0:
        return sp.S.Zero        # a sum of zeros (a NaN flag per element, 0 on paper)
    if isinstance(e, ScaledSum):
        return Sum(*args)
    if isinstance(e, sp.Function) and hasattr(e, "naive") and not isinstance(e, NAMED + (Reduce,)):
        return e.func(*args, evaluate=False).naive() if args != list(e.args) else e.naive()
    return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e


# --------------------------------------------------------------------------- splitting

def _is_edge(cond):
    """An equality (or a conjunction of them): a measure-zero set, an edge case."""
    if isinstance(cond, sp.Eq):
        return True
    return isinstance(cond, sp.And) and all(isinstance(c, sp.Eq) for c in cond.args)


def _is_hard_label(cond, ctx):
    return isinstance(cond, sp.Eq) and cond.lhs in ctx.hard and cond.rhs.is_number


class _Splitter:
    def __init__(self, ctx):
        self.ctx, self.edges, self.handled = ctx, [], set()

    def general(self, e, path=(), whole=True):
        """The general branch of ``e``; the edge branches go to self.edges."""
        if e.is_Atom:
            return e
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e, path, whole)
        if isinstance(e, (mul0, xdivy)) and isinstance(e.args[0], e.func):
            # (a/b)/c, 0 where a/b is 0, which is where a is: one edge, a/(b·c) with a = 0
            (a, b), c = e.args[0].args, e.args[1]
            return self.general(e.func(a, b * c), path, whole)
        if isinstance(e, (mul0, xdivy, xlogy)):     # a·b, a/b, a·log(b), but 0 where a = 0
            a, b = (self.general(x, path, False) for x in e.args)
            value = {mul0: a * b, xdivy: a / b, xlogy: a * sp.log(b)}[e.func]
            # σ(x) is never 0 on paper: mul0(σ(x), b) guards its underflow only, where the product's
            # limit is 0 (annihilate), the formula's value as written; no edge case
            if not (a.is_number and a != 0) and not (e.func is mul0 and isinstance(a, sigmoid)):
                self.edges.append(Edge(path + (sp.Eq(a, 0, evaluate=False),), e.func.__name__, value, other=b))
            return value
        if isinstance(e, Reduce):
            k, size, body, cond = e.args
            return e.func(k, size, self.general(body, path, False), cond)
        if e.is_Mul and any(isinstance(f, sp.Piecewise) or f.is_Add and f.has(sp.Piecewise) for f in e.args):
            return self._product(e, path, whole)
        if isinstance(e, ITE):                      # a branch inside a condition
            c, a, b = e.args
            if _is_edge(c):
                return self.general(b, path, False)
            return ITE(c, self.general(a, path, False), self.general(b, path, False))
        if isinstance(e, (sp.core.relational.Relational, sp.And, sp.Or, sp.Not)) or not isinstance(e, Boolean):
            return e.func(*[self.general(a, path, False) for a in e.args])
        return e

    def _product(self, e, path, whole):
        """A guarded factor (``(0 if β = 0 else β/2)·(e^s - 1)``) zeroes the whole product: its edge
        names the product (or the gradient), not the factor. A guarded summand inside a factor
        (``((0 if ε = 0 else ε) - 1)·[j = y]``, a guard kept from the loss) is folded where the
        general branch is a parameter term that the condition makes exactly 0: it is not a term of
        the printed sum, and the printed formula gives the kernel's value there."""
        factors, owned, nested = [], [], []
        for f in e.args:
            start = len(self.edges)
            factors.append(self.general(f, path, False))
            made = self.edges[start:]
            if isinstance(f, sp.Piecewise):
                owned += [x for x in made if x.kind == "zero"]
            elif f.is_Add:
                direct = {a for a in f.args if isinstance(a, sp.Piecewise)}
                nested += [x for x in made if x.kind == "zero" and x.term is not None
                           and any(x.conds[-1] in (c for _, c in a.args) for a in direct)
                           and self._vanishes(x.term, x.conds[-1])]
        value = sp.Mul(*factors)
        for x in owned:
            x.term = None if whole else value
        self.edges = [x for x in self.edges if not any(x is y for y in nested)]
        return value

    def _vanishes(self, term, cond):
        """``term`` holds parameters only (it is finite) and is exactly 0 where ``cond`` holds."""
        return isinstance(cond, sp.Eq) and self.ctx.rank(term) == 2 and term.subs(cond.lhs, cond.rhs) == 0

    def _piecewise(self, e, path, whole):
        pairs = list(e.args)
        keep = []
        rest = pairs[-1].expr
        hard = [(ex, c) for ex, c in pairs[:-1] if _is_hard_label(c, self.ctx) and ex != 0]
        if hard:                                    # y = 1 / y = 0 specializations: cases
            branches = [(self.general(ex, path + (c,), whole), c) for ex, c in pairs[:-1]]
            conds = {c for _, c in pairs[:-1]}
            self.handled |= conds                    # inside the soft-label branch they are dead
            rest = self.general(rest, path, whole)
            self.handled -= conds
            return sp.Piecewise(*branches, (rest, True))
        general = self.general(rest, path, whole)
        for ex, c in pairs[:-1]:
            if c in self.handled:
                continue
            if _is_edge(c):
                value = self.general(ex, path + (c,), False)
                if value == 0:
                    self.edges.append(Edge(path + (c,), "zero", None if whole else general))
                else:
                    self.edges.append(Edge(path + (c,), "value", None if whole else general, value))
            else:
                keep.append((self.general(ex, path, whole), self.general(c, path, False)))
        if not keep:
            return general
        if len(keep) == 1 and general == 0:
            return Ind(keep[0][1]) * keep[0][0]
        return sp.Piecewise(*keep, (general, True))


# --------------------------------------------------------------------------- known forms

def _named(e):
    """softmax, log_softmax, ‖x‖, e^x - 1 and log(1 + x) written out, indicators by name."""
    def lse_of(arg):
        """(z, j) if arg is z[j] - logsumexp[k] z[k] (with the filter if there is one), else None."""
        if not arg.is_Add:
            return None
        lse = [t for t in arg.args if t.could_extract_minus_sign() and isinstance(-t, LogSumExp)]
        if len(lse) != 1:
            return None
        rest = arg - lse[0]
        k, size, body, cond = (-lse[0]).args
        if isinstance(body, AppliedUndef) and _vectorial(body, k) and isinstance(rest, AppliedUndef) \
                and rest.func == body.func and rest.args[:-1] == body.args[:-1]:
            row = _drop_index(body, k)                    # z, or s[i] for s[i, j]
            return (row, rest.args[-1]) + (() if cond is sp.true else (cond,))
        return None

    def visit(x):
        if x.is_Atom:
            return x
        if isinstance(x, sp.exp):
            m = lse_of(x.args[0])
            if m:
                return softmax(*m)
        if x.is_Add:
            m = lse_of(x)
            if m:
                return log_softmax(*m)
        if isinstance(x, expm1):
            return sp.exp(visit(x.args[0])) - 1
        if isinstance(x, log1p):
            return sp.log(1 + visit(x.args[0]))
        if isinstance(x, sp.Piecewise) and len(x.args) == 2 and x.args[1].cond is sp.true \
                and x.args[1].expr == 0:
            return Ind(x.args[0].cond) * visit(x.args[0].expr)
        if isinstance(x, Reduce):
            k, size, body, cond = x.args
            body = visit(body)
            squares = _squares_of(x.func, k, size, body, cond)
            if squares is not None:
                return visit(squares)
            if x.func.__name__ == "Norm" and cond is sp.true and _vectorial(body, k):
                return NormOf(_drop_index(body, k))
            if isinstance(x, Sum) and cond is sp.true and isinstance(body, sp.Pow) and body.exp == 2 \
                    and _vectorial(body.base, k) and body.base.is_Add:
                return NormOf(_drop_index(body.base, k)) ** 2
            return x.func(k, size, body, cond)
        if isinstance(x, Boolean) and not isinstance(x, sp.core.relational.Relational):
            return x
        return x.func(*[visit(a) for a in x.args])
    return visit(e)


def _squares_of(func, k, size, body, cond):
    """Σ_k (x - y)(x + y) or Σ_k (x² - y²) for vectors x, y (a difference of squares the rules formed so
    that the squared norms do not overflow or cancel) as Σ_k x² - Σ_k y², written ‖x‖² - ‖y‖²; else None."""
    if func is not Sum or cond is not sp.true:
        return None
    if body.is_Add and len(body.args) == 2:
        # sqdist_diff's (a - p)² - (a - n)²
        sq = [t.as_coeff_Mul() for t in body.args]
        if sorted(c for c, _ in sq) == [-1, 1] and all(r.is_Pow and r.exp == 2 and _vectorial(r, k) for _, r in sq):
            return sp.Add(*[c * Sum(k, size, r, cond) for c, r in sq])
    if not body.is_Mul:
        return None
    c, factors = body.as_coeff_mul()
    if len(factors) != 2 or not all(f.is_Add for f in factors):
        return None
    u, v = factors
    halves = []
    for h in (sp.expand((u + v) / 2), sp.expand((u - v) / 2)):
        if not (h.is_Add and _vectorial(h, k) and all(t.as_coeff_Mul()[0].is_Integer for t in h.args)):
            return None
        first = min(h.args, key=lambda t: sp.default_sort_key(t.as_coeff_Mul()[1]))
        halves.append(-h if first.could_extract_minus_sign() else h)
    x, y = halves
    return c * Sum(k, size, x ** 2, cond) - c * Sum(k, size, y ** 2, cond)


def _vectorial(body, k):
    """Every array in body is indexed by k last (z[k], or z[i, k] as a row z[i])."""
    fns = body.atoms(AppliedUndef)
    return bool(fns) and all(f.args[-1] == k and k not in f.args[:-1] for f in fns) \
        and k not in body.xreplace({f: sp.S.Zero for f in fns}).free_symbols


def _drop_index(body, k):
    """z[k] -> z, z[i, k] -> z[i]."""
    return body.xreplace({f: f.func(*f.args[:-1]) if len(f.args) > 1 else sp.Symbol(f.func.__name__, real=True)
                          for f in body.atoms(AppliedUndef)})


def _simplex_sums(e, ctx):
    """Σ_k p[k] = 1 for a simplex target p."""
    if not ctx.simplex:
        return e
    return e.replace(lambda x: isinstance(x, Sum) and x.cond is sp.true and isinstance(x.body, AppliedUndef)
                     and x.body.func in ctx.simplex and x.body.args == (x.index,),
                     lambda x: sp.S.One)


def tidy(e):
    """Common factors out (σ(-z)^(γ+1) seen as σ(-z)^γ·σ(-z)), otherwise as sympy keeps it."""
    if isinstance(e, sp.Piecewise):
        return sp.Piecewise(*[(tidy(ex), c) for ex, c in e.args])
    try:
        out = sp.factor_terms(sp.expand_power_exp(e))
    except Exception:  # noqa: BLE001 - display only: fall back to the expression as it is
        return e
    if out.is_Mul and out.could_extract_minus_sign():          # -c·(y - mu) written c·(mu - y)
        sums = [f for f in out.args if f.is_Add]
        if len(sums) == 1 and any(t.could_extract_minus_sign() for t in sums[0].args):
            rest = [f for f in out.args if f is not sums[0]]
            out = sp.Mul(-sp.Mul(*rest), sp.Add(*[-t for t in sums[0].args]))
    return out if sp.count_ops(out) <= sp.count_ops(e) else e


def _fold(e):
    """One Piecewise inside a product (``(a if y = 1 else b)·c``) becomes cases of the whole."""
    pws = list(e.atoms(sp.Piecewise))
    if isinstance(e, sp.Piecewise) or len(pws) != 1 or any(pws[0] in r.atoms(sp.Piecewise) for r in e.atoms(Reduce)):
        return e
    try:
        return sp.piecewise_fold(e)
    except Exception:  # noqa: BLE001 - display only
        return e


def _max_ind(e):
    """max(0, x)·[x > 0] is x·[x > 0]."""
    def fix(m):
        inds = {i.args[0] for i in m.args if isinstance(i, Ind)}
        out = []
        for f in m.args:
            if isinstance(f, Max2) and f.args[0] == 0 and (f.args[1] > 0) in inds:
                f = f.args[1]
            out.append(f)
        return sp.Mul(*out)
    return e.replace(lambda x: x.is_Mul and any(isinstance(f, Ind) for f in x.args), fix)


def _conditions(e):
    """a + m - b > 0 written b < a + m: the one subtracted term moves to the other side."""
    def move(r):
        neg = [t for t in r.lhs.args if t.could_extract_minus_sign()]
        if len(neg) != 1:
            return r
        flip = {sp.StrictGreaterThan: sp.StrictLessThan, sp.GreaterThan: sp.LessThan,
                sp.StrictLessThan: sp.StrictGreaterThan, sp.LessThan: sp.GreaterThan}[type(r)]
        return flip(-neg[0], r.lhs - neg[0], evaluate=False)
    return e.replace(lambda x: isinstance(x, (sp.StrictGreaterThan, sp.GreaterThan, sp.StrictLessThan, sp.LessThan))
                     and x.rhs == 0 and x.lhs.is_Add, move)


LONG = 20                   # a case with more operations than this is written with the definition's names


def definition_names(loss):
    """The definition's scalar locals that are sums (``p_t = y*p + (1 - y)*(1 - p)``), as
    (Symbol, display expression), to write long formulas with: sums are what sympy expands."""
    from dataclasses import replace

    from . import ir
    from .rules import stabilize
    from .to_sympy import to_sympy
    out = []
    d = loss._defn
    for st in () if d.batch else d.stmts:
        if st.indices:
            continue
        alone = replace(d, loss=replace(d.loss, expr=ir.Name(st.span, st.name)))
        try:
            raw = stabilize(to_sympy(alone, loss._lookup).expr)
            e = tidy(_named(_naive_display(raw)))
            # 1 - p as the rules write it (1 - y·σ(z) - (1 - y)·σ(-z) is y·σ(-z) + (1 - y)·σ(z))
            rest = _named(_naive_display(stabilize(1 - raw)))
        except Exception:  # noqa: BLE001 - display only: this name is simply not used
            continue
        if e.is_Add:
            out.append((sp.Symbol(st.name, real=True), e, rest))
    return out


def _with_names(e, names):
    """``e`` with the definition's names substituted where they shorten it; the names used.
    ``names``: (Symbol, value) or (Symbol, value, 1 - value as the rules write it)."""
    used = []
    for sym, value, *rest in names:
        new = e.subs(value, sym).subs(1 - value, 1 - sym)
        for r in rest:
            if r != 1 - value:
                new = new.subs(r, 1 - sym)
        if sp.count_ops(new) < sp.count_ops(e):
            e = new
            used.append((sym, value))
    return e, used


def paper(expr, loss=None, ctx=None) -> Form:
    """The paper form of a loss or gradient expression: cases, edge cases, notes."""
    ctx = ctx or Context(loss)
    split = _Splitter(ctx)
    general = _fold(_conditions(_max_ind(_named(split.general(_naive_display(expr))))))
    notes = []
    simple = _simplex_sums(general, ctx)
    if simple != general:
        names = ", ".join(sorted(f.__name__ for f in ctx.simplex))
        notes.append((f"the kernel computes, for any {names}:", tidy(general)))
        general = simple
    general = tidy(general)
    if isinstance(general, sp.Piecewise):
        cases = [(c if c is not sp.true else None, ex) for ex, c in general.args]
    else:
        cases = [(None, general)]
    where = []
    if loss is not None and any(sp.count_ops(ex) > LONG for _, ex in cases):
        names = definition_names(loss)
        for i, (c, ex) in enumerate(cases):
            if sp.count_ops(ex) > LONG:
                ex, used = _with_names(ex, names)
                cases[i] = (c, ex)
                where += [u for u in used if u not in where]
    edges = []
    for edge in split.edges:
        edge.term = None if edge.term is None else _named(edge.term)
        edge.other = None if edge.other is None else _named(edge.other)
        edge.value = None if edge.value is None else tidy(_named(edge.value))
        edge.conds = tuple(sp.Eq(_with_names(_named(c.lhs), where)[0], c.rhs, evaluate=False)
                           if isinstance(c, sp.Eq) else c for c in edge.conds)
        edges.append(edge)
    return Form(cases, edges, notes, where)
