"""The typed IR: what a definition declares and computes, every node with its source span."""
from dataclasses import dataclass, field
from typing import Optional

from .errors import Span

DOMAINS = ("real", "binary", "sign", "unit", "positive", "nonnegative", "class", "simplex")


@dataclass
class Domain:
    name: str = "real"
    axis: Optional[str] = None          # class(AXIS)

    def __str__(self):
        return f"{self.name}({self.axis})" if self.axis else self.name


@dataclass
class Decl:
    kind: str                           # "input" | "target" | "param"
    name: str
    axes: tuple
    domain: Domain
    span: Span
    default: Optional[float] = None     # params only


# Expressions ---------------------------------------------------------------------------------
@dataclass
class Expr:
    span: Span = field(repr=False, compare=False)


@dataclass
class Num(Expr):
    value: str                          # the literal as written, kept exact


@dataclass
class Name(Expr):
    id: str


@dataclass
class Index(Expr):
    id: str
    args: list


@dataclass
class Call(Expr):
    fn: str
    args: list
    kwargs: dict                        # name -> (Expr, Span)


@dataclass
class Unary(Expr):
    op: str                             # "-"
    x: Expr


@dataclass
class Binary(Expr):
    op: str                             # + - * / ^ < <= > >= == != and or
    a: Expr
    b: Expr


@dataclass
class IfElse(Expr):
    then: Expr
    cond: Expr
    other: Expr


@dataclass
class Reduction(Expr):
    op: str                             # sum mean max min logsumexp norm
    index: str
    filter_op: Optional[str]            # e.g. "!=" in max[j != y]
    filter_rhs: Optional[Expr]
    body: Expr


@dataclass
class Stmt:
    name: str
    indices: tuple
    expr: Expr
    span: Span


@dataclass
class Definition:
    name: str
    doc: str
    decls: dict                         # name -> Decl, in declaration order
    batch: Optional[str]
    stmts: list                         # locals, in order
    loss: Optional[Stmt]
    span: Span
    text: str                           # the definition's source text

    def of_kind(self, kind):
        return [d for d in self.decls.values() if d.kind == kind]

    def axis_order(self):
        """The definition's axes in a fixed order (the kernels take their sizes in this order)."""
        out = []
        for d in self.decls.values():
            for a in d.axes + ((d.domain.axis,) if d.domain.axis else ()):
                if a not in out:
                    out.append(a)
        return out


def walk(node):
    """``node`` and every IR node under it (a definition, statement or expression), depth first."""
    yield node
    for v in (vars(node).values() if hasattr(node, "__dict__") else ()):
        for item in (v if isinstance(v, (list, tuple)) else v.values() if isinstance(v, dict) else [v]):
            item = item[0] if isinstance(item, tuple) else item
            if isinstance(item, (Expr, Stmt)):
                yield from walk(item)
