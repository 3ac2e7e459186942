"""Readable text and LaTeX for losses and gradients: z[k] for elements, [j = y] for indicators."""
import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter


class TextPrinter(StrPrinter):
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
