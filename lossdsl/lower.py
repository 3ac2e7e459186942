"""Parse ``.loss`` text with the Lark grammar and lower the tree to the IR (``ir.py``).

Checks made here are the ones that need no types: syntax, duplicated names, domains,
parameter defaults inside their domain, exactly one ``loss =`` line.
"""
import hashlib
import io
import math
import re
from contextlib import suppress
from functools import lru_cache

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from . import ir
from .errors import CompileError, LossNameError, LossSyntaxError, LossTypeError, Span
from .paths import GRAMMAR, cache_dir, write_atomic

# Words a user may not take as a name: they are the language's own.
RESERVED = {"loss", "input", "target", "param", "batch", "if", "else", "and", "or",
            "sum", "mean", "max", "min", "logsumexp", "norm"}

_TOKEN_WORDS = {"_NL": "end of line", "$END": "end of input", "NAME": "a name", "NUMBER": "a number",
                "COMPARE": "a comparison", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'",
                "COMMA": "','", "EQUAL": "'='", "COLON": "':'", "PLUS": "'+'", "MINUS": "'-'",
                "STAR": "'*'", "SLASH": "'/'", "POW": "'^'", "STRING": "a string", "LOSS_EQ": "'loss ='"}


_PARSER_OPTIONS = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}


def parser_file_name(text=None):
    """The cache file name of the parser of grammar ``text`` (the grammar's, by default)."""
    text = GRAMMAR.read_text() if text is None else text
    return f"parser_{hashlib.sha256(repr((text, _PARSER_OPTIONS, lark.__version__)).encode()).hexdigest()[:24]}.pickle"


@lru_cache(maxsize=1)
def parser():
    """The grammar's parser. Its LALR tables take 70 ms to build, a fifth of loading a cached kernel
    in a new process: they are kept in the cache directory as ``parser_<sha>.pickle``, named by the
    hash of the grammar, the options and lark's version (a pickle, trusted as numba's files next
    to it are); a file that does not load is built and written again."""
    text = GRAMMAR.read_text()
    path = cache_dir() / parser_file_name(text)
    with suppress(Exception):       # none yet, damaged, or not lark's
        with open(path, "rb") as f:
            return Lark.load(f)
    built = Lark(text, **_PARSER_OPTIONS)
    data = io.BytesIO()
    built.save(data)
    with suppress(OSError):         # a cache that cannot be written: built again next time
        write_atomic(path, data.getvalue())
    return built


def _expected(tokens):
    words = sorted({_TOKEN_WORDS.get(t, repr(t.lower()) if t.isupper() else t) for t in tokens})
    return ", ".join(words[:8]) + (", ..." if len(words) > 8 else "")


def _syntax_error(e, text, file):
    if isinstance(e, UnexpectedToken) and e.token.type == "$END" or (
            isinstance(e, UnexpectedToken) and e.token.type == "_NL"):
        # Point just past the last character of the line that ended too early.
        line_no = e.line if e.token.type == "_NL" else len(text.rstrip("\n").splitlines())
        line = text.splitlines()[line_no - 1] if text.splitlines() else ""
        col = len(line.split("#")[0].rstrip()) + 1
        return Span(file, text, line_no, col).error(
            LossSyntaxError, f"the line ends too early: expected {_expected(e.expected)}")
    span = Span(file, text, e.line, e.column)
    if isinstance(e, UnexpectedCharacters):
        return span.error(LossSyntaxError, f"unexpected character {text[e.pos_in_stream]!r}")
    if isinstance(e, UnexpectedToken):
        return span.error(LossSyntaxError,
                          f"unexpected {e.token.value!r}: expected {_expected(e.expected)}")
    return span.error(LossSyntaxError, str(e).splitlines()[0])


def parse(text, file="<string>"):
    """Text -> list of ir.Definition. Raises CompileError subclasses, never anything else."""
    if not isinstance(text, str):
        raise LossSyntaxError("a loss text must be a str", file)
    try:
        tree = parser().parse(text + "\n")
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    try:
        defs = _ToIR(text, file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, CompileError):
            raise e.orig_exc from None
        raise
    seen = {}
    for d in defs:
        if d.name in seen:
            raise d.span.error(LossNameError, f"loss '{d.name}' is defined twice (first at line {seen[d.name]})")
        seen[d.name] = d.span.line
    return defs


class _ToIR(Transformer):
    """Lark tree -> IR. Method names are the grammar's rule aliases."""

    def __init__(self, text, file):
        super().__init__()
        self.text, self.file = text, file
        self.lines = text.splitlines()

    def span(self, node):
        meta = node.meta if hasattr(node, "meta") else node
        if isinstance(node, Token):
            return Span(self.file, self.text, node.line, node.column)
        return Span(self.file, self.text, getattr(meta, "line", 1), getattr(meta, "column", 1))

    def tok(self, t):
        return Span(self.file, self.text, t.line, t.column)

    def _name(self, t):
        if str(t) in RESERVED:
            raise self.tok(t).error(LossNameError, f"'{t}' is a reserved word and cannot be a name")
        return str(t)

    # --- file and definitions ----------------------------------------------------------
    def start(self, children):
        return [c for c in children if isinstance(c, ir.Definition)]

    def loss_at(self, line):
        """The name of the definition a line belongs to (the transformer works bottom-up)."""
        for text in reversed(self.lines[:line]):
            m = re.match(r"\s*loss\s+([A-Za-z_]\w*)", text)
            if m:
                return m.group(1)
        return "?"

    @v_args(meta=True)
    def definition(self, meta, children):
        name_tok, rest = children[0], children[1:]
        doc = ""
        if rest and isinstance(rest[0], Token) and rest[0].type == "STRING":
            doc, rest = rest[0][1:-1], rest[1:]
        span = self.tok(name_tok)
        decls, stmts, loss, batch = {}, [], None, None
        for item in rest:
            if isinstance(item, tuple) and item[0] == "batch":
                if batch is not None:
                    raise item[2].error(LossNameError, "a loss has at most one batch axis")
                batch = item[1]
            elif isinstance(item, list):                       # declarations
                for d in item:
                    if d.name in decls:
                        raise d.span.error(LossNameError, f"'{d.name}' is declared twice in loss '{name_tok}'")
                    decls[d.name] = d
            elif item.name == "loss":
                if loss is not None:
                    raise item.span.error(LossTypeError, f"loss '{name_tok}' has two 'loss =' lines")
                loss = item
            else:
                if loss is not None:
                    raise item.span.error(LossTypeError, "statements must come before the 'loss =' line")
                stmts.append(item)
        if loss is None:
            raise span.error(LossTypeError, f"loss '{name_tok}' has no 'loss = ...' line")
        last = max([loss.span.line] + [d.span.line for d in decls.values()])
        text = "\n".join(self.lines[span.line - 1:last])
        return ir.Definition(self._name(name_tok), doc, decls, batch, stmts, loss, span, text)

    # --- declarations ------------------------------------------------------------------
    def array(self, children):
        return children[0], tuple(self._name(a) for a in children[1:])

    def domain(self, children):
        name = str(children[0])
        if name not in ir.DOMAINS:
            raise self.tok(children[0]).error(
                LossNameError, f"unknown domain '{name}': expected one of {', '.join(ir.DOMAINS)}")
        if (name == "class") != (len(children) == 2):
            raise self.tok(children[0]).error(
                LossTypeError, "'class' takes its axis, as in class(K); other domains take none")
        return ir.Domain(name, str(children[1]) if len(children) == 2 else None), self.tok(children[0])

    def signed_number(self, children):
        sign = -1.0 if len(children) == 2 and children[0] == "-" else 1.0
        return sign * float(children[-1]), self.tok(children[0])

    def _decls(self, kind, arrays, domain):
        dom, dspan = domain if domain else (ir.Domain(), None)
        return [ir.Decl(kind, self._name(t), axes, dom, self.tok(t)) for t, axes in arrays]

    def input_decl(self, children):
        return self._decls("input", children, None)

    def target_decl(self, children):
        domain = children[-1] if isinstance(children[-1], tuple) and isinstance(children[-1][0], ir.Domain) else None
        arrays = children[:-1] if domain else children
        return self._decls("target", arrays, domain)

    def param_decl(self, children):
        name, (value, vspan) = children[0], children[1]
        dom, dspan = children[2] if len(children) > 2 else (ir.Domain(), None)
        if dom.name in ("class", "simplex"):
            raise dspan.error(LossTypeError, f"a param is a scalar number; domain '{dom}' is for targets")
        if not in_domain(value, dom.name):
            raise vspan.error(LossTypeError, f"default {value:g} of param '{name}' is outside its domain '{dom}'"
                                             f" in loss '{self.loss_at(vspan.line)}'")
        return [ir.Decl("param", self._name(name), (), dom, self.tok(name), default=value)]

    def batch_decl(self, children):
        return ("batch", self._name(children[0]), self.tok(children[0]))

    # --- statements ----------------------------------------------------------------------
    def assign(self, children):
        return ir.Stmt(self._name(children[0]), (), children[1], self.tok(children[0]))

    def assign_indexed(self, children):
        name, *idx, expr = children
        return ir.Stmt(self._name(name), tuple(self._name(i) for i in idx), expr, self.tok(name))

    def assign_loss(self, children):
        return ir.Stmt("loss", (), children[1], self.tok(children[0]))

    # --- expressions ---------------------------------------------------------------------
    @v_args(meta=True)
    def number(self, meta, children):
        return ir.Num(self.span(meta), str(children[0]))

    @v_args(meta=True)
    def name(self, meta, children):
        return ir.Name(self.span(meta), str(children[0]))

    @v_args(meta=True)
    def index(self, meta, children):
        return ir.Index(self.span(meta), str(children[0]), list(children[1:]))

    @v_args(meta=True)
    def call(self, meta, children):
        fn, args, kwargs = str(children[0]), [], {}
        for a in children[1:]:
            if a is None:
                continue
            if isinstance(a, tuple):
                if a[0] in kwargs:
                    raise a[2].error(LossNameError, f"keyword '{a[0]}' is given twice")
                kwargs[a[0]] = (a[1], a[2])
            elif kwargs:
                raise a.span.error(LossSyntaxError, "positional argument after a keyword argument")
            else:
                args.append(a)
        return ir.Call(self.span(meta), fn, args, kwargs)

    def fname(self, children):
        return children[0]

    def redop(self, children):
        return children[0]

    def kwarg(self, children):
        return (str(children[0]), children[1], self.tok(children[0]))

    @v_args(meta=True)
    def reduce(self, meta, children):
        op, idx, *rest = children
        filter_op, filter_rhs = (str(rest[0]), rest[1]) if len(rest) == 3 else (None, None)
        return ir.Reduction(self.span(meta), str(op), self._name(idx), filter_op, filter_rhs, rest[-1])

    @v_args(meta=True)
    def neg(self, meta, children):
        return ir.Unary(self.span(meta), "-", children[0])

    def _binary(op):
        @v_args(meta=True)
        def method(self, meta, children):
            return ir.Binary(self.span(meta), op, children[0], children[-1])
        return method

    add, sub, mul, div, pow = _binary("+"), _binary("-"), _binary("*"), _binary("/"), _binary("^")
    and_, or_ = _binary("and"), _binary("or")

    @v_args(meta=True)
    def compare(self, meta, children):
        return ir.Binary(self.span(meta), str(children[1]), children[0], children[2])

    @v_args(meta=True)
    def ifelse(self, meta, children):
        return ir.IfElse(self.span(meta), children[0], children[1], children[2])


def in_domain(value, domain):
    """Is a scalar inside a domain? NaN never is."""
    if math.isnan(value):
        return False
    return {"real": math.isfinite(value), "unit": 0 <= value <= 1, "positive": 0 < value < math.inf,
            "nonnegative": 0 <= value < math.inf, "binary": value in (0, 1),
            "sign": value in (-1, 1)}.get(domain, True)
