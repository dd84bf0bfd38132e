"""Errors shown to users.

Every problem a user can cause surfaces as a subclass of :class:`SpattnError`.
Source errors carry a position; ``str(err)`` then shows the line, the column,
the source line and a caret, so the message alone is enough to find the fault.
"""
from __future__ import annotations

import numpy

#: Widest source line shown under a message; longer lines are cut to a window around the caret.
_LINE_WIDTH = 120


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
        # (args set, not BaseException.__init__ called: torch.compile traces this
        # constructor when a check fails in a compiled region, and cannot trace that call)
        self.args = (self._render(),)

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
        col = max(self.column, 1) - 1
        if len(text) > _LINE_WIDTH:   # a window of a long line around the caret
            start = min(max(0, col - _LINE_WIDTH // 2), len(text) - _LINE_WIDTH)
            end = start + _LINE_WIDTH
            head_dots = "..." if start > 0 else ""
            text = head_dots + text[start:end] + ("..." if end < len(text) else "")
            col = col - start + len(head_dots)
        caret = " " * col + "^"
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


class SpattnConfigError(SpattnError, ValueError):
    """A launch setting outside its allowed values: a ``SPATTN_*`` environment variable or
    the option it overrides (``strategy=``, ``block_m=``, ``loop=``, ...).

    The message names the variable or option and the values it accepts. Also a
    :class:`ValueError` (a value outside its allowed set), so ``except ValueError`` catches it.
    """


class SpattnCacheError(SpattnError):
    """The kernel cache cannot hold a file where one is needed (no usable directory)."""


#: Largest magnitude of a position offset a user gives spattn (``q_offset``). Positions and
#: their differences are signed 64-bit integers in the kernels; 2**62 leaves room for
#: ``q - k`` and for a position plus a length.
MAX_INT = 2 ** 62
#: Largest magnitude of an integer literal or param. Arithmetic is exact (Python integers:
#: ``ir/bounds.py`` proves what a 64-bit computation gets right, folds comparisons with
#: bounds beyond it, and names what cannot be represented); the limit only keeps numbers
#: printable and cheap.
MAX_LITERAL = 2 ** 256


def short_repr(value) -> str:
    """``repr(value)`` for a message, abbreviated when it is very long (an int of thousands
    of digits cannot even be printed in full: Python limits int-to-str conversion)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        digits = int(value.bit_length() * 0.30103) + 1
        return f"{'-' if value < 0 else ''}<an integer of about {digits} digits>"
    if type(value).__name__ in ("Tensor", "Parameter", "FakeTensor", "FunctionalTensor"):
        return f"<a tensor of shape {list(value.shape)}, {value.dtype}>"   # (traceable)
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not hide the real error
        return f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def is_bool(value) -> bool:
    """Whether ``value`` is a bool, Python's or numpy's (whose type is ``numpy.bool``, named
    ``bool_`` before numpy 2): what a check that takes a flag accepts."""
    return isinstance(value, (bool, numpy.bool_))


class SpattnWarning(UserWarning):
    """Base class of the warnings spattn gives about a call that runs but is likely not what
    was meant (filter them with ``warnings.filterwarnings("ignore", category=...)``)."""


class SpattnLayoutWarning(SpattnWarning):
    """q, k, v given without ``layout=`` look like ``[B, L, H, D]`` tensors read as
    ``[B, H, L, D]`` (pass ``layout="bshd"``, or ``layout="bhsd"`` to say they are not)."""


class SpattnEmptyPatternWarning(SpattnWarning):
    """The pattern allows no (query, key) pair: every output row is 0."""


class SpattnDenseMaskWarning(SpattnWarning):
    """A transformers layer runs transformers' own dense mask, built from mask functions
    spattn cannot read, instead of a compiled pattern (``set_patterns`` gives it one)."""
