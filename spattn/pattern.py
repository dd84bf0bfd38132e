"""The public :class:`Pattern` object and ``compile``/``load``.

A ``Pattern`` is data: a canonical IR with bound params. Two patterns are equal
(and hash equal) when their canonical IR is, however they were written. Every
method delegates to one stage module; this file holds no analysis or codegen.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from .dsl.errors import SpattnError, SpattnParamError
from .ir.evaluate import mask as _mask
from .ir.inputs import check_lengths, validate_inputs
from .ir.printer import to_source

BACKENDS = ("auto", "triton", "torch")


class Pattern:
    """A compiled attention pattern.

    Attributes:
        ir: the canonical IR (a bool expression of q, k, h, b, Lq, Lk, H and inputs).
        name: the pattern's name (``"pattern"`` for a bare expression).
        params: bound compile-time params, ``name -> int | tuple[int, ...]``.
        inputs: runtime inputs, ``name -> number of index dimensions``.
        source: canonical source text; the cache key is derived from it.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    __slots__ = ("ir", "name", "params", "inputs", "source", "backend", "_cache")

    def __init__(self, ir, *, name: str = "pattern", params: dict | None = None,
                 inputs: dict | None = None, backend: str = "auto"):
        if backend not in BACKENDS:
            raise SpattnParamError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                                   f"got {backend!r}")
        self.ir = ir
        self.name = name
        self.params = dict(params or {})
        self.inputs = dict(inputs or {})
        self.source = to_source(ir)
        self.backend = backend
        self._cache: dict = {}

    # -- identity ---------------------------------------------------------
    @property
    def key(self) -> str:
        """Hex digest of the canonical source: identifies the pattern across processes."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def __eq__(self, other):
        return isinstance(other, Pattern) and self.ir == other.ir

    def __hash__(self):
        return hash(self.ir)

    def __repr__(self):
        inputs = f", inputs={sorted(self.inputs)}" if self.inputs else ""
        return f"Pattern({self.name!r}: {self.source}{inputs})"

    # -- reference semantics ---------------------------------------------
    def mask(self, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
             q_offset: int | None = None, device=None, **inputs) -> torch.Tensor:
        """Dense bool mask ``[batch, num_heads, Lq, Lk]``: the exact meaning of the pattern."""
        check_lengths(Lq, Lk, num_heads=num_heads, batch=batch)
        ins = validate_inputs(self.inputs, inputs, batch=batch, num_heads=num_heads, device=device)
        return _mask(self.ir, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                     inputs=ins, device=device)

    # -- analysis ---------------------------------------------------------
    def tiles(self, Lq: int, Lk: int, block_m: int, block_n: int, *, num_heads: int = 1,
              batch: int = 1, q_offset: int | None = None, device=None, **inputs) -> torch.Tensor:
        """Tile classes ``int8 [batch, num_heads, ceil(Lq/block_m), ceil(Lk/block_n)]``.

        0 = EMPTY (no pair allowed), 1 = PARTIAL, 2 = FULL (every in-range pair allowed).
        O(tiles) time and memory; never evaluates the Lq x Lk pairs.
        """
        from .ir.tiles import classify
        return classify(self, Lq, Lk, block_m, block_n, num_heads=num_heads, batch=batch,
                        q_offset=q_offset, device=device, inputs=inputs)

    def tile_table(self, Lq: int, Lk: int, block_m: int, block_n: int, **kwargs):
        """CSR lists of PARTIAL and FULL key tiles per query tile, and the transpose."""
        from .ir.tables import tile_table
        return tile_table(self.tiles(Lq, Lk, block_m, block_n, **kwargs))

    def key_ranges(self):
        """Closed-form key ranges per query tile (and the transpose), or None if not affine.

        An ``ir.ranges.ClosedForm``: bounds as IR over a tile's first and last position,
        valid for every tile size (``ir.ranges.tile_ranges`` evaluates them per tile).
        """
        from .ir.ranges import closed_form
        return closed_form(self.ir)

    def explain(self, Lq: int, Lk: int | None = None, *, num_heads: int = 1, block_m: int = 128,
                block_n: int = 64, **inputs):
        """A report of what the pattern costs: density, tiles by class, efficiency, strategy."""
        from .ir.explain import explain
        return explain(self, Lq, Lq if Lk is None else Lk, num_heads=num_heads, block_m=block_m,
                       block_n=block_n, inputs=inputs)

    def receptive_field(self, L: int, layers: int, **kwargs):
        """How much of the past each position reaches when the pattern is stacked ``layers`` deep."""
        from .ir.receptive import receptive_field
        return receptive_field(self, L, layers, **kwargs)

    # -- kernels ----------------------------------------------------------
    def __call__(self, q, k, v, *, scale: float | None = None, return_lse: bool = False,
                 q_offset: int | None = None, **inputs):
        """Attention with this pattern; q ``[B, Hq, Lq, D]``, k, v ``[B, Hk, Lk, D]``.

        Returns the output ``[B, Hq, Lq, D]`` (and the log-sum-exp ``[B, Hq, Lq]``, fp32,
        natural log, when ``return_lse``).
        """
        from .runtime.api import call
        return call(self, q, k, v, scale=scale, return_lse=return_lse, q_offset=q_offset,
                    inputs=inputs)

    def kernel_source(self, kind: str = "fwd", **shape_info) -> str:
        """The generated Triton source of one kernel (``kind`` in fwd, bwd)."""
        from .runtime.cache import kernel_file
        return kernel_file(self, kind, **shape_info).read_text()

    @property
    def kernel_path(self) -> "os.PathLike":
        """Path of the generated forward kernel file in the cache directory."""
        from .runtime.cache import kernel_file
        return kernel_file(self, "fwd")


def compile(src: str, *, backend: str = "auto", pattern: str | None = None, **params: Any) -> Pattern:
    """Compile a pattern from a bare expression or a program.

    ``compile("causal & window(W)", W=1024)``; keyword params bind ``param``
    declarations or free names of a bare expression (lists allowed).
    If a program defines several patterns, ``pattern="name"`` picks one.
    """
    from .ir.lower import compile_source
    if not isinstance(src, str):
        raise SpattnError(f"compile() takes the pattern source as a str, got {type(src).__name__}")
    low = compile_source(src, params, pattern=pattern)
    return Pattern(low.ir, name=low.name, params=low.params, inputs=low.inputs, backend=backend)


def pattern_names(path) -> list[str]:
    """Names of the patterns a ``.spattn`` file defines, in order."""
    from .dsl import ast
    from .dsl.parser import parse_program
    text = _read(path)
    program = parse_program(text, filename=os.fspath(path))
    return [s.name for s in program.statements if isinstance(s, ast.PatternDef)]


def _read(path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SpattnError(f"cannot read pattern file {os.fspath(path)!r}: {e.strerror}") from None


def load(path, *, pattern: str | None = None, backend: str = "auto", **params: Any) -> Pattern:
    """Compile the pattern of a ``.spattn`` file."""
    from .ir.lower import compile_source
    text = _read(path)
    low = compile_source(text, params, pattern=pattern, filename=os.fspath(path))
    return Pattern(low.ir, name=low.name, params=low.params, inputs=low.inputs, backend=backend)
