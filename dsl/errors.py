"""Errors shown to users.

Every problem a user can cause surfaces as a subclass of :class:`SpattnError`.
Source errors carry a position; ``str(err)`` then shows the line, the column,
the source line and a caret, so the message alone is enough to find the fault.
"""
from __future__ import annotations


class SpattnError(Exception):
    """Base class of every error spattn reports to a user."""

    def __init__(self, message: str, *, source: str | None = None,
                 line: int | None = None, column: int | None = None,
                 filename: str | None = None):
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        self.filename = filename
        super().__init__(self._render())

    def with_position(self, source: str | None, line: int | None, column: int | None,
                      filename: str | None = None) -> "SpattnError":
        """The same error located at (line, column) of ``source``, unless already located."""
        if self.line is not None or line is None:
            return self
        err = type(self).__new__(type(self))
        SpattnError.__init__(err, self.message, source=source, line=line, column=column,
                             filename=filename or self.filename)
        return err

    def _render(self) -> str:
        if self.line is None:
            return self.message
        where = f"{self.filename}:" if self.filename else ""
        head = f"{where}line {self.line}, column {self.column}: {self.message}"
        if self.source is None:
            return head
        lines = self.source.splitlines()
        if not 1 <= self.line <= len(lines):
            return head
        text = lines[self.line - 1].expandtabs(1)
        caret = " " * (max(self.column, 1) - 1) + "^"
        return f"{head}\n    {text}\n    {caret}"


class SpattnSyntaxError(SpattnError):
    """The source text does not follow the grammar."""


class SpattnNameError(SpattnError):
    """An unknown, duplicate or misused name (with a 'did you mean' where one is close)."""


class SpattnTypeError(SpattnError):
    """An int used where a bool is needed, or the reverse; wrong arity."""


class SpattnValueError(SpattnError):
    """A value is out of its domain: division by zero, an index out of range, a bad length."""


class SpattnParamError(SpattnError):
    """Unknown, missing or ill-typed keyword parameters."""


class SpattnInputError(SpattnError):
    """Runtime tensors (q, k, v or pattern inputs) of the wrong shape, dtype or device."""


class SpattnBackendError(SpattnError):
    """The requested backend cannot run here (no CUDA, no TRITON_INTERPRET)."""
