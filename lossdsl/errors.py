"""The one exception family of lossdsl.

Compile errors point into the source: ``FILE:LINE:COL: error: REASON``, the line,
and a caret under the column. Runtime errors name the loss and the argument.
"""


class LossError(Exception):
    """Base of every error lossdsl raises on bad input."""


class CompileError(LossError):
    """An error in a ``.loss`` text, located at ``file:line:column`` (1-based)."""

    def __init__(self, reason, file="<string>", line=1, column=1, source_line=""):
        self.reason, self.file, self.line, self.column = reason, file, line, column
        self.source_line = source_line
        caret = " " * (4 + max(column - 1, 0)) + "^"
        super().__init__(f"{file}:{line}:{column}: error: {reason}\n    {source_line}\n{caret}")


class LossSyntaxError(CompileError):
    """The text does not follow the grammar."""


class LossNameError(CompileError):
    """Unknown or duplicated name, function or loss."""


class LossTypeError(CompileError):
    """Well-formed text that does not make sense: axes, arity, kinds, missing ``loss =``."""


class ArgumentError(LossError):
    """A call with wrong arrays: shapes, dtypes, unknown parameters."""


class DomainError(ArgumentError):
    """A value outside the domain its declaration states."""


class Span:
    """A place in a source text; turns a reason into a located CompileError."""

    __slots__ = ("file", "text", "line", "column")

    def __init__(self, file, text, line, column):
        self.file, self.text, self.line, self.column = file, text, line, column

    def error(self, kind, reason):
        lines = self.text.splitlines()
        src = lines[self.line - 1] if 0 < self.line <= len(lines) else ""
        return kind(reason, self.file, self.line, self.column, src)


class CacheWarning(UserWarning):
    """The kernel cache held a damaged file (deleted and rebuilt) or could not be written
    (kernels compiled in memory). The call that met it still succeeds."""
