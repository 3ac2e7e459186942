"""Readable text and LaTeX for losses and gradients.

``to_text``/``to_latex`` print an expression exactly as the kernel computes it (``--exact``):
z[k] for elements, [j == y] for indicators, ``a if cond else b`` for branches.
``paper_lines`` prints it as on paper (LANGUAGE.md section 7, see ``paper.py``): Unicode by
default (σ, Σ, ·, ²), ``style="ascii"`` or ``style="latex"``, cases, then edge cases.
"""
import re

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from . import paper as P
from .primitives import IsArg, Reduce

GREEK = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "eta": "η",
         "lambda": "λ", "mu": "μ", "sigma": "σ", "tau": "τ", "theta": "θ", "rho": "ρ", "nu": "ν"}


class TextPrinter(StrPrinter):
    """The kernel's form, in the language's own notation."""

    def _print_Function(self, e):
        if isinstance(e, AppliedUndef):
            return f"{e.func.__name__}[{', '.join(self._print(a) for a in e.args)}]"
        return super()._print_Function(e)

    def _print_KroneckerDelta(self, e):
        return f"[{self._print(e.args[0])} == {self._print(e.args[1])}]"

    def _print_Piecewise(self, e):
        if len(e.args) == 2 and e.args[0].expr == 1 and e.args[1].expr == 0:
            return f"[{self._print(e.args[0].cond)}]"
        text = self._print(e.args[-1].expr)
        for ex, c in reversed(e.args[:-1]):
            text = f"({self._print(ex)} if {self._print(c)} else {text})"
        return text

    def _print_Relational(self, e):
        return f"{self._print(e.lhs)} {e.rel_op} {self._print(e.rhs)}"

    def _print_Abs(self, e):
        return f"|{self._print(e.args[0])}|"

    def _print_Max2(self, e):
        return f"max({self._print(e.args[0])}, {self._print(e.args[1])})"

    def _print_Min2(self, e):
        return f"min({self._print(e.args[0])}, {self._print(e.args[1])})"


class TexPrinter(LatexPrinter):
    def _print_Symbol(self, e, style="plain"):
        # label_smoothing is one name, not label with subscript smoothing
        if "_" in e.name and len(e.name) > 2:
            return r"\mathrm{%s}" % e.name.replace("_", r"\_")
        return super()._print_Symbol(e, style)

    def _print_Function(self, e, exp=None):
        if isinstance(e, AppliedUndef):
            text = f"{self._print(sp.Symbol(e.func.__name__))}_{{{', '.join(self._print(a) for a in e.args)}}}"
            return f"{text}^{{{exp}}}" if exp else text
        return super()._print_Function(e, exp)

    def _print_KroneckerDelta(self, e, exp=None):
        text = rf"[{self._print(e.args[0])} = {self._print(e.args[1])}]"
        return f"{text}^{{{exp}}}" if exp else text


def to_text(expr):
    return TextPrinter().doprint(expr).replace("**", "^")


def to_latex(expr):
    return TexPrinter().doprint(expr)


# --------------------------------------------------------------------------- paper form

class _Order:
    """Shared by the paper printers: terms with inputs first, then targets, positive first,
    short first; ``(label_smoothing - 1)·x`` written ``-(1 - label_smoothing)·x``."""

    def _as_ordered_terms(self, expr, order=None):
        terms = super()._as_ordered_terms(expr, order=order)
        rank = self._settings.get("rank") or (lambda t: 0)
        return sorted(terms, key=lambda t: (t.could_extract_minus_sign(), rank(t), sp.count_ops(t)))

    def _print_Mul(self, expr, *args):
        c, factors = expr.as_coeff_mul()
        factors = list(factors)
        rank = self._settings.get("rank") or (lambda t: 0)
        for i, f in enumerate(factors):
            if f.is_Add and rank(f) > 0 and _flippable(f):
                c, factors[i] = -c, sp.UnevaluatedExpr(sp.Add(*[-t for t in f.args], evaluate=False))
                break
        factors.sort(key=lambda f: _factor_rank(f, rank))
        new = sp.Mul(*([c] if c != 1 else []), *factors, evaluate=False) if len(factors) + (c != 1) > 1 \
            else expr
        return super()._print_Mul(new, *args)

    def _oriented(self, e):
        """``δ ≥ |r|`` read as ``|r| ≤ δ``: the side with inputs on the left."""
        rank = self._settings.get("rank") or (lambda t: 0)
        return e.reversed if e.rel_op in ("<", "<=", ">", ">=") and rank(e.lhs) > rank(e.rhs) else e

    def _print_Relational(self, e):
        return super()._print_Relational(self._oriented(e))


def _factor_rank(f, rank):
    """Numbers, then coefficients (params, targets), then the rest, sums of inputs, indicators."""
    if f.is_number:
        return 0
    if isinstance(f, (P.Ind, sp.KroneckerDelta, IsArg)):
        return 5
    if isinstance(f, sp.Pow) and f.exp.is_number and f.exp < 0:
        return 6
    if rank(f) > 0:
        return 1
    return 3 if f.is_Add or isinstance(f, sp.UnevaluatedExpr) else 2


def _flippable(f):
    """x - 1 (a negative number and positive terms) reads better as -(1 - x)."""
    nums = [t for t in f.args if t.is_number]
    rest = [t for t in f.args if not t.is_number]
    return len(nums) == 1 and nums[0] < 0 and rest and not any(t.could_extract_minus_sign() for t in rest)


class PaperText(_Order, TextPrinter):
    _default_settings = dict(TextPrinter._default_settings, unicode=True, rank=None, greek=(), order="none")
    printmethod = "_paperstr"

    @property
    def uni(self):
        return self._settings["unicode"]

    def parenthesize(self, item, level, strict=False):
        if isinstance(item, Reduce) and level > PRECEDENCE["Add"]:
            return f"({self._print(item)})"
        return super().parenthesize(item, level, strict)

    def _print_Symbol(self, e):
        return GREEK.get(e.name, e.name) if self.uni and e.name in self._settings["greek"] else e.name

    def _print_Pow(self, e, rational=False):
        if self.uni and e.exp in (2, 3):
            return self.parenthesize(e.base, PRECEDENCE["Pow"], strict=True) + "²³"[int(e.exp) - 2]
        if e.exp == sp.S.Half:
            return f"sqrt({self._print(e.base)})"
        if e.exp.is_number and e.exp < 0:
            return super()._print_Pow(e, rational)
        base = self.parenthesize(e.base, PRECEDENCE["Pow"], strict=True)
        exp = self._print(e.exp)
        if not (e.exp.is_Atom or isinstance(e.exp, sp.Function)):
            exp = f"({exp})"
        return f"{base}^{exp}"

    def _print_Relational(self, e):
        e = self._oriented(e)
        ops = {"==": "=", "!=": "≠" if self.uni else "!=", "<=": "≤" if self.uni else "<=",
               ">=": "≥" if self.uni else ">="}
        return f"{self._print(e.lhs)} {ops.get(e.rel_op, e.rel_op)} {self._print(e.rhs)}"

    def _print_And(self, e):
        return ", ".join(self._print(a) for a in e.args)

    def _print_sigmoid(self, e):
        return f"{'σ' if self.uni else 'sigmoid'}({self._print(e.args[0])})"

    def _print_logcosh(self, e):
        return f"log(cosh({self._print(e.args[0])}))"

    def _print_softmax(self, e):
        sub = ""
        if len(e.args) == 3:                       # softmax over the k with k ≠ i
            sub = self._print(e.args[2])
            sub = f"_{{{sub}}}" if self.uni else f"[{sub}]"
        return f"{type(e).__name__}{sub}({self._print(e.args[0])})[{self._print(e.args[1])}]"

    _print_log_softmax = _print_softmax

    def _print_Ind(self, e):
        return f"[{self._print(e.args[0])}]"

    def _print_KroneckerDelta(self, e):
        return f"[{self._print(e.args[0])} = {self._print(e.args[1])}]"

    def _print_NormOf(self, e):
        return f"‖{self._print(e.args[0])}‖" if self.uni else f"norm({self._print(e.args[0])})"

    def _print_IsArg(self, e):
        return f"[{self._print(e.args[1])} = arg{self._print(e.args[0])}]"

    def _print_Reduce(self, e):
        k, size, body, cond = e.args
        sub = self._print(k) if cond is sp.true else self._print(cond)
        name = {"Sum": "Σ" if self.uni else "sum", "LogSumExp": "logsumexp", "Max": "max", "Min": "min",
                "Norm": "norm"}[type(e).__name__]
        body_text = self.parenthesize(body, PRECEDENCE["Mul"], strict=False)
        if self.uni:
            sub = sub if len(sub) == 1 else "{%s}" % sub
            return f"{name}_{sub} {body_text}"
        return f"{name}[{sub}] {body_text}"

    _print_Sum = _print_LogSumExp = _print_Max = _print_Min = _print_Norm = _print_Reduce

    def _print_Piecewise(self, e):
        text = self._print(e.args[-1].expr)
        for ex, c in reversed(e.args[:-1]):
            text = f"({self._print(ex)} if {self._print(c)} else {text})"
        return text

    def doprint(self, expr):
        text = super().doprint(expr)
        return text.replace("*", "·") if self.uni else text


class PaperTex(_Order, TexPrinter):
    _default_settings = dict(TexPrinter._default_settings, rank=None, order="none", greek=())

    def _print_Symbol(self, e, style="plain"):
        if e.name in self._settings["greek"] and e.name in GREEK or len(e.name) == 1:
            return super()._print_Symbol(e, style)
        if re.fullmatch(r"[A-Za-z]_[A-Za-z0-9]{1,2}", e.name):      # p_t, a_t
            return "%s_{%s}" % tuple(e.name.split("_"))
        return r"\mathrm{%s}" % e.name.replace("_", r"\_")

    def _print_Function(self, e, exp=None):
        if isinstance(e, AppliedUndef):
            name = self._print_Symbol(sp.Symbol(e.func.__name__))
            name = "{%s}" % name if "_" in name else name                # d_u[m, l]: {d_{u}}_{m, l}
            return _pow_tex(f"{name}_{{{', '.join(self._print(a) for a in e.args)}}}", exp)
        return super()._print_Function(e, exp)

    def _needs_mul_brackets(self, expr, first=False, last=False):
        return isinstance(expr, Reduce) or super()._needs_mul_brackets(expr, first, last)

    def _print_Add(self, expr, order=None):
        tex = ""
        for i, term in enumerate(self._as_ordered_terms(expr)):
            t = self._print(term)
            if self._needs_add_brackets(term):
                t = r"\left(%s\right)" % t
            sign = "-" if t.startswith("-") else "+"
            t = t[1:].lstrip() if sign == "-" else t
            tex += (("- " if sign == "-" else "") + t) if i == 0 else f" {sign} {t}"
        return tex

    def _print_sigmoid(self, e, exp=None):
        return _pow_tex(r"\sigma\left(%s\right)" % self._print(e.args[0]), exp)

    def _print_softmax(self, e, exp=None):
        name = r"\operatorname{softmax}" if isinstance(e, P.softmax) else r"\log\operatorname{softmax}"
        sub = "_{%s}" % self._print(e.args[2]) if len(e.args) == 3 else ""
        return _pow_tex(r"%s%s(%s)_{%s}" % (name, sub, self._print(e.args[0]), self._print(e.args[1])), exp)

    _print_log_softmax = _print_softmax

    def _print_Ind(self, e, exp=None):
        return _pow_tex(r"[%s]" % self._print(e.args[0]), exp)

    def _print_NormOf(self, e, exp=None):
        return _pow_tex(r"\left\|%s\right\|" % self._print(e.args[0]), exp)

    def _print_Max2(self, e, exp=None):
        return _pow_tex(r"\max\left(%s, %s\right)" % tuple(self._print(a) for a in e.args), exp)

    def _print_Min2(self, e, exp=None):
        return _pow_tex(r"\min\left(%s, %s\right)" % tuple(self._print(a) for a in e.args), exp)

    def _print_sign(self, e, exp=None):
        return _pow_tex(r"\operatorname{sign}\left(%s\right)" % self._print(e.args[0]), exp)

    def _print_And(self, e):
        return r",\ ".join(self._print(a) for a in e.args)

    def _print_Piecewise(self, e):
        text = self._print(e.args[-1].expr)
        for ex, c in reversed(e.args[:-1]):
            text = r"\left(%s\ \mathrm{if}\ %s\ \mathrm{else}\ %s\right)" % (self._print(ex), self._print(c), text)
        return text


def _pow_tex(text, exp):
    return f"{text}^{{{exp}}}" if exp else text


def _words(text, style):
    return r"\mathrm{%s}" % text.replace(" ", r"\ ") if style == "latex" else text


def paper_lines(label, expr, loss=None, style="unicode", noun="the gradient"):
    """``label = expr`` as on paper: one line per case, then the edge cases, one line each."""
    ctx = P.Context(loss)
    form = P.paper(expr, loss, ctx)
    rank = ctx.rank
    if style == "latex":
        show = PaperTex(dict(rank=rank, greek=tuple(loss.params) if loss else ())).doprint
    else:
        show = PaperText(dict(unicode=style != "ascii", rank=rank, greek=tuple(loss.params) if loss else ())).doprint
    lines = []
    pad = " " * len(f"{label} = ") if style != "latex" else ""
    texts = [show(ex) for _, ex in form.cases]
    width = max(len(t) for t in texts)
    for i, ((cond, _), text) in enumerate(zip(form.cases, texts)):
        head = f"{label} = " if i == 0 or style == "latex" else pad
        if len(form.cases) == 1:
            lines.append(head + text)
        elif style == "latex":
            tail = _words("otherwise", style) if cond is None else _words("if", style) + r"\ " + show(cond)
            lines.append(rf"{head}{text} \qquad {tail}")
        else:
            tail = "otherwise" if cond is None else f"if {show(cond)}"
            lines.append(f"{head}{text.ljust(width) if width <= 60 else text}  {tail}")
    if form.where:                  # the definition's own names, for a long case
        eq = [f"{show(sym)} = {show(value)}" for sym, value in form.where]
        sep, comma = (r"\ ", r",\quad ") if style == "latex" else (" ", ", ")
        lines.append("  " + _words("where", style) + sep + comma.join(eq))
    sp_ = r"\ " if style == "latex" else ""
    for words, ex in form.notes:
        lines.append(f"  {_words(words, style)}{sp_} {show(ex)}")
    edges = _edge_lines(form.edges, show, style, noun)
    if edges:
        lines.append("  " + _words("edge cases:", style))
        lines.extend("    " + e for e in edges)
    return lines


def _edge_lines(edges, show, style, noun):
    """One line per edge case: ``label_smoothing = 0: the term label_smoothing/K is 0``."""
    latex = style == "latex"

    def say(*parts):             # words (str) and formulas (sympy), spaced for the style
        out = [_words(p, style) if isinstance(p, str) else p.text if isinstance(p, _Raw) else show(p) for p in parts]
        return (r"\ " if latex else " ").join(out)

    out = []
    for e in edges:
        cond = (r",\ " if latex else ", ").join(show(c) for c in e.conds)
        if e.kind == "zero":
            what = say(f"{noun} is 0") if e.term is None else say("the term", _Raw(_unsigned(show(e.term))), "is 0")
        elif e.kind == "value":
            what = say(e.value) if e.term is None else say(e.value, "instead of", e.term)
        else:
            what = say(e.term, "is 0, also where", e.other, "is infinite" if e.kind == "mul0" else "is 0")
        line = cond + (r":\quad " if latex else ": ") + what
        if line not in out:
            out.append(line)
    return out


class _Raw:
    def __init__(self, text):
        self.text = text


def _unsigned(text):
    """A term's magnitude, as printed: ``-(1 - a)·[j = y]`` -> ``(1 - a)·[j = y]``."""
    return text[1:].lstrip() if text.startswith("-") else text
