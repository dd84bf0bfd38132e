"""The prelude: named patterns written in the language (``prelude.spattn``).

:func:`prelude` returns the parsed definitions, by name, parsed once.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from . import ast as A

PRELUDE_PATH = Path(__file__).with_name("prelude.spattn")

#: Functions built into the language (not macros; they cannot be shadowed).
BUILTINS = {
    # name: (min args, max args or None)
    "abs": (1, 1),
    "min": (2, None),
    "max": (2, None),
    "clamp": (3, 3),
    "is_pow2": (1, 1),
    # grids (docs/layouts.md): their shape, kernel size, stride, dilation and causal
    # arguments are constants or constant lists (one entry per axis)
    "coord": (3, 3),
    "neighborhood": (2, 5),
    # scores (float functions; docs/language.md §13)
    "tanh": (1, 1),
    "exp": (1, 1),
    "log": (1, 1),
    "sqrt": (1, 1),
    "sign": (1, 1),
    "step": (1, 1),
    "float": (1, 1),         # an int as a float
    # T5's logarithmic distance bucket (an int): log_bucket(n, exact, max_distance, buckets)
    "log_bucket": (4, 4),
}

#: Builtins whose arguments may be unindexed lists.
LIST_BUILTINS = ("coord", "neighborhood")


@lru_cache(maxsize=1)
def prelude_source() -> str:
    return PRELUDE_PATH.read_text()


@lru_cache(maxsize=1)
def prelude() -> dict[str, A.Def]:
    """The prelude's macros: name -> :class:`~spattn.dsl.ast.Def`."""
    from .parser import parse_program
    program = parse_program(prelude_source(), filename="<prelude>")
    return {s.name: s for s in program.statements if isinstance(s, A.Def)}
