"""The public :class:`Pattern` object and ``compile``/``load``.

A ``Pattern`` is data: a canonical IR with bound params. Two patterns are equal
(and hash equal) when their canonical IR is, however they were written. Every
method delegates to one stage module; this file holds no analysis or codegen.
"""
from __future__ import annotations

import contextlib
import math
import os
import stat
from typing import Any

import torch

from .dsl.errors import (SpattnError, SpattnParamError, SpattnSyntaxError, SpattnValueError,
                         short_repr)
from .ir.evaluate import mask as _mask
from .ir.inputs import check_lengths, validate_inputs
from .ir.memory import check_room
from .ir.pattern import BACKENDS, CompiledPattern  # noqa: F401  (BACKENDS: public)
from .runtime import api as _runtime_api
from .runtime.autograd import register as _register
from .runtime.decode import decode as _decode, fast_routed as _fast_routed, \
    fast_step as _fast_step
from .runtime.usage import plain as _plain, plain_inputs as _plain_inputs, \
    plain_qkv as _plain_qkv, autocast_on as _autocast_on, \
    warn_if_false, KERNEL_OPTIONS, check_keywords as _check_keywords


class Pattern(CompiledPattern):
    """A compiled attention pattern.

    Attributes:
        ir: the canonical IR (a bool expression of q, k, h, b, Lq, Lk, H and inputs).
        name: the pattern's name (``"pattern"`` for a bare expression).
        params: bound compile-time params, ``name -> int | tuple[int, ...]``.
        inputs: runtime inputs, ``name -> number of index dimensions``.
        source: canonical source text; the cache key is derived from it.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    __slots__ = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _register(self)      # for torch.compile: a traced call carries only op_key

    def __repr__(self):
        inputs = f", inputs={sorted(self.inputs)}" if self.inputs else ""
        grid = f", grid={self.grid}" if self.grid is not None else ""
        if self.grid_offset:
            grid += f" after {self.grid_offset}"
        if self.grid_suffix:
            grid += f" before {self.grid_suffix}"
        return f"Pattern({self.name!r}: {self.source}{inputs}{grid})"

    # -- composition ------------------------------------------------------
    def __and__(self, other):
        """``a & b``: the pairs both patterns allow (see :func:`combine`)."""
        return combine("and", self, other)

    def __rand__(self, other):
        return combine("and", other, self)

    def __or__(self, other):
        """``a | b``: the pairs either pattern allows (see :func:`combine`)."""
        return combine("or", self, other)

    def __ror__(self, other):
        return combine("or", other, self)

    def __invert__(self):
        """``~a``: the pairs the pattern does not allow (its score, if any, is kept)."""
        return combine("not", self)

    # -- reference semantics ---------------------------------------------
    def mask(self, Lq: int, Lk: int, *, num_heads: int = 1, batch: int = 1,
             q_offset: int | None = None, device=None, **inputs) -> torch.Tensor:
        """Dense bool mask ``[batch, num_heads, Lq, Lk]``: the exact meaning of the pattern
        (of its mask: a score's float tables may be passed and are not read), on ``device``
        (default: the runtime inputs' device, else the CPU)."""
        inputs = _mask_inputs(self, inputs)
        Lq, Lk, num_heads, batch = _ints(Lq, Lk, num_heads, batch)
        check_lengths(Lq, Lk, num_heads=num_heads, batch=batch)
        q_offset, device = _checked(self, Lq, Lk, q_offset, device, inputs)
        ins = validate_inputs(self.inputs, inputs, batch=batch, num_heads=num_heads, device=device)
        what = f"the dense mask [{batch}, {num_heads}, {Lq}, {Lk}]"
        # the bool result and at least one int64 broadcast of the pairs while it is evaluated
        check_room(9 * batch * num_heads * Lq * Lk, device, f"{what} (9 bytes a pair or more "
                   "while it is evaluated)")
        with _fits(what):
            return _mask(self.ir, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                         inputs=ins, device=device)

    # -- analysis ---------------------------------------------------------
    def tiles(self, Lq: int, Lk: int, block_m: int, block_n: int, *, num_heads: int = 1,
              batch: int = 1, q_offset: int | None = None, device=None, **inputs) -> torch.Tensor:
        """Tile classes ``int8 [batch, num_heads, ceil(Lq/block_m), ceil(Lk/block_n)]``.

        0 = EMPTY (no pair allowed), 1 = PARTIAL, 2 = FULL (every in-range pair allowed).
        O(tiles) time and memory; never evaluates the Lq x Lk pairs. On ``device`` (default:
        the runtime inputs' device, else the CPU).
        """
        from .ir.tiles import classify
        inputs = _mask_inputs(self, inputs)
        Lq, Lk, block_m, block_n, num_heads, batch = _ints(Lq, Lk, block_m, block_n, num_heads,
                                                           batch)
        q_offset, device = _checked(self, Lq, Lk, q_offset, device, inputs)
        with _fits("the tile grid"):
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

    def explain(self, Lq: int, Lk: int | None = None, *, num_heads: int = 1, batch: int = 1,
                q_offset: int | None = None, block_m: int | None = None,
                block_n: int | None = None, target: str = "cuda", **inputs):
        """A report of what the pattern costs: density, tiles by class, efficiency, strategy,
        and the forward's speedup over dense attention predicted for ``target`` (``"cuda"``
        or ``"cpu"``; tiles default to that target's). ``batch``, ``num_heads``: the call's
        sizes, which runtime inputs ``[B, ...]`` / ``[B, H, ...]`` are checked against (as
        :meth:`mask` does)."""
        from .ir.explain import explain
        from .runtime.progress import progress
        from .runtime.compose import min_ops
        from .runtime.plan import layout_gather
        from .runtime.settings import current
        inputs = _mask_inputs(self, inputs)
        # the gathers a call on ``target`` would use: the torch backend always copies, and
        # so does a scored call (runtime.scores.LayoutRun)
        backend = "torch" if self.backend == "torch" or target == "cpu" \
            or self.score is not None else "triton"
        Lk = Lq if Lk is None else Lk
        Lq, Lk, num_heads, batch, block_m, block_n = _ints(Lq, Lk, num_heads, batch, block_m,
                                                           block_n)
        check_lengths(Lq, Lk, num_heads=num_heads, batch=batch)
        q_offset, _ = _checked(self, Lq, Lk, q_offset, None, inputs)
        with _fits("the analysis"), progress(f"explaining {self.name!r} at Lq={Lq}, Lk={Lk}"):
            if self.backend == "torch" or target == "cpu":
                strategy = "torch"
            else:
                from .runtime.plan import forward_strategy
                strategy = forward_strategy(self, Lq, Lk, num_heads=num_heads, batch=batch,
                                            q_offset=q_offset, settings=current())
            return explain(self, Lq, Lk, num_heads=num_heads, batch=batch, q_offset=q_offset,
                           block_m=block_m, block_n=block_n, inputs=inputs, target=target,
                           gather=layout_gather(None, current(), backend),
                           compose_ops=min_ops(current()), strategy=strategy)

    def receptive_field(self, L: int, layers: int, **kwargs):
        """How much of the past each position reaches when the pattern is stacked ``layers`` deep."""
        from .ir.receptive import receptive_field
        if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
            return receptive_field(self, L, layers, **kwargs)     # its error names L
        _checked(self, L, L, None, None, kwargs)                  # a grid's length too
        with _fits("the attention graph"):
            return receptive_field(self, L, layers, **kwargs)

    # -- kernels ----------------------------------------------------------
    def __call__(self, q, k, v, *, scale: float | None = None, return_lse: bool = False,
                 q_offset: int | None = None, plan=None, layout: str | None = None,
                 deterministic: bool = False, order=None, **inputs):
        """Attention with this pattern; q ``[B, Hq, Lq, D]``, k ``[B, Hk, Lk, D]``, v
        ``[B, Hk, Lk, Dv]`` (``Dv = D`` in the kernels; another ``Dv``, as in multi-head
        latent attention, runs with the narrower side zero-padded, a copy per call).

        Returns the output ``[B, Hq, Lq, Dv]`` (and the log-sum-exp ``[B, Hq, Lq]``, fp32,
        natural log, when ``return_lse``). ``plan``: a plan made by :meth:`plan` for
        tensors laid out like these (it holds the runtime inputs, scale and offset).
        ``layout``: ``"bhsd"`` (the default) or ``"bshd"``: q ``[B, Lq, Hq, D]``, k, v
        ``[B, Lk, Hk, D]`` and the output ``[B, Lq, Hq, D]`` (a transposed view; lse stays
        ``[B, Hq, Lq]``). Without ``layout=`` a q that reads as more than 256 heads,
        and more heads than positions, gives a :class:`SpattnLayoutWarning`.
        ``deterministic``: the gradients of a score's learnable tables summed in a fixed
        order (on Triton for tables read at entries of neither q nor k, or along q - k;
        else by the torch backend's backward; docs/backends.md, Scores).
        ``order``: a token order to run in, an int tensor ``[L]`` holding a permutation of
        ``0 .. L-1`` (self-attention, ``Lq = Lk = L``): slot ``i`` holds token ``order[i]``.
        The mask keeps its meaning over the original positions and q, k, v and the output
        stay in the caller's order; the kernels run on the tokens gathered into ``order``, so
        an order whose contiguous tiles the pattern makes FULL or EMPTY runs faster
        (docs/layouts.md, "A caller's token order"). It replaces any layout the compiler
        would choose.
        """
        fast = plan is None and not return_lse and layout is None and order is None
        if fast and not inputs and q_offset is None:
            # a repeated CPU decode step: public SDPA, which applies a negative bit itself
            # (autocast, dual tensors and transforms take the path below)
            o = _fast_step(self, q, k, v, scale)
            if o is not None:
                return o
        if _autocast_on(q):
            with torch.autocast(q.device.type, enabled=False):
                return self(q, k, v, scale=scale, return_lse=return_lse, q_offset=q_offset,
                            plan=plan, layout=layout, deterministic=deterministic,
                            order=order, **inputs)
        fast = fast and _runtime_api.other_device(q) is None     # a repeated decode step
        q, k, v = _plain_qkv(q, k, v)
        if inputs:
            inputs = _plain_inputs(inputs)
        if fast:
            o = _fast_routed(self, q, k, v, scale, inputs, q_offset)
            if o is not None:
                return o
        return _runtime_api.call_plain(self, q, k, v, scale=scale, return_lse=return_lse,
                                       q_offset=q_offset, inputs=inputs, plan=plan,
                                       layout=layout, deterministic=deterministic, order=order)

    def decode(self, q, k_cache, v_cache, *, seq_lens=None, page_table=None,
               scale: float | None = None, q_offset: int | None = None,
               return_lse: bool = False, check: bool = True, num_splits: int | None = None,
               **inputs):
        """One decode step: q ``[B, Hq, Lq, D]`` (``Lq <= 16``) against a KV cache.

        Contiguous cache: k_cache, v_cache ``[B, Hk, L, D]``, batch element ``b`` using its
        first ``seq_lens[b]`` keys (all ``L`` when None). Paged cache: pools
        ``[num_pages, page_size, Hk, D]`` and ``page_table`` ``[B, max_pages]``, with
        ``seq_lens`` required. Query row ``i`` sits at position ``seq_lens[b] - Lq + i``.
        ``check=False`` skips the host checks of ``seq_lens`` and ``page_table`` (no device
        synchronisation: CUDA graphs). ``num_splits``: splits of the keys on Triton (default:
        enough programs to fill the device). Inference only; a score's tables are passed by
        name like the inputs (``slope=...``). See ``docs/decode.md``.
        """
        if _autocast_on(q):
            with torch.autocast(q.device.type, enabled=False):
                return self.decode(q, k_cache, v_cache, seq_lens=seq_lens,
                                   page_table=page_table, scale=scale, q_offset=q_offset,
                                   return_lse=return_lse, check=check, num_splits=num_splits,
                                   **inputs)
        _check_keywords({**self.inputs, **self.score_inputs}, inputs)
        q, k_cache, v_cache = _plain_qkv(q, k_cache, v_cache)
        return _decode(self, q, k_cache, v_cache, seq_lens=_plain(seq_lens),
                       page_table=_plain(page_table), scale=scale, q_offset=q_offset,
                       return_lse=return_lse, check=check, num_splits=num_splits,
                       **_plain_inputs(inputs))

    def plan(self, q, k, v, *, scale: float | None = None, q_offset: int | None = None,
             backward: bool | None = None, layout: str | None = None, order=None,
             **inputs):
        """Everything a call with these tensors needs, resolved once: a
        :class:`spattn.runtime.plan.Plan` (shapes, positions, inputs, tables, configuration,
        compiled kernels). ``pat(q, k, v, plan=plan)`` then runs with no other host work.

        The plan is for tensors laid out like q ``[B, Hq, Lq, D]`` and k, v
        ``[B, Hk, Lk, D]`` (shapes, strides, dtype, device; ``layout="bshd"``: q
        ``[B, Lq, Hq, D]``, k, v ``[B, Lk, Hk, D]``, which the plan remembers) and holds the
        runtime ``inputs``; a score's float tables are given too, and the plan records their
        shapes and dtypes: each call passes its tables, ``pat(q, k, v, plan=plan, rel=rel)``
        (docs/backends.md, Scores). ``backward`` builds the backward's stage now (True), at
        the first backward (False), or now if q, k, v or a score's table requires grad
        (None). ``order``: a token order (as for a call), held by the plan (not with a
        score). ``repr(plan)`` says what it holds.
        """
        from .runtime.api import make_plan
        _check_keywords({**self.inputs, **self.score_inputs}, inputs)
        q, k, v = _plain_qkv(q, k, v)
        return make_plan(self, q, k, v, scale=scale, q_offset=q_offset,
                         inputs=_plain_inputs(inputs), backward=backward, layout=layout,
                         order=order)

    def kernel_source(self, *args, **options) -> str:
        """The generated Triton source of a kernel, in one of two forms.

        ``kernel_source(q, k, v, kind="fwd", **call)``: the module that a call with these
        tensors runs (``kind`` ``"fwd"`` or ``"bwd"``; ``call``: ``scale``, ``q_offset``,
        ``layout`` and runtime inputs, as for a call): a plan is built for them, so the
        dtype, head dim, strategy, tiles, warps, loop, TMA and 64-bit choice are the
        call's; a call of few queries that takes the decode route (docs/decode.md) shows
        the decode module it runs. CPU tensors that run the torch backend run no kernel
        (SpattnBackendError).

        ``kernel_source(kind="fwd", **options)``: the kernel of a configuration (``kind`` in
        fwd, bwd). ``options`` (all optional): ``head_dim`` (16..256, default 128),
        ``dtype`` (default bf16), ``strategy``, ``block_m``, ``block_n``, ``num_warps``,
        ``num_stages``, the backward's ``block_m1``, ``block_n1``, ``block_m2``,
        ``block_n2``, ``loop``, ``tma``, ``rows`` ("seq"; "table": rows addressed through
        a permuted plan's row tables; "box" with ``tma=True``, a forward: a token layout's
        boxes through 5-D TMA descriptors; docs/layouts.md), the backward's ``dq``
        ("kernel" or "atomic": docs/codegen.md), and with a score ``score_load``,
        ``score_index``, ``fast_tanh`` (docs/backends.md, Scores).
        """
        if args and isinstance(args[0], torch.Tensor):
            if len(args) != 3:
                raise SpattnParamError(f"kernel_source(q, k, v, ...) takes three tensors, got "
                                       f"{len(args)} positional arguments")
            from .runtime.usage import kernel_source_for
            return kernel_source_for(self, *args, **options)
        if len(args) > 1:
            raise SpattnParamError("kernel_source takes the kind ('fwd' or 'bwd') and keyword "
                                   "options, or the tensors q, k, v")
        kind = args[0] if args else options.pop("kind", "fwd")
        from .runtime.cache import kernel_text
        unknown = sorted(set(options) - set(KERNEL_OPTIONS))
        if unknown:
            raise SpattnParamError(f"unknown kernel option{'s' if len(unknown) > 1 else ''} "
                                   f"{', '.join(map(repr, unknown))}: expected "
                                   f"{', '.join(KERNEL_OPTIONS)}")
        for name in ("tma", "fast_tanh"):
            if options.get(name) is not None and not isinstance(options[name], bool):
                raise SpattnParamError(f"kernel option {name} must be True or False, got "
                                       f"{options[name]!r}")
        return kernel_text(self, kind, **options)

    @property
    def kernel_path(self) -> "os.PathLike":
        """Path of the generated forward kernel file in the cache directory (a
        :class:`SpattnCacheError` when no directory can be written and kernels are kept in
        memory)."""
        from .runtime.cache import kernel_file
        return kernel_file(self, "fwd")


def compile(src: str, *, score: str | None = None, backend: str = "auto",
            pattern: str | None = None, **params: Any) -> Pattern:
    """Compile a pattern from a bare expression or a program.

    ``compile("causal & window(W)", W=1024)``; keyword params bind ``param``
    declarations or free names of a bare expression (lists allowed; float params and
    lists serve scores). If a program defines several patterns, ``pattern="name"`` picks
    one. ``score``: a score modification of a bare expression, an expression of ``s``
    (the scaled score ``q·k * scale``) giving the new score, e.g.
    ``compile("causal", score="softcap(30.0)")`` (docs/language.md §13).
    """
    from .ir.lower import compile_source
    if not isinstance(src, str):
        raise SpattnError(f"compile() takes the pattern source as a str, got {type(src).__name__}")
    low = compile_source(src, params, pattern=pattern, score=score)
    warn_if_false(low.ir, low.name)
    return Pattern(low.ir, name=low.name, params=low.params, inputs=low.inputs, backend=backend,
                   score=low.score, score_inputs=low.score_inputs, grid=low.grid,
                   grid_offset=low.grid_offset, grid_suffix=low.grid_suffix)


#: The longest name a combined pattern takes from its operands (kernel and file names).
MAX_COMBINED_NAME = 64


def combine(op: str, a, b=None) -> Pattern:
    """``a & b``, ``a | b`` (``op`` ``"and"``, ``"or"``) or ``~a`` (``"not"``) of patterns.

    Either side may be a :class:`Pattern` or a pattern source str (compiled with no params).
    The result is the pattern whose mask is the operands' masks combined, with
    everything else a call needs carried over (docs/usage.md, "Combining patterns"):

    * runtime inputs: the union; an input of both sides is one input (the call passes it
      once), so it must have the same number of index dimensions and kind (int for a
      mask, float for a score) on both;
    * the score: the one side's that has one (two scores are refused: write one score of
      the combined mask with ``spattn.compile(..., score=)``);
    * the grid (``spattn.neighborhood``, a ``grid`` declaration): the one side's, or
      the same grid on both (shape and extra tokens); two different grids of one token
      count give the 1-D grid of that count (as the language's ``neighborhood(...)``
      builtins do), and of different counts are refused;
    * the backend: the side's that is not ``"auto"``; two different ones are refused;
    * params: the union, as a record (the values are already in the mask); a name bound
      to different values on the two sides is left out.
    """
    from .ir import build
    from .ir.lower import check_depth
    from .ir.printer import to_source
    operands = [_operand(x, op) for x in ((a,) if op == "not" else (a, b))]
    if op == "not":
        (x,) = operands
        ir, name = build.not_(x.ir), f"not_{x.name}"
    else:
        x, y = operands
        ir = (build.and_ if op == "and" else build.or_)(x.ir, y.ir)
        name = f"{x.name}_{op}_{y.name}"
    check_depth(ir, None)
    name = name[:MAX_COMBINED_NAME].rstrip("_")
    first = operands[0]
    grid, backend, score, params = _grid_of(first), first.backend, first, dict(first.params)
    grid_name = first.name
    inputs, score_inputs = dict(first.inputs), dict(first.score_inputs)
    for other in operands[1:]:
        sign = f"{first.name!r} {'&' if op == 'and' else '|'} {other.name!r}"
        if other.grid is not None:
            if grid[0] is None:
                grid, grid_name = _grid_of(other), other.name
            elif grid != _grid_of(other):
                if _grid_tokens(grid) != _grid_tokens(_grid_of(other)):
                    raise SpattnValueError(
                        f"{sign}: the patterns are on grids of different token counts, "
                        f"{_grid_text(grid, grid_name)} ({_grid_tokens(grid)} tokens) and "
                        f"{_grid_text(_grid_of(other), other.name)} "
                        f"({_grid_tokens(_grid_of(other))} tokens): a call has one length")
                grid = ((_grid_tokens(grid),), 0, 0)
        if other.backend != "auto":
            if backend not in ("auto", other.backend):
                raise SpattnParamError(f"{sign}: backend {backend!r} and backend "
                                       f"{other.backend!r}: compile one of them with the "
                                       "other's backend")
            backend = other.backend
        if other.score is not None:
            if score.score is not None:
                raise SpattnValueError(
                    f"{sign}: both patterns have a score ({to_source(score.score)} and "
                    f"{to_source(other.score)}): combine the masks, then give the "
                    "combined mask one score (a pattern of `true` with that score, "
                    "combined by &: mask & spattn.compile(\"true\", score=...))")
            score = other
        for n, v in other.params.items():
            if n in params and params[n] != v:
                params[n] = _CONFLICT
            elif n not in params:
                params[n] = v
        for kind, mine, theirs in (("int", inputs, other.inputs),
                                   ("float", score_inputs, other.score_inputs)):
            for n, dims in theirs.items():
                if n in mine and mine[n] != dims:
                    raise SpattnValueError(
                        f"{sign}: runtime input {n!r} is indexed by {mine[n]} "
                        f"{'index' if mine[n] == 1 else 'indices'} in one pattern and by "
                        f"{dims} in the other: rename one of them")
                mine[n] = dims
        clash = sorted(set(inputs) & set(score_inputs))
        if clash:
            raise SpattnValueError(f"{sign}: runtime input {clash[0]!r} is an int input of "
                                   "one pattern's mask and a float table of the other's "
                                   "score: rename one of them")
    params = {n: v for n, v in params.items() if v is not _CONFLICT}
    warn_if_false(ir, name)
    return Pattern(ir, name=name, params=params, inputs=inputs, backend=backend,
                   score=score.score, score_inputs=score_inputs, grid=grid[0],
                   grid_offset=grid[1], grid_suffix=grid[2])


_CONFLICT = object()


def _operand(x, op: str) -> Pattern:
    """A :func:`combine` operand as a Pattern (a str is compiled)."""
    if isinstance(x, Pattern):
        return x
    if isinstance(x, str):
        return compile(x)
    sym = {"and": "&", "or": "|", "not": "~"}[op]
    raise SpattnParamError(f"{sym} combines spattn patterns (a spattn.Pattern or a pattern "
                           f"source str), got {type(x).__name__} {short_repr(x)}")


def _grid_of(p) -> tuple:
    return p.grid, p.grid_offset, p.grid_suffix


def _grid_tokens(grid: tuple) -> int:
    shape, offset, suffix = grid
    return math.prod(shape) + offset + suffix


def _grid_text(grid: tuple, name: str) -> str:
    shape, offset, suffix = grid
    text = f"grid {shape}"
    if offset:
        text += f" after {offset}"
    if suffix:
        text += f" before {suffix}"
    return f"{text} of {name!r}"


def pattern_names(path) -> list[str]:
    """Names of the patterns a ``.spattn`` file defines, in order (``["pattern"]`` for a
    file holding a bare expression, the name :func:`load` gives it)."""
    from .dsl import ast
    from .dsl.parser import parse_source
    text = _read(path)
    program = parse_source(text, filename=os.fspath(path))
    if not isinstance(program, ast.Program):
        return ["pattern"]
    return [s.name for s in program.statements if isinstance(s, ast.PatternDef)]


def _read(path) -> str:
    """The text of a pattern file: a regular UTF-8 file (a FIFO or a device is never read)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise SpattnParamError(f"a pattern file is given by its path (a str or os.PathLike), "
                               f"got {type(path).__name__} {short_repr(path)}")
    name = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(name).st_mode):
            raise SpattnError(f"cannot read pattern file {name!r}: it is not a regular file")
        with open(name, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:   # ValueError: a NUL byte in the path
        why = getattr(e, "strerror", None) or str(e)
        raise SpattnError(f"cannot read pattern file {name!r}: {why}") from None
    try:
        return data.decode("utf-8-sig")         # (a byte-order mark some editors write)
    except UnicodeDecodeError as e:
        before = data[:e.start]
        line = before.count(b"\n") + 1
        column = e.start - (before.rfind(b"\n") + 1) + 1
        raise SpattnSyntaxError(f"the file is not UTF-8 text (byte 0x{data[e.start]:02x}): "
                                "save it as UTF-8", line=line, column=column,
                                filename=name) from None


def _ints(*values) -> tuple:
    """``values`` with numpy integers as ints, as ``q_offset`` takes them."""
    return tuple(map(_runtime_api.as_int, values))


def _mask_inputs(pattern, inputs: dict) -> dict:
    """The runtime inputs the mask reads: a score's float tables are dropped (the
    analyses of a pattern are those of its mask)."""
    return {n: t for n, t in inputs.items() if n not in pattern.score_inputs}


def _checked(pattern, Lq, Lk, q_offset, device, inputs):
    """``(q_offset, device)`` of an analysis method, checked like a call's; runtime inputs that
    the evaluation cannot take (meta, unsigned) are refused with a message saying so."""
    from .runtime.api import check_grid, check_q_offset, check_runtime_tensors
    check_grid(pattern, None, Lk, "the lengths")
    check_runtime_tensors(inputs)
    if q_offset is not None:
        q_offset = check_q_offset(q_offset, Lq, Lk)
    if device is None:              # the inputs' device, as a call computes on q's
        devices = {t.device for t in inputs.values() if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            where = ", ".join(sorted(map(str, devices)))
            raise SpattnValueError(f"the runtime inputs are on several devices ({where}): pass "
                                   "device= to say where to evaluate the pattern")
        device = devices.pop() if devices else None
    if device is not None:
        given = device
        try:
            device = torch.device(device)
            torch.empty(0, device=device)
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:
            raise SpattnValueError(f"device={short_repr(given)} cannot be used here "
                                   f"({str(e).splitlines()[0] if str(e) else type(e).__name__}):"
                                   " pass 'cpu', or 'cuda' where CUDA is available") from None
    return q_offset, device


#: How torch's allocators say that a tensor cannot be made (it raises a plain RuntimeError).
_ALLOC_FAILURES = ("can't allocate memory", "Storage size calculation overflowed",
                   "out of memory")


@contextlib.contextmanager
def _fits(what: str):
    """Allocation failures of an analysis asked for at a huge size, as a SpattnValueError."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError):
        raise SpattnValueError(f"{what} does not fit in memory: use smaller sizes") from None
    except RuntimeError as e:
        text = str(e)
        if not any(m in text for m in _ALLOC_FAILURES):
            raise
        raise SpattnValueError(f"{what} does not fit in memory ({text.splitlines()[0][:200]}): "
                               "use smaller sizes") from None


def load(path, *, pattern: str | None = None, backend: str = "auto", **params: Any) -> Pattern:
    """Compile the pattern of a ``.spattn`` file."""
    from .ir.lower import compile_source
    text = _read(path)
    low = compile_source(text, params, pattern=pattern, filename=os.fspath(path))
    warn_if_false(low.ir, low.name)
    return Pattern(low.ir, name=low.name, params=low.params, inputs=low.inputs, backend=backend,
                   score=low.score, score_inputs=low.score_inputs, grid=low.grid,
                   grid_offset=low.grid_offset, grid_suffix=low.grid_suffix)
