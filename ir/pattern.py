"""A compiled pattern as data: what every later stage needs of it.

:class:`CompiledPattern` holds the canonical IR, the pattern's name, its bound params, its
runtime-input declarations, the canonical source (printed once: the identity used by the
caches and by the custom op) and the backend it asks for. The public
:class:`spattn.Pattern` adds the methods a user calls; the code generator and the runtime
take any :class:`CompiledPattern`, so that a later stage never imports the public face.
"""
from __future__ import annotations

import hashlib
import re

from ..dsl.errors import SpattnParamError
from .printer import to_source

#: The backends a pattern may ask for.
BACKENDS = ("auto", "triton", "torch")


def _declared_note(ir, score, inputs: dict, score_inputs: dict) -> str:
    """A comment for the op key of a pattern that declares inputs its canonical source does
    not read (``false & same(doc)`` is ``false``, which reads no ``doc``): equal patterns
    that take different inputs are two keys, so a traced call finds the one it was given.
    Empty when the source reads every declared input."""
    from .nodes import FLoad, Load, distinct
    read = {n.name for n in distinct(ir) if isinstance(n, Load)}
    read_f = set() if score is None else {n.name for n in distinct(score) if isinstance(n, FLoad)}
    if read == set(inputs) and read_f == set(score_inputs):
        return ""
    names = ", ".join(f"{n}[{d}]" for n, d in sorted({**inputs, **score_inputs}.items()))
    return f"  # inputs {names}"


class CompiledPattern:
    """A canonical IR with its name, params, runtime inputs and backend (see the module
    docstring). Equal (and hash equal) when the canonical IR is, however it was written.
    ``grid``: the token grid the pattern is defined on (``spattn.neighborhood``, a ``grid``
    declaration, the language's ``neighborhood(...)``), or None; a call's lengths must then
    be its cell count (plus ``grid_offset`` extra tokens before it, ``after T``, and
    ``grid_suffix`` after it, ``before U``). The grid
    is checked at calls, not part of the pattern's identity:
    equality, hashing and ``source`` are the mask's (docs/language.md, grids)."""

    __slots__ = ("ir", "name", "params", "inputs", "source", "backend", "grid", "grid_offset",
                 "grid_suffix", "score", "score_inputs", "op_key", "_last", "_runs", "_layouts")

    def __init__(self, ir, *, name: str = "pattern", params: dict | None = None,
                 inputs: dict | None = None, backend: str = "auto",
                 grid: tuple | None = None, score=None, score_inputs: dict | None = None,
                 grid_offset: int = 0, grid_suffix: int = 0):
        if backend not in BACKENDS:
            raise SpattnParamError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                                   f"got {backend!r}")
        self.ir = ir
        self._last = None   # the last call's checked arguments and plan (runtime.api)
        self._runs = {}     # call shape -> the pattern it runs, its recipe (runtime.scores)
        self._layouts = {}  # call shape -> a scored call's layout or None (runtime.scores)
        self.name = name
        self.params = dict(params or {})
        self.inputs = dict(inputs or {})
        self.score = score
        self.score_inputs = dict(score_inputs or {})
        # the canonical source: the mask, then its score clause (a bare expression that
        # compiles back to the same pattern)
        mask = to_source(ir)
        scored = "" if score is None else f" score {to_source(score)}"
        self.source = mask + scored
        self.backend = backend
        self.grid = None if grid is None else tuple(grid)
        self.grid_offset = int(grid_offset) if grid is not None else 0
        self.grid_suffix = int(grid_suffix) if grid is not None else 0
        # what the custom ops carry (a str attribute: a constant while tracing): the
        # canonical source, preceded by the grid declaration when there is one, so that
        # one mask with and without a grid are two keys; after the grid's ``)`` a name
        # after or before would read as its count, so such a mask is parenthesised
        if re.match(r"(after|before)(?![A-Za-z0-9_])", mask):
            mask = f"({mask})"
        self.op_key = (self.source if self.grid is None else (
            f"grid ({', '.join(map(str, self.grid))})"
            + (f" after {self.grid_offset}" if self.grid_offset else "")
            + (f" before {self.grid_suffix}" if self.grid_suffix else "") + f" {mask}{scored}")
        ) + _declared_note(ir, score, self.inputs, self.score_inputs)

    @classmethod
    def from_source(cls, src: str, *, backend: str = "auto", pattern: str | None = None,
                    filename: str | None = None, score: str | None = None, **params):
        """Compile ``src`` (a bare expression or a program) into an instance of ``cls``."""
        from .lower import compile_source
        low = compile_source(src, params, pattern=pattern, filename=filename, score=score)
        return cls(low.ir, name=low.name, params=low.params, inputs=low.inputs,
                   backend=backend, score=low.score, score_inputs=low.score_inputs,
                   grid=low.grid, grid_offset=low.grid_offset, grid_suffix=low.grid_suffix)

    @property
    def key(self) -> str:
        """Hex digest of the canonical source: identifies the pattern across processes."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    @property
    def all_inputs(self) -> dict:
        """Every runtime input a call passes: the mask's (int) and the score's (float)."""
        return {**self.inputs, **self.score_inputs}

    def __getstate__(self):
        """The slots but the last call's memo (a plan: tensors and kernels, not data)."""
        return None, {n: getattr(self, n) for n in CompiledPattern.__slots__
                      if n not in ("_last", "_runs", "_layouts") and hasattr(self, n)}

    def __setstate__(self, state):
        for n, value in state[1].items():
            object.__setattr__(self, n, value)
        self._last = None
        self._runs = {}
        self._layouts = {}

    def __eq__(self, other):
        return (isinstance(other, CompiledPattern) and self.ir == other.ir
                and self.score == other.score)

    def __hash__(self):
        return hash((self.ir, self.score))

    def __repr__(self):
        inputs = f", inputs={sorted(self.inputs)}" if self.inputs else ""
        return f"{type(self).__name__}({self.name!r}: {self.source}{inputs})"
