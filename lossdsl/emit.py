"""From stabilized sympy expressions to straight-line Python statements (shared by back ends).

``Emitter.scope`` turns named expressions into statements:
  1. every reduction computable here (its free indices bound) becomes loops, innermost first,
     reductions over the same axis fused into one loop: a max pass (max, argmax, the shift
     of logsumexp and norm) then a sum pass;
  2. piecewise expressions become if/else blocks grouped by their conditions, each branch with
     its own CSE, so nothing leaves the branch that guards it;
  3. the rest goes through sympy's CSE and the printer.
Identifiers are generated (a0, v0, t0, ...): user names never reach the source.

``gradient_plan`` is the per-sample plan both back ends render: which gradients are computed once
per sample, which are maps over the input's axes, and the softmax forms of a logsumexp's gradient
(the argmax split; numerators e^(b - m) by _expdiff, stored in the gradient buffer by their own pass
or recomputed: ``Emitter.store_softmax``). A back end lays the passes out through two hooks:
``loop_range`` (the iteration space of a reduction pass; CUDA shares it among a block's threads)
and ``after_pass`` (CUDA combines the threads' partial results).
"""
import itertools

import sympy as sp
from sympy import KroneckerDelta
from sympy.core.function import AppliedUndef
from sympy.functions.elementary.piecewise import ExprCondPair

from .primitives import (IsArg, LogSumExp, Max, Max2, Min, Min2, Norm, Reduce, ScaledSum, Select, Sum, addexp, addshift,
                         at_peak, expand, expm1, fsum, isinf, log1p, logcosh, mul0, nanflag, overflow_or, sqdist_diff,
                         sqdist_diff_small, sqdist_fast, sqexp, subpeak, substitute, unit, wshift, xdivy, xexp, xexpm1,
                         xlogy, xmul, xpow, xsq)


class ExpDiff(sp.Function):
    """e^(b - m) with the rounding error of b - m put back (the helper _expdiff): a softmax numerator
    that a back end recomputes rather than stores (``Emitter.store_softmax``). Printing only."""
    nargs = 2
    is_real = True


# sympy function -> helper or math function in the generated module
CALLS = {ExpDiff: "_expdiff", sp.exp: "_exp", sp.log: "math.log", log1p: "_log1p", expm1: "math.expm1",
         sp.tanh: "_tanh", sp.cosh: "math.cosh", sp.sinh: "_sinh", sp.Abs: "abs",
         sp.sign: "_sign", logcosh: "_logcosh",
         xlogy: "_xlogy", xdivy: "_xdivy", mul0: "_mul0", fsum: "_fsum3", nanflag: "_nanflag", subpeak: "_subpeak",
         wshift: "_wshift", addshift: "_addshift",
         unit: "_unit", isinf: "_isinf",
         xexp: "_xexp", xexpm1: "_xexpm1", sqexp: "_sqexp",
         addexp: "_addexp", xsq: "_xsq", xpow: "_xpow", xmul: "_xmul", sqdist_diff: "_sqdist_diff", sqdist_diff_small: "_sqdist_diff_small",
         sqdist_fast: "_sqdist_fast", overflow_or: "_overflow_or", at_peak: "_at_peak",
         Max2: "_max2", Min2: "_min2", sp.Max: "_max2", sp.Min: "_min2"}


LANES = 16          # a vector of float32 in AVX-512
ROW = sp.Symbol("_row", integer=True)     # a row reduction's free index, in the keys of Emitter.stored_rows


class Emitter:
    """Writes indented lines; ``names`` maps sympy atoms (symbols, elements) to code."""

    # The softmax numerators e^(b - m) of a logsumexp's gradient: stored in the gradient buffer by
    # their own pass and read back by the sum and the gradient (one exp per element), or, if False,
    # recomputed by both with the same _expdiff, which gives the same values (no buffer traffic).
    store_softmax = True

    add = "{acc} += {x}"        # a sum's step (the CPU's is reassociable, so that it vectorizes)
    calls = CALLS

    def __init__(self, names, element, element_code=None):
        self.lines, self.depth = [], 1
        self.names = dict(names)            # Symbol -> code string
        self.element = element              # (UndefinedFunction, [index code]) -> code string
        self.element_code = element_code    # (array name, index code) -> code string
        self.known = {}                     # Reduce -> variable name
        self.reduction_symbol = {}          # Reduce -> Symbol standing for it after it is computed
        self.exp_store = {}                 # LogSumExp -> (buffer, Σ, Σ_rest, max shift or None) of its softmax
        self.last_terms = set()             # symbols added last in a sum (the log1p part of a logsumexp)
        self.argvar = {}                    # Max/Min Reduce -> variable holding its argmax
        self.peaks = {}                     # max shift m of a logsumexp -> the arrays of its body
        self.loop_vars = {}                 # index Symbol -> loop variable name
        self.lanes = False                  # logsumexps as lane_loops (in store_row's passes)
        self.parts = {}                     # Reduce -> (variable of its value, of its peak or None)
        self.open_loops = 0                 # loops the current line is inside (0: the sample scope)
        self.counter = itertools.count()
        self.stored_rows = {}               # row reduction, its free index as ROW -> (value, peak, argmax)
                                            # arrays it was stored in: read, not computed again

    def fresh(self, stem):
        return f"{stem}{next(self.counter)}"

    def line(self, text):
        self.lines.append("    " * self.depth + text)

    # --- printing ---------------------------------------------------------------------------
    def code(self, e):
        if e in self.names:
            return self.names[e]
        if isinstance(e, Reduce):
            return self.known[e]
        if e.is_Integer or e.is_Rational or e.is_Float:
            return f"F({float(e)!r})"
        if e is sp.true or e is sp.false:
            return str(bool(e))
        if e is sp.nan:
            return "F(math.nan)"
        if e in (sp.oo, -sp.oo):
            return f"F({'-' if e == -sp.oo else ''}math.inf)"
        if isinstance(e, sp.core.function.AppliedUndef):
            return self.element(e.func, [self.index_code(a) for a in e.args])
        if e.is_Add:
            # c·a + c·b is printed c·(a + b): -2y + 2ŷ as 2(ŷ - y), which does not overflow first
            coeffs = {abs(a.as_coeff_Mul()[0]) for a in e.args}
            if len(coeffs) == 1 and (c := coeffs.pop()) != 1 and c.is_Rational and c != 0:
                return f"({self.code(c)}*{self.code(sp.Add(*[a / c for a in e.args]))})"
            last = [a for a in e.args if a.free_symbols & self.last_terms]
            parts = [self.code(a) for a in e.args if a not in last] + [self.code(a) for a in last]
            return "(" + " + ".join(parts) + ")"
        if e.is_Mul:
            num = [a for a in e.args if not (a.is_Pow and a.exp.is_negative and a.exp.is_number)]
            den = [a.base ** -a.exp for a in e.args if a not in num]
            if num and num[0] == -1:
                rest = sp.Mul(*num[1:])
                return "(-" + self.code(rest / sp.Mul(*den)) + ")"
            text = "*".join(self.code(a) for a in num) or "F(1.0)"
            if den:
                text += "/(" + "*".join(self.code(a) for a in den) + ")"
            return "(" + text + ")"
        if e.is_Pow:
            return self.pow_code(e.base, e.exp)
        if isinstance(e, sp.Piecewise):
            text = self.code(e.args[-1].expr)
            for i, (ex, c) in reversed(list(enumerate(e.args[:-1]))):
                if i == len(e.args) - 2 and e.args[-1].expr.is_number and _float_inequality(c):
                    # [a > b]·A at a NaN a or b is NaN, not 0: the comparison is neither true nor false
                    text = f"({text} if {self.code(c.negated)} else F(math.nan))"
                text = f"({self.code(ex)} if {self.code(c)} else {text})"
            return text
        if isinstance(e, KroneckerDelta):
            return f"(F(1.0) if {self.index_code(e.args[0])} == {self.index_code(e.args[1])} else F(0.0))"
        if isinstance(e, IsArg):
            return f"(F(1.0) if {self.index_code(e.args[1])} == {self.argvar[e.args[0]]} else F(0.0))"
        if isinstance(e, sp.core.relational.Relational):
            ints = e.lhs.is_integer and e.rhs.is_integer
            side = self.index_code if ints else self.code
            return f"({side(e.lhs)} {e.rel_op} {side(e.rhs)})"
        if isinstance(e, (sp.And, sp.Or)):
            return "(" + (" and " if isinstance(e, sp.And) else " or ").join(self.code(a) for a in e.args) + ")"
        if isinstance(e, Select):
            return f"({self.code(e.args[0])} if {self.code(e.args[2])} else {self.code(e.args[1])})"
        if isinstance(e, sp.ITE):
            return f"({self.code(e.args[1])} if {self.code(e.args[0])} else {self.code(e.args[2])})"
        if isinstance(e, sp.Not):
            return f"(not {self.code(e.args[0])})"
        if e.func in self.calls:
            return f"{self.calls[e.func]}({', '.join(self.code(a) for a in e.args)})"
        raise NotImplementedError(f"no code for {type(e).__name__}: {e}")

    def index_code(self, e):
        """Integer-valued code: loop indices, class targets, integer constants."""
        if e in self.loop_vars:
            return self.loop_vars[e]
        if e.is_Integer:
            return str(int(e))
        if e in self.names:
            return self.names[e].replace("F(", "(")  # sizes are printed as F(K) in float context
        if isinstance(e, sp.core.function.AppliedUndef):
            return self.element(e.func, [self.index_code(a) for a in e.args])
        if e.is_Add:
            return "(" + " + ".join(self.index_code(a) for a in e.args) + ")"
        raise NotImplementedError(f"not an index: {e}")

    def pow_code(self, base, exp):
        b = self.code(base)
        if exp.is_Integer and 1 <= abs(int(exp)) <= 4:
            prod = "*".join([b] * abs(int(exp)))
            return f"({prod})" if exp > 0 else f"(F(1.0)/({prod}))"
        if exp == sp.S.Half:
            return f"math.sqrt({b})"
        if exp == -sp.S.Half:
            return f"(F(1.0)/math.sqrt({b}))"
        return f"({b} ** {self.code(exp)})"

    # --- scopes ----------------------------------------------------------------------------
    def scope(self, named, bound):
        """Emit statements computing each (var, expr) in ``named`` with indices ``bound`` in scope."""
        self.reductions([e for _, e in named], bound)
        self.assign(named)

    def reductions(self, exprs, bound):
        todo = [r for r in computable(exprs, bound, self) if not self.load_shared(r)]
        rescues = _rescues(exprs, todo)
        todo = [r for r in todo if r not in rescues]
        levels = {}
        for r in todo:
            levels[r] = _level(r, todo, levels)
        for lv in sorted(set(levels.values())):
            groups = {}
            for r in todo:
                if levels[r] == lv:
                    groups.setdefault(r.size, []).append(r)
            for size, group in groups.items():
                self.reduction_loops(size, group, bound)
        for b, a in rescues.items():
            # overflow_or(a, b) reads b only where a is not finite (rare): b's own pass, only there
            self.line(f"if not abs({self.known[a]}) < math.inf:")
            self.depth += 1
            self.reduction_loops(b.size, [b], bound)
            self.depth -= 1
            self.line("else:")
            self.line(f"    {self.known[b]} = F(0.0)")

    def reduction_loops(self, size, group, bound):
        if self.lanes and all(isinstance(r, LogSumExp) and r not in self.exp_store for r in group):
            return self.lane_loops(size, group, bound)
        k = sp.Symbol(self.fresh("_k"), integer=True)
        kvar = self.fresh("k")
        self.loop_vars[k] = kvar
        bodies = {r: substitute(r.body, {r.index: k}) for r in group}
        conds = {r: substitute(r.cond, {r.index: k}) for r in group}
        acc = {r: self.fresh("r") for r in group}
        shifted = [r for r in group if isinstance(r, (Max, Min, LogSumExp, Norm))]
        summed = [r for r in group if isinstance(r, (Sum, LogSumExp, Norm))]
        peak = {}
        if shifted:                                     # pass 1: max / min / argmax / shifts
            for r in shifted:
                peak[r] = acc[r] if isinstance(r, (Max, Min)) else \
                    self.exp_store.get(r, (None,) * 4)[3] or self.fresh("m")
                init = "math.inf" if isinstance(r, Min) else "-math.inf"
                self.line(f"{peak[r]} = F({init})")
                if isinstance(r, (Max, Min, LogSumExp)):
                    self.argvar[r] = self.fresh("arg")
                    self.line(f"{self.argvar[r]} = -1")
            self.peak_pass(kvar, size, shifted, bodies, conds, bound | {k}, peak)
            self.after_pass("peak", shifted, peak)
        stored = [r for r in summed if r in self.exp_store] if self.store_softmax else []
        if stored:                                      # e^(b - m) into the gradient buffer: a loop
            self.line("if want_grad:")                  # with no reduction, so LLVM vectorizes it
            self.depth += 1
            self.loop(kvar, size, stored, bodies, conds, bound | {k}, self.store_exp, peak)
            self.depth -= 1
        if summed:                                      # pass 2: sums (shifted by the peak)
            for r in summed:
                self.line(f"{acc[r]} = F(0.0)")
            fast = {r: getattr(type(bodies[r]), "fast", None) for r in summed if type(r) is Sum}
            fast = {r: f(*bodies[r].args) for r, f in fast.items() if f is not None}
            self.loop(kvar, size, summed, {**bodies, **fast}, conds, bound | {k}, self.accumulate, (acc, peak))
            self.after_pass("sum", summed, acc)
            for r in fast:                              # a term off the fast path made the sum NaN:
                self.line(f"if {acc[r]} != {acc[r]}:")  # the sum again, of the function itself
                self.depth += 1
                self.line(f"{acc[r]} = F(0.0)")
                self.loop(kvar, size, [r], bodies, conds, bound | {k}, self.accumulate, (acc, peak))
                self.after_pass("sum", [r], acc)
                self.depth -= 1
        for r in group:
            self.finish(r, acc[r], peak.get(r))
            self.register(r, acc[r], peak.get(r))


    def _element(self, group, bodies, conds, bound):
        """Print the group's bodies and conditions at the current element (CSE'd together, names
        local to it); (reduction, body name, condition name) for each."""
        named = [(self.fresh("b"), bodies[r]) for r in group]
        conds_named = [(self.fresh("c"), conds[r]) for r in group]
        saved = dict(self.known), dict(self.reduction_symbol)
        self.scope(named + conds_named, bound)
        self.known, self.reduction_symbol = saved
        return [(r, b, c) for r, (b, _), (c, _) in zip(group, named, conds_named)]

    def lane_loops(self, size, group, bound):
        """Logsumexps in three vectorized passes: each of LANES interleaved lanes' max by selects,
        merged; the argmax, the first index at the max (the first NaN), as an integer min; then
        the sum of e^(b - m), a reassociable sum (``add``) that LLVM splits into lanes itself
        (float64, ntxent's rows of 1024: 0.3 ms faster than 16 lanes of our own; llvm.maximum for
        the max was slower than the lanes). An argmax tracked with the max in the lanes, and
        e^(b - m) stored to a row then summed, made the pass 1.2x slower."""
        k = sp.Symbol(self.fresh("_k"), integer=True)
        kvar, kb, lane = self.fresh("k"), self.fresh("kb"), self.fresh("l")
        self.loop_vars[k] = kvar
        n = self.index_code(size)
        bodies = {r: substitute(r.body, {r.index: k}) for r in group}
        conds = {r: substitute(r.cond, {r.index: k}) for r in group}
        peak = {r: self.fresh("m") for r in group}
        acc = {r: self.fresh("r") for r in group}
        mx = {r: self.fresh("mx") for r in group}
        for r in group:
            self.line(f"{mx[r]} = np.full({LANES}, -np.inf, F)")

        def lanes(step):
            self.line(f"for {kb} in range(0, {n}, {LANES}):")
            self.line(f"    for {lane} in range(min({LANES}, {n} - {kb})):")
            self.line(f"        {kvar} = {kb} + {lane}")
            self.depth += 2
            for r, b, c in self._element(group, bodies, conds, bound | {k}):
                step(r, b, c)
            self.depth -= 2

        def track(r, b, c):
            self.line(f"{mx[r]}[{lane}] = {b} if {c} and ({b} > {mx[r]}[{lane}] or {b} != {b}) else {mx[r]}[{lane}]")
        lanes(track)
        for r in group:
            m, top = peak[r], f"{mx[r]}[{lane}]"
            self.argvar[r] = self.fresh("arg")
            self.line(f"{m} = F(-math.inf)")
            self.line(f"for {lane} in range({LANES}):")
            self.line(f"    {m} = {top} if {top} > {m} or {top} != {top} else {m}")
            self.line(f"{self.argvar[r]} = {n}")
        self.line(f"for {kvar} in range({n}):")
        self.depth += 1
        for r, b, c in self._element(group, bodies, conds, bound | {k}):
            arg = self.argvar[r]
            self.line(f"{arg} = min({arg}, {kvar} if {c} and ({b} == {peak[r]} or {b} != {b}) else {n})")
        self.depth -= 1
        for r in group:
            arg = self.argvar[r]
            self.line(f"if {arg} == {n}:")      # nothing counted (an empty row, all masked)
            self.line(f"    {arg} = -1")
            self.line(f"{acc[r]} = F(0.0)")
        self.line(f"for {kvar} in range({n}):")
        self.depth += 1
        for r, b, c in self._element(group, bodies, conds, bound | {k}):
            # Σ_{k != argmax} e^(b - m), as accumulate()
            e = f"_exp({b} - {peak[r]}) if {c} and {kvar} != {self.argvar[r]} else F(0.0)"
            self.line(self.add.format(acc=acc[r], x=f"({e})"))
        self.depth -= 1
        for r in group:
            self.finish(r, acc[r], peak[r])
            self.register(r, acc[r], peak[r])

    def register(self, r, acc, peak):
        """Reduction r is computed: its value in acc (a logsumexp's log1p part; its max in peak)."""
        self.parts[r] = (acc, peak)
        sym = sp.Symbol("_" + acc, real=True)     # CSE must see a reduction as one atom
        self.names[sym] = acc
        self.known[r] = acc
        self.reduction_symbol[r] = sym
        if isinstance(r, LogSumExp):
            # m + l, printed so that l is added last: logsumexp(z) - z_y is (m - z_y) + l, which
            # keeps l = 1e-17 where m + l would round it away
            top = sp.Symbol("_" + peak, real=True)
            self.names[top] = peak
            self.peaks[top] = {a.func for a in r.body.atoms(sp.core.function.AppliedUndef)}
            self.last_terms.add(sym)
            self.known[r] = f"({peak} + {acc})"
            self.reduction_symbol[r] = top + sym
            self.argvar[top + sym] = self.argvar[r]
        if r in self.argvar:
            self.argvar[sym] = self.argvar[r]

    def row_index(self, r):
        """The one index a reduction depends on (its row), or None."""
        free = [s for s in r.free_symbols if s not in self.names]
        return free[0] if len(free) == 1 else None

    def load_shared(self, r):
        """Read a row reduction stored by an earlier pass (store_row) instead of computing it."""
        row = self.row_index(r) if self.stored_rows else None
        arrays = row is not None and self.stored_rows.get(row_key(r, row))
        if not arrays:
            return False
        at = self.index_code(row)
        acc = self.fresh("r")
        self.line(f"{acc} = {arrays[0]}[{at}]")
        peak = None
        if arrays[1]:
            peak = self.fresh("m")
            self.line(f"{peak} = {arrays[1]}[{at}]")
        if arrays[2]:
            self.argvar[r] = self.fresh("arg")
            self.line(f"{self.argvar[r]} = {arrays[2]}[{at}]")
        self.register(r, acc, peak)
        return True

    def store_row(self, r, row, size):
        """A parallel pass computing r for every value of its row index into arrays, which later
        reads of r (with the row index renamed) load instead of computing r again."""
        n = self.index_code(size)
        value, peak, arg = self.fresh("R"), None, None
        self.line(f"{value} = np.empty({n}, F)")
        if isinstance(r, LogSumExp):
            peak = self.fresh("RM")
            self.line(f"{peak} = np.empty({n}, F)")
        if isinstance(r, (Max, Min, LogSumExp)):
            arg = self.fresh("RA")
            self.line(f"{arg} = np.empty({n}, np.int64)")
        jvar = self.fresh("j")
        self.loop_vars[row] = jvar
        self.line(f"for {jvar} in numba.prange({n}):")
        self.depth += 1
        saved = dict(self.known), dict(self.reduction_symbol)
        self.lanes = True
        self.reductions([r], {row})
        self.lanes = False
        acc, top = self.parts[r]
        self.line(f"{value}[{jvar}] = {acc}")
        if peak:
            self.line(f"{peak}[{jvar}] = {top}")
        if arg:
            self.line(f"{arg}[{jvar}] = {self.argvar[r]}")
        self.known, self.reduction_symbol = saved
        self.depth -= 1
        self.stored_rows[row_key(r, row)] = (value, peak, arg)

    def loop_range(self, size):
        """The iteration space of a reduction pass over ``size`` elements."""
        return f"range({self.index_code(size)})"

    def after_pass(self, kind, group, state):
        """After the loop of a 'peak' pass (state: the peak variables of the group) or a 'sum' pass
        (state: the accumulators). The store pass between them has nothing to combine."""

    def loop(self, kvar, size, group, bodies, conds, bound, step, state):
        self.line(f"for {kvar} in {self.loop_range(size)}:")
        self.depth += 1
        self.open_loops += 1
        named = [(self.fresh("b"), bodies[r]) for r in group]
        conds_named = [(self.fresh("c"), conds[r]) for r in group if conds[r] is not sp.true]
        # reductions computed inside the loop depend on its index: forget them after it
        saved = dict(self.known), dict(self.reduction_symbol)
        self.scope(named + conds_named, bound)
        self.known, self.reduction_symbol = saved
        cvar = dict(zip([r for r in group if conds[r] is not sp.true], [n for n, _ in conds_named]))
        for r, (bvar, _) in zip(group, named):
            self.step_where(cvar.get(r), self.step_of(r, step), r, bvar, kvar, state)
        self.depth -= 1
        self.open_loops -= 1

    def step_of(self, r, step):
        """The step element ``r`` of a pass takes: the pass's own, unless a back end gives ``r`` one."""
        return step

    def step_where(self, cond, step, r, b, kvar, state):
        """``step`` for element ``b`` where ``cond`` (a variable; None: everywhere) holds."""
        if cond is None:
            return step(r, b, kvar, state)
        if step == self.accumulate and isinstance(r, Sum):
            # a masked sum adds 0 off the mask: a select; an if around the add kept LLVM from
            # vectorizing the loop (kl_div's second pass: 2.3x slower)
            return step(r, f"({b} if {cond} else F(0.0))", kvar, state)
        self.line(f"if {cond}:")
        self.depth += 1
        step(r, b, kvar, state)
        self.depth -= 1

    def peak_pass(self, kvar, size, group, bodies, conds, bound, peak):
        """The loop tracking each peak (and argmax) of ``group``; a back end may split it."""
        self.loop(kvar, size, group, bodies, conds, bound, self.track_peak, peak)

    def track_peak(self, r, b, kvar, peak):
        m = peak[r]
        if isinstance(r, (Max, Min, LogSumExp)):
            better = f"{b} < {m}" if isinstance(r, Min) else f"{b} > {m}"
            # NaN propagates; the first index wins a tie (so its gradient goes there).
            self.line(f"if {better} or {b} != {b} or {self.argvar[r]} < 0:")
            self.line(f"    {m} = {b}")
            self.line(f"    {self.argvar[r]} = {kvar}")
        elif isinstance(r, Norm):
            self.line(f"{m} = max({m}, abs({b})) if {b} == {b} else {b}")
        else:
            self.line(f"{m} = max({m}, {b}) if {b} == {b} else {b}")

    def accumulate(self, r, b, kvar, state):
        acc, peak = state
        if isinstance(r, Sum):
            self.line(self.add.format(acc=acc[r], x=b))
        elif isinstance(r, LogSumExp):
            # Σ_{k != argmax} e^(b - m): the argmax's own 1 is added back exactly in finish(), so
            # log1p keeps the small terms. A -inf peak makes the terms NaN; finish() ignores them.
            e = f"_exp({b} - {peak[r]})"
            if r in self.exp_store:      # the softmax numerators, as the gradient reads them
                e = f"({self.element_code(self.exp_store[r][0], kvar)} if want_grad else {e})" \
                    if self.store_softmax else f"_expdiff({b}, {peak[r]})"
            self.line(self.add.format(acc=acc[r], x=f"({e} if {kvar} != {self.argvar[r]} else F(0.0))"))
        else:                            # Norm: Σ (b/m)²
            self.line(f"if {peak[r]} > 0 and {peak[r]} < math.inf:")
            self.line("    " + self.add.format(acc=acc[r], x=f"({b}/{peak[r]})*({b}/{peak[r]})"))

    def store_exp(self, r, b, kvar, peak):
        # the softmax numerators of the gradient: e^(b - m) with the rounding error of b - m put back
        self.line(f"{self.element_code(self.exp_store[r][0], kvar)} = _expdiff({b}, {peak[r]})")

    def finish(self, r, acc, peak):
        if isinstance(r, ScaledSum):
            # Σ_k b(k)/K stands for a mean: over nothing it is 0/0
            self.line(f"if {self.index_code(r.size)} == 0:")
            self.line(f"    {acc} = F(math.nan)")
        if isinstance(r, LogSumExp):
            if r in self.exp_store:
                self.line(f"{self.exp_store[r][1]} = F(1.0) + {acc}")
                self.line(f"{self.exp_store[r][2]} = {acc}")
            # logsumexp = m + log1p(Σ_{k != argmax} e^(b - m)), kept as the two parts (see
            # lse_parts); an all -inf row is -inf (not NaN), a +inf peak is +inf
            self.line(f"{acc} = _log1p({acc}) if {peak} > -math.inf and {peak} < math.inf else F(0.0)")
        elif isinstance(r, Norm):
            self.line(f"{acc} = {peak} * math.sqrt({acc}) if {peak} > 0 and {peak} < math.inf else {peak}")

    def pair_peaks(self, e):
        """±(b - m) in a sum, m the max shift of a logsumexp over the b: subpeak(b, m), which is 0 at
        the max itself, even an infinite one (inf - inf is NaN); and such a sum weighted, or added to
        a term, as one wshift / addshift. Before CSE, which would split them."""
        def pair(add):
            for sign in (1, -1):
                for a in add.args:
                    arrays = self.peaks.get(-sign * a)
                    if arrays is None:
                        continue
                    for b in add.args:
                        if isinstance(sign * b, sp.core.function.AppliedUndef) and (sign * b).func in arrays:
                            rest = [t for t in add.args if t is not a and t is not b]
                            return sp.Add(sign * subpeak(sign * b, -sign * a), *rest)
            return add

        def shifted(add):
            """(sign, b, m, rest) for ±subpeak(b, m) + rest, else None."""
            for t in add.args if add.is_Add else ():
                sign, core = (1, t) if isinstance(t, subpeak) else (-1, -t)
                if isinstance(core, subpeak):
                    return (sign, *core.args, sign * sp.Add(*[a for a in add.args if a is not t]))
            return None

        def weighted(e):
            # the weight c of c·(±subpeak(b, m) + rest), or the term a of addexp(a, ±subpeak(b, m) + rest),
            # meets the shift before b - m can overflow where the result does not (p_k·(z_k - lse) of
            # kl_div, ε·(z_y - mean z) + (lse - z_y) of label smoothing, at logits ±3e38)
            if isinstance(e, addexp):
                s = shifted(e.args[1])
                return e if s is None else addshift(e.args[0], s[0], *s[1:])
            for f in e.args:
                s = shifted(f)
                if s is not None:
                    return s[0] * wshift(e / f, *s[1:])
            return e
        if not self.peaks:
            return e
        e = e.replace(lambda x: x.is_Add, pair)
        return e.replace(lambda x: (x.is_Mul or isinstance(x, addexp)) and x.has(subpeak), weighted)

    def assign(self, named):
        """Piecewise blocks first (each branch its own scope), then CSE of the rest."""
        blocks, plain = {}, []
        named = [(var, self.pair_peaks(expand(_replace_known(e, self.reduction_symbol)))) for var, e in named]
        for var, e in named:
            plain.append((var, _lift_piecewise(e, blocks, self)))
        for conds, members in blocks.items():
            for i, cond in enumerate(conds):
                head = "if" if i == 0 else "elif"
                if cond is sp.true:
                    self.line("else:")
                else:
                    self.line(f"{head} {self.code(cond)}:")
                self.depth += 1
                self.assign([(var, pw.args[i].expr) for var, pw in members])
                self.depth -= 1
        if not plain:
            return
        temps, reduced = sp.cse([e for _, e in plain], symbols=_Temps(self), ignore=tuple(self.last_terms))
        for sym, e in temps:
            self.line(f"{self.names[sym]} = {self.code(e)}")
        for (var, _), e in zip(plain, reduced):
            self.line(f"{var} = {self.code(e)}")


# --- the gradient plan ------------------------------------------------------------------------
def gradient_plan(em, compiled, sig, fn_array):
    """Scalar inputs' gradients as named expressions of the sample scope; vector inputs' as
    (decl, expression, indices) for their loops, with the loop-invariant parts moved out of the
    loops into the sample scope, and a softmax over a logsumexp's axis in its stable form
    (``_reuse_softmax``; ``fn_array`` learns the gradient buffer's array). ``sig``: render_cpu's
    Signature."""
    hoisted, maps = [], []
    for d in sig.inputs:
        g, idx = compiled.grads[d.name]
        if len(d.axes) == 1:
            g = _reuse_softmax(g, idx[0], compiled.lowered.sizes[d.axes[0]], sig.grad_of[d.name], em, fn_array)
        if d.axes:
            maps.append((d, _hoist(g, set(idx), hoisted, em), idx))
        else:
            hoisted.append((f"d_{sig.grad_of[d.name]}", g))
    return hoisted, maps


def _reuse_softmax(g, j, size, grad, em, fn_array):
    """e^(b(j) - R) for a logsumexp R over j's axis: e^(b(j) - m) / Σ, the numerator read from the
    gradient buffer where R's own pass stored it (saves one exp per element: DESIGN_NOTES, CPU
    anchors), or recomputed (``Emitter.store_softmax``); either way the _expdiff that R's sum adds.

    At the argmax the softmax is written [j = arg] + (-Σ_rest/Σ), the small part added last, so
    that softmax_y - 1 of a confident row is -Σ_rest/Σ (1e-18), not 1/Σ - 1 (0)."""
    for r in g.atoms(LogSumExp):
        pattern = sp.exp(substitute(r.body, {r.index: j}) - r)
        if r.cond is sp.true and r.size == size and g.has(pattern):
            total, rest = em.fresh("s"), em.fresh("sr")
            peak = None if em.store_softmax else em.fresh("m")
            s_sym = sp.Symbol("_" + total, positive=True)
            rest_sym = sp.Symbol("_" + rest, nonnegative=True)
            em.names[s_sym], em.names[rest_sym] = total, rest
            em.last_terms.add(rest_sym)
            em.exp_store[r] = (grad, total, rest, peak)
            if em.store_softmax:
                buf = sp.Function("_buf_" + grad, real=True)
                fn_array[buf] = grad
                numerator = buf(j)
            else:      # the symbol reduction_loops gives the max shift (same name and assumptions)
                numerator = ExpDiff(substitute(r.body, {r.index: j}), sp.Symbol("_" + peak, real=True))
            at_arg = IsArg(r, j)
            small = Select(-rest_sym / s_sym, numerator / s_sym, sp.Eq(at_arg, 1))
            # a product A·softmax is A·[j = arg] + A·small, the small part added last (KL's
            # Σp·softmax_j - p_j at the argmax of a one-hot p: A·(1 - 1e-9) rounds to A in float32)
            g = g.replace(lambda e: isinstance(e, mul0) and e.args[0] == pattern,
                          lambda e: mul0(at_arg, e.args[1]) + mul0(small, e.args[1]))
            return _sum_but_own(g.xreplace({pattern: at_arg + small}), r, j)
    return g


def _sum_but_own(g, r, j):
    """c·Σ_k b(k)·[j = arg] - c·b(j) is c·Σ_{k != arg} b(k) at the argmax: Σ_k p_k - p_arg of KL's
    gradient is 0 where Σ p rounds to p_arg = 1, not the 1e-40 of the other p."""
    if not g.is_Add:
        return g
    at_arg = IsArg(r, j)
    for t1 in g.args:
        if not (isinstance(t1, mul0) and t1.args[0] == at_arg):
            continue
        c, total = t1.args[1].as_coeff_Mul()
        if type(total) is not Sum or total.cond is not sp.true:
            continue
        own = -c * substitute(total.body, {total.index: j})
        for t2 in g.args:
            if t2 is not t1 and t2 in (own, sp.piecewise_fold(own)):
                k = total.index
                others = Sum(k, total.size, total.body, sp.Eq(IsArg(r, k), 0))
                rest = [a for a in g.args if a is not t1 and a is not t2]
                return sp.Add(Select(c * others, t2, sp.Eq(at_arg, 1)), *rest)
    return g


def _hoist(g, idx, hoisted, em):
    """Replace maximal subexpressions free of the map indices with precomputed variables."""
    if isinstance(g, ExprCondPair):
        return ExprCondPair(_hoist(g.expr, idx, hoisted, em), _hoist_cond(g.cond, idx, hoisted, em))
    if not isinstance(g, sp.Expr) or g.is_Atom:
        return g
    if not (g.free_symbols & idx):
        var = em.fresh("h")
        sym = sp.Symbol("_" + var, real=True)
        em.names[sym] = var
        if g.free_symbols & em.last_terms:      # it stays a small part, added last
            em.last_terms.add(sym)
        hoisted.append((var, g))
        return sym
    if isinstance(g, (AppliedUndef, Reduce, sp.KroneckerDelta, IsArg)):
        return g
    args = [_hoist(a, idx, hoisted, em) for a in g.args]
    return g.func(*args) if any(a is not b for a, b in zip(args, g.args)) else g


def _hoist_cond(c, idx, hoisted, em):
    """A branch's condition with the sides of its comparisons hoisted: multiclass_hinge's
    margin - z_y + max > 0 is computed once per row, not once per logit (LLVM could not move it:
    its read of z may alias the gradient the loop writes)."""
    if isinstance(c, sp.core.relational.Relational):
        return c.func(_hoist(c.lhs, idx, hoisted, em), _hoist(c.rhs, idx, hoisted, em), evaluate=False)
    if isinstance(c, (sp.And, sp.Or, sp.Not)):
        return c.func(*[_hoist_cond(a, idx, hoisted, em) for a in c.args], evaluate=False)
    return c


def _nan_guard(e):
    """A zero weight's branch: nanflags of the inputs (0, or NaN for a NaN input), maybe summed."""
    return e.has(nanflag) and all(isinstance(f, (nanflag, Sum, sp.core.function.AppliedUndef))
                                  for f in e.atoms(sp.Function))


def _float_inequality(c):
    return isinstance(c, (sp.Lt, sp.Le, sp.Gt, sp.Ge)) and not (c.lhs.is_integer and c.rhs.is_integer)


class _Temps:
    """An endless supply of CSE temporaries, registered in the emitter's names."""

    def __init__(self, em):
        self.em = em

    def __iter__(self):
        return self

    def __next__(self):
        s = sp.Symbol(self.em.fresh("_t"), real=True)
        self.em.names[s] = s.name[1:]
        return s


def _lift_piecewise(e, blocks, em):
    """Replace each outermost Piecewise with a variable assigned in an if/else block.

    Indicators and zero guards (a branch that is a number 0) stay inline selects: both sides
    are cheap to compute and CSE may share work with the rest.
    """
    if isinstance(e, sp.Piecewise) and not any((ex.is_number and ex.is_zero) or _nan_guard(ex) for ex, _ in e.args) \
            and not all(ex.is_number for ex, _ in e.args):
        conds = tuple(c for _, c in e.args)
        var = em.fresh("pw")
        sym = sp.Symbol("_" + var, real=True)
        em.names[sym] = var
        blocks.setdefault(conds, []).append((var, e))
        return sym
    if e.is_Atom or isinstance(e, (Reduce, sp.core.function.AppliedUndef)):
        return e
    args = [_lift_piecewise(a, blocks, em) for a in e.args]
    return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e


def _replace_known(e, known):
    """Computed reductions become their symbols (outermost first, so nested ones go with them)."""
    if e in known:
        return known[e]
    if e.is_Atom or isinstance(e, Reduce):
        return e
    args = [_replace_known(a, known) for a in e.args]
    return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e


def computable(exprs, bound, em):
    """Reductions in exprs (at any depth) whose free symbols are all known here: no unbound index."""
    found = []
    for e in exprs:
        for r in _all_reductions(e):
            if r in em.known or r in found:
                continue
            if all(s in em.names or s in bound for s in r.free_symbols):
                found.append(r)
    return found


def row_key(r, row):
    """Row reduction r as the key of its stored row: its row index as ROW, each reduction's own
    index named by its depth, so that it is found however it is written (the chain rule names
    ntxent's max[e] |z(i, e)| max[d] |z(m, d)| in the gradient of z)."""
    def canon(e, depth):
        if e.is_Atom:
            return e
        if isinstance(e, Reduce):
            k = sp.Symbol(f"_k{depth}", integer=True)
            index, size, body, cond = e.args
            return e.func(k, size, canon(substitute(body, {index: k}), depth + 1),
                          canon(substitute(cond, {index: k}), depth + 1))
        args = [canon(a, depth) for a in e.args]
        return e.func(*args) if any(a is not b for a, b in zip(args, e.args)) else e
    return canon(substitute(r, {row: ROW}), 0)


def _rescues(exprs, todo):
    """{b: a} for the reductions b of ``todo`` read only as overflow_or(a, b), a another of them."""
    pairs = {}
    for e in exprs:
        for node in sp.preorder_traversal(e):
            if isinstance(node, overflow_or) and node.args[1] in todo and node.args[0] in todo:
                pairs.setdefault(node.args[1], set()).add(node.args)
    out = {}
    for b, uses in pairs.items():
        if len(uses) != 1:
            continue
        (a, _), = uses
        rest = [e.xreplace({overflow_or(a, b): a}) for e in exprs] + [r for r in todo if r is not b]
        if not any(e.has(b) for e in rest):
            out[b] = a
    return out


def _all_reductions(e):
    for node in sp.preorder_traversal(e):
        if isinstance(node, Reduce):
            yield node


def _level(r, todo, levels):
    deps = [s for s in todo if s is not r and any(node == s for node in _all_reductions(r.body))]
    deps += [s for s in todo if s is not r and any(node == s for node in _all_reductions(r.cond))]
    return 1 + max((levels.get(s) or _level(s, todo, levels) for s in deps), default=0)
