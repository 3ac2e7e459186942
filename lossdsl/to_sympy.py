"""IR -> sympy: one expression for the loss of one sample, built by construction (never sympify).

Names resolve here (inputs, targets, params, locals, axis sizes, reduction indices), axes are
checked (an index must range over the axis it indexes), calls of functions become stable
primitives and calls of other losses are inlined with their arguments substituted.
"""
from dataclasses import dataclass

import sympy as sp

from . import ir
from .errors import LossNameError, LossTypeError
from .primitives import REDUCTIONS, Max2, Min2, Sum, expm1, indicator, log1p, sigmoid, softplus, substitute, xlogy


def _clip(x, lo, hi):
    return Min2(Max2(x, lo), hi)


# name -> (arity, builder). log_sigmoid and relu are written in terms of the others.
FUNCTIONS = {
    "exp": (1, sp.exp), "log": (1, sp.log), "log1p": (1, log1p), "expm1": (1, expm1),
    "sqrt": (1, sp.sqrt), "abs": (1, sp.Abs), "sign": (1, sp.sign), "sigmoid": (1, sigmoid),
    "softplus": (1, softplus), "log_sigmoid": (1, lambda x: -softplus(-x)), "tanh": (1, sp.tanh),
    "cosh": (1, sp.cosh), "sinh": (1, sp.sinh), "relu": (1, lambda x: Max2(0, x)),
    "max": (2, Max2), "min": (2, Min2), "clip": (3, _clip), "xlogy": (2, xlogy),
}

_ASSUMPTIONS = {"real": {}, "unit": {"nonnegative": True}, "positive": {"positive": True},
                "nonnegative": {"nonnegative": True}, "binary": {"nonnegative": True},
                "sign": {"nonzero": True}, "simplex": {"nonnegative": True}}


@dataclass
class Array:
    """An input or target with axes: elements are ``fn(i, j, ...)``."""
    fn: object
    axes: tuple            # axis names of the scope it is bound in
    decl: ir.Decl
    class_size: object = None   # the size Symbol of class(AXIS), for class targets


@dataclass
class Local:
    """An indexed local ``u[i, d] = expr``: a template over its index symbols, inlined where it is
    used, or (batch losses) an array ``fn`` computed once into a buffer."""
    indices: tuple
    axes: tuple
    expr: object
    fn: object = None


@dataclass
class IndexVar:
    symbol: object
    axis: str = None       # inferred from the first use


@dataclass
class Lowered:
    """What the back ends need: the per-sample expression and the symbols it is written in."""
    definition: ir.Definition
    expr: object
    scalars: dict          # name -> Symbol (inputs, targets, params with no axes)
    arrays: dict           # name -> (UndefinedFunction, axes)
    sizes: dict            # axis name -> Symbol
    locals: list = ()      # batch losses: (name, UndefinedFunction, index Symbols, axes, body), in order


def symbol_for(decl):
    if decl.domain.name == "class":
        return sp.Symbol(decl.name, integer=True, nonnegative=True)
    return sp.Symbol(decl.name, real=True, **_ASSUMPTIONS[decl.domain.name])


def to_sympy(defn, lookup):
    """Lower one definition. ``lookup(name)`` returns the ir.Definition of another loss or None."""
    conv = _Converter(lookup, [defn.name], {})
    conv.materialize = bool(defn.batch)
    sizes = {a: sp.Symbol(a, integer=True, positive=True) for a in defn.axis_order()}
    if defn.batch and defn.batch not in sizes:
        raise defn.span.error(LossTypeError, f"batch axis '{defn.batch}' is not an axis of any input")
    env, scalars, arrays = dict(sizes), {}, {}
    for d in defn.decls.values():
        if d.domain.axis and d.domain.axis not in sizes:
            raise d.span.error(LossTypeError, f"class({d.domain.axis}) names an axis no input has")
        class_size = sizes[d.domain.axis] if d.domain.axis else None
        if d.axes:
            fn = sp.Function(d.name, integer=True) if class_size else sp.Function(d.name, real=True)
            env[d.name] = Array(fn, d.axes, d, class_size)
            arrays[d.name] = (fn, d.axes)
        else:
            env[d.name] = scalars[d.name] = symbol_for(d)
            if class_size is not None:
                conv.class_sizes[scalars[d.name]] = class_size
    expr = conv.body(defn, env)
    if defn.batch and defn.batch in _free_axes(expr, conv):
        raise defn.loss.span.error(LossTypeError, f"the loss must reduce over the batch axis '{defn.batch}'")
    return Lowered(defn, expr, scalars, arrays, sizes, conv.locals)


def _free_axes(expr, conv):
    return {v.axis for v in conv.index_vars if v.symbol in expr.free_symbols}


class _Converter:
    def __init__(self, lookup, stack, class_sizes):
        self.lookup, self.stack, self.index_vars = lookup, stack, []
        self.class_sizes = class_sizes     # class-target Symbol -> size Symbol of its axis
        self.materialize, self.locals = False, []

    def body(self, defn, env):
        env = dict(env)
        for st in defn.stmts:
            if st.name in env:
                raise st.span.error(LossNameError, f"'{st.name}' is already defined")
            if st.name in FUNCTIONS:
                raise st.span.error(LossNameError, f"'{st.name}' is a function and cannot be redefined")
            if st.indices:
                local_env = dict(env)
                ivars = []
                for name in st.indices:
                    if name in env:
                        raise st.span.error(LossNameError, f"index '{name}' shadows '{name}'")
                    v = IndexVar(sp.Symbol(name, integer=True))
                    ivars.append(v)
                    local_env[name] = v
                    self.index_vars.append(v)
                expr = self.number(st.expr, local_env)
                for v in ivars:
                    if v.axis is None:
                        raise st.span.error(LossTypeError, f"index '{v.symbol}' is not used to index any array")
                local = Local(tuple(v.symbol for v in ivars), tuple(v.axis for v in ivars), expr)
                if self.materialize:
                    local.fn = sp.Function(st.name, real=True)
                    self.locals.append((st.name, local.fn, local.indices, local.axes, expr))
                env[st.name] = local
            else:
                env[st.name] = self.number(st.expr, env)
        return self.number(defn.loss.expr, env)

    # --- expressions -----------------------------------------------------------------------
    def number(self, e, env):
        """Convert an expression used as a number (a comparison becomes a 0/1 indicator)."""
        out = self.convert(e, env)
        return indicator(out) if _is_bool(out) else out

    def condition(self, e, env):
        out = self.convert(e, env)
        if not _is_bool(out):
            raise e.span.error(LossTypeError, "a condition must be a comparison, as in 'abs(r) <= delta'")
        return out

    def convert(self, e, env):
        method = getattr(self, "_" + type(e).__name__.lower())
        return method(e, env)

    def _num(self, e, env):
        return sp.Rational(e.value)

    def _name(self, e, env):
        if e.id not in env:
            if e.id in FUNCTIONS:
                raise e.span.error(LossNameError, f"'{e.id}' is a function: call it, as in {e.id}(x)")
            raise e.span.error(LossNameError, f"unknown name '{e.id}'")
        b = env[e.id]
        if isinstance(b, (Array, Local)):
            raise e.span.error(LossTypeError, f"'{e.id}' has axes {_axes(b.axes)}: index it, as in {e.id}[...]")
        if isinstance(b, IndexVar):
            return b.symbol
        return b

    def _index(self, e, env):
        if e.id not in env:
            raise e.span.error(LossNameError, f"unknown name '{e.id}'")
        b = env[e.id]
        if not isinstance(b, (Array, Local)):
            raise e.span.error(LossTypeError, f"'{e.id}' is a scalar and cannot be indexed")
        if len(e.args) != len(b.axes):
            raise e.span.error(LossTypeError, f"'{e.id}' has {len(b.axes)} ax{'i' if len(b.axes) == 1 else 'e'}s "
                                              f"{_axes(b.axes)}, indexed with {len(e.args)}")
        idx = [self._index_arg(a, axis, env, e.id) for a, axis in zip(e.args, b.axes)]
        if isinstance(b, Array) or b.fn is not None:
            return b.fn(*idx)
        return substitute(b.expr, dict(zip(b.indices, idx)))

    def _index_arg(self, a, axis, env, array):
        """An index is an index variable of the same axis, or a class target over that axis."""
        if isinstance(a, ir.Name) and isinstance(env.get(a.id), IndexVar):
            v = env[a.id]
            if v.axis is None:
                v.axis = axis
            elif v.axis != axis:
                raise a.span.error(LossTypeError, f"index '{a.id}' ranges over axis {v.axis} but indexes "
                                                  f"axis {axis} of '{array}'")
            return v.symbol
        value = self.convert(a, env) if isinstance(a, (ir.Name, ir.Index)) else None
        b = env.get(a.id) if isinstance(a, (ir.Name, ir.Index)) else None
        size = b.class_size if isinstance(b, Array) else self.class_sizes.get(value)
        if size is None:
            raise a.span.error(LossTypeError, f"an index of '{array}' must be an index name or a class target")
        if size is not env[axis]:
            raise a.span.error(LossTypeError, f"'{a.id}' is a class over axis {size} but indexes axis "
                                              f"{axis} of '{array}'")
        return value

    def _unary(self, e, env):
        return -self.number(e.x, env)

    def _binary(self, e, env):
        if e.op in ("and", "or"):
            a, b = self.condition(e.a, env), self.condition(e.b, env)
            return sp.And(a, b) if e.op == "and" else sp.Or(a, b)
        a, b = self.number(e.a, env), self.number(e.b, env)
        ops = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
               "^": lambda: a ** b, "<": lambda: sp.Lt(a, b), "<=": lambda: sp.Le(a, b),
               ">": lambda: sp.Gt(a, b), ">=": lambda: sp.Ge(a, b), "==": lambda: sp.Eq(a, b),
               "!=": lambda: sp.Ne(a, b)}
        return ops[e.op]()

    def _ifelse(self, e, env):
        return sp.Piecewise((self.number(e.then, env), self.condition(e.cond, env)),
                            (self.number(e.other, env), True))

    def _reduction(self, e, env):
        if e.index in env:
            raise e.span.error(LossNameError, f"reduction index '{e.index}' shadows '{e.index}'")
        v = IndexVar(sp.Symbol(e.index, integer=True))
        self.index_vars.append(v)
        inner = dict(env, **{e.index: v})
        body = self.number(e.body, inner)
        if v.axis is None:
            raise e.span.error(LossTypeError, f"reduction index '{e.index}' is not used to index any array")
        size = env[v.axis]
        cond = sp.true
        if e.filter_op:
            cond = self._binary(ir.Binary(e.span, e.filter_op, ir.Name(e.span, e.index), e.filter_rhs), inner)
        if e.op == "mean":
            count = size if cond is sp.true else Sum(v.symbol, size, sp.S.One, cond)
            return Sum(v.symbol, size, body, cond) / count
        return REDUCTIONS[e.op](v.symbol, size, body, cond)

    def _call(self, e, env):
        if e.fn in FUNCTIONS:
            arity, build = FUNCTIONS[e.fn]
            if e.kwargs:
                raise next(iter(e.kwargs.values()))[1].error(LossTypeError, f"{e.fn}() takes no keyword arguments")
            if len(e.args) != arity:
                raise e.span.error(LossTypeError, f"{e.fn}() takes {arity} argument{'s' * (arity > 1)}, "
                                                  f"got {len(e.args)}")
            return build(*(self.number(a, env) for a in e.args))
        callee = self.lookup(e.fn)
        if callee is None:
            raise e.span.error(LossNameError, f"unknown function or loss '{e.fn}'")
        if e.fn in self.stack:
            raise e.span.error(LossTypeError, f"loss '{e.fn}' calls itself ({' -> '.join(self.stack + [e.fn])})")
        return self._inline(e, callee, env)

    def _inline(self, e, callee, env):
        """Substitute the arguments into the callee: its gradient flows through the call."""
        args = [d for d in callee.decls.values() if d.kind in ("input", "target")]
        params = {d.name: d for d in callee.decls.values() if d.kind == "param"}
        if len(e.args) != len(args):
            raise e.span.error(LossTypeError, f"loss '{e.fn}' takes {len(args)} arguments "
                                              f"({', '.join(d.name for d in args)}), got {len(e.args)}")
        if callee.batch:
            raise e.span.error(LossTypeError, f"loss '{e.fn}' couples a batch and cannot be called per sample")
        inner = {}
        for d, a in zip(args, e.args):
            if not d.axes:
                inner[d.name] = self.number(a, env)
                continue
            b = env.get(a.id) if isinstance(a, ir.Name) else None
            if not isinstance(b, Array) or len(b.axes) != len(d.axes):
                raise a.span.error(LossTypeError, f"argument '{d.name}' of '{e.fn}' has axes {_axes(d.axes)}: "
                                                  f"pass an array with as many axes")
            for callee_axis, axis in zip(d.axes, b.axes):
                if inner.setdefault(callee_axis, env[axis]) is not env[axis]:
                    raise a.span.error(LossTypeError, f"axis {callee_axis} of '{e.fn}' bound to two sizes")
            inner[d.name] = Array(b.fn, d.axes, d, b.class_size)
        for name, (expr, span) in e.kwargs.items():
            if name not in params:
                raise span.error(LossNameError, f"loss '{e.fn}' has no param '{name}'"
                                                f"{' (params: ' + ', '.join(params) + ')' if params else ''}")
        for name, d in params.items():
            inner[name] = self.number(e.kwargs[name][0], env) if name in e.kwargs else sp.Rational(repr(d.default))
        for d in callee.decls.values():
            for axis in d.axes:
                inner.setdefault(axis, sp.Symbol(axis, integer=True, positive=True))
        sub = _Converter(self.lookup, self.stack + [e.fn], self.class_sizes)
        sub.index_vars = self.index_vars
        return sub.body(callee, inner)



def _is_bool(x):
    # Symbol is a Boolean subclass in sympy; only relations and logic count here.
    return isinstance(x, (sp.core.relational.Relational, sp.logic.boolalg.BooleanFunction,
                          sp.logic.boolalg.BooleanAtom))


def _axes(axes):
    return "[" + ", ".join(axes) + "]"
