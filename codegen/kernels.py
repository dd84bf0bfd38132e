"""Kernel templates and rendering: a pattern -> the text of a Triton module.

``render(pattern, kind, config, closed_form=None) -> str`` produces a complete,
importable Python file, readable like hand-written code:

* a module docstring with the pattern's canonical source, the strategy, the
  tile sizes and the codegen version;
* ``kind="fwd"``: ``attn_fwd_<name>_<key6>`` (online softmax, output + lse);
* ``kind="bwd"``: ``attn_bwd_dq_<name>_<key6>`` (one program per query tile, like
  the forward; it also writes each row's delta = rowsum(dO * O) and log2-unit lse),
  launched first, then ``attn_bwd_dkdv_<name>_<key6>`` (one program per key tile
  and key head, looping over the query heads of its GQA group: deterministic, no
  atomics; scores in the transposed orientation, Q^T loaded through strides), each
  with its own tile shape (``BLOCK_M2 x BLOCK_N2`` and ``BLOCK_M1 x BLOCK_N1``).

Each tile loop lives in a small ``@triton.jit`` function (``_fwd_range`` ...)
called once per sub-range with ``MASKED`` as a constexpr: FULL tiles
(``MASKED=False``) never evaluate the predicate nor any bounds mask; PARTIAL
tiles evaluate the predicate emitted by :mod:`spattn.codegen.emit`.

Strategies (``config.strategy``):

``ranges``
    loop bounds come from the closed form of :func:`spattn.ir.ranges.closed_form`,
    computed in the kernel from the tile index (no metadata in memory).  Every
    interval ``[lo, hi]`` of keys becomes a span of key tiles, minus the spans of
    the earlier intervals (no tile is visited twice), split by its FULL part
    ``[flo, fhi]`` into masked / unmasked / masked sub-ranges.
``table``
    tables built by the vectorised analysis at call time (per query tile; the
    transposed ones for dK/dV), in one of two forms chosen at launch by the
    constexpr ``SPANS``: CSR lists (int32 row pointers + column indices) of the
    PARTIAL and of the FULL tiles, run as two loops with one index load per tile;
    or, where every row's tiles are one contiguous span with one contiguous FULL
    run (``causal & same(doc)`` with sorted ids), the span and its FULL run
    (4 int32 per row), run like a ranges interval piece.

Kernel arguments are runtime values wherever they can be: lengths, batch, heads,
``q_offset`` and strides never regenerate a file.
"""
from __future__ import annotations

import os
import re
import textwrap
import warnings
from dataclasses import dataclass

from ..ir import build as B
from ..ir.nodes import BoolConst, Node, Var
from .emit import HELPERS, NONNEG_VARS, emit

#: Version of the generated code: part of every cache key (bump when output changes).
CODEGEN_VERSION = "10"


# ------------------------------------------------------------------ helpers

def ident(name: str) -> str:
    """A safe Python identifier fragment from a pattern name."""
    s = re.sub(r"\W+", "_", name).strip("_") or "pattern"
    if s[0].isdigit():
        s = "p_" + s
    return s.lower()


def _ind(text: str, n: int) -> str:
    return textwrap.indent(text, " " * n) if text.strip() else ""


def _fill(template: str, **kw) -> str:
    out = template
    for k, v in kw.items():
        out = out.replace(f"@@{k}@@", str(v))
    left = re.findall(r"@@\w+@@", out)
    if left:
        raise KeyError(f"unfilled template markers: {left}")
    return out


@dataclass(frozen=True)
class Interval:
    """Local stand-in with the fields of ``ir.ranges.Interval`` (lo, hi, flo, fhi)."""
    lo: Node | None
    hi: Node | None
    flo: Node | None = None
    fhi: Node | None = None


def _names(pattern, key6: str) -> dict:
    base = f"{ident(pattern.name)}_{key6}"
    return {
        "fwd": f"attn_fwd_{base}",
        "dkdv": f"attn_bwd_dkdv_{base}",
        "dq": f"attn_bwd_dq_{base}",
        "fwd_range": f"_fwd_range_{key6}",
        "fwd_fused": f"_fwd_fused_{key6}",
        "dkdv_range": f"_dkdv_range_{key6}",
        "dkdv_fused": f"_dkdv_fused_{key6}",
        "dq_range": f"_dq_range_{key6}",
        "dq_fused": f"_dq_fused_{key6}",
    }


# --------------------------------------------------------- input arguments

def _input_params(inputs: dict[str, int]) -> list[str]:
    """Kernel parameters of the runtime inputs: pointer, batch/head strides, index strides, sizes."""
    out = []
    for name, nd in inputs.items():
        out.append(f"{name.upper()}_ptr")
        out.append(f"stride_{name}_b")
        out.append(f"stride_{name}_h")
        out += [f"stride_{name}_{d}" for d in range(nd)]
        out += [f"size_{name}_{d}" for d in range(nd)]
    return out


def _input_inner_args(inputs: dict[str, int]) -> list[str]:
    """What an inner function needs of the inputs: the offset base pointer, strides, sizes."""
    out = []
    for name, nd in inputs.items():
        out.append(f"p_{name}")
        out += [f"stride_{name}_{d}" for d in range(nd)]
        out += [f"size_{name}_{d}" for d in range(nd)]
    return out


def _input_bases(inputs: dict[str, int], b: str, h: str) -> str:
    lines = []
    for name in inputs:
        lines.append(f"p_{name} = {name.upper()}_ptr + {b}.to(tl.int64) * stride_{name}_b"
                     f" + {h}.to(tl.int64) * stride_{name}_h")
    return "\n".join(lines)


ENV = {"q": "o_q", "k": "o_k", "h": "i_h", "b": "i_b", "Lq": "Lq", "Lk": "Lk", "H": "H"}


def _predicate(pattern, loop_var: str):
    """Emitted predicate code, split into hoisted (outer) and per-tile (inner) parts."""
    ir = pattern.ir
    if isinstance(ir, BoolConst):
        if ir.value:
            return None
        # never allowed: a predicate of False (kept for completeness)
    em = emit([ir], ENV, loop_vars=[loop_var], result_names=["m_pattern"])
    return em


def _closed_form_code(intervals, env: dict, prefix: str, tag: str, nonneg_extra=()):
    """Emit lo/hi/flo/fhi of every interval as scalar code; returns (lines, names, helpers)."""
    roots, names = [], []
    for c, iv in enumerate(intervals):
        for field in ("lo", "hi", "flo", "fhi"):
            node = getattr(iv, field, None)
            if node is None:
                continue
            roots.append(node)
            names.append(f"{prefix}{c}_{field}")
    em = emit(roots, env, loop_vars=(), result_names=names, prefix=f"{prefix}_",
              nonneg_vars=NONNEG_VARS | frozenset(nonneg_extra))
    lines = list(em.outer)
    for r, nm in zip(em.results, names):
        if r != nm:
            lines.append(f"{nm} = {r}")
    return lines, set(names), em.uses_helpers


def merged_pieces(intervals) -> int:
    """Pieces a ranges schedule visits in one merged loop (:func:`_range_schedule`'s
    ``merged_call``): interval ``c`` minus the ``c`` before it is ``2**c`` pieces; 0 where
    the schedule keeps one loop per piece (a single interval, or more than
    :data:`MERGE_INTERVALS`)."""
    n = len(intervals)
    return 2 ** n - 1 if 1 < n <= MERGE_INTERVALS else 0


#: Unions of up to this many intervals run their pieces in one forward loop (fused): each
#: step picks its piece's tile and FULL range with three scalar selects per further piece.
MERGE_INTERVALS = 3


def _range_schedule(intervals, *, prefix: str, length: str, block: str, shift: str,
                    call: str, comment_unit: str, fused_call: str | None = None,
                    merged_call: str | None = None) -> str:
    """Code visiting the tiles of a union of intervals, each tile once.

    ``shift`` converts positions to row indices (``q_offset`` for queries, ``0`` for keys).
    ``call`` is a template with ``{start}``, ``{end}``, ``{masked}``: three calls per piece
    (PARTIAL, FULL, PARTIAL sub-ranges from ``_split``).  With ``fused_call`` (a template
    with ``{start}``, ``{end}``, ``{full_start}``, ``{full_end}``) each piece is one call
    over its whole span, the FULL tiles being ``[f<c>, g<c>)``.  With ``merged_call``
    instead (a template with ``{pieces}``; the caller passes it where
    :func:`merged_pieces` is non-zero) all pieces are one call: one software pipeline
    instead of one per piece.
    """
    lines = []
    spans = []
    merge = merged_call is not None
    merged = []
    sub = "" if shift == "0" else f" - {shift}"
    for c, iv in enumerate(intervals):
        lo = f"{prefix}{c}_lo{sub}" if iv.lo is not None else "0"
        hi = f"{prefix}{c}_hi{sub}" if iv.hi is not None else f"{length} - 1"
        lines.append(f"# interval {c}: {comment_unit} [lo, hi] -> tiles [s{c}, e{c})")
        lines.append(f"s{c}, e{c} = _tile_span({lo}, {hi}, {length}, {block})")
        if iv.flo is not None and iv.fhi is not None:
            lines.append(f"f{c}, g{c} = _full_span({prefix}{c}_flo{sub}, {prefix}{c}_fhi{sub}, "
                         f"{length}, {block})")
        else:
            lines.append(f"f{c}, g{c} = e{c}, e{c}  # no FULL part")
        pieces = [(f"s{c}", f"e{c}")]
        for e, (se, ee) in enumerate(spans):
            nxt = []
            for a, z in pieces:
                nxt.append((a, f"tl.minimum({z}, {se})"))
                nxt.append((f"tl.maximum({a}, {ee})", z))
            pieces = nxt
        if len(pieces) > 1:
            lines.append(f"# minus the tiles of interval{'s' if c > 1 else ''} "
                         f"{', '.join(str(x) for x in range(c))}: {len(pieces)} pieces")
        for p, (a, z) in enumerate(pieces):
            tag = f"{c}{chr(ord('a') + p)}" if len(pieces) > 1 else f"{c}"
            if len(pieces) > 1:
                lines.append(f"ps, pe = {a}, {z}")
                a, z = "ps", "pe"
            if merge:
                n = len(merged)
                lines.append(f"# {tag}: tiles [{a}, {z}), FULL where in [f{c}, g{c})")
                lines.append(f"pa{n}, pz{n}, pf{n}, pg{n} = {a}, {z}, f{c}, g{c}")
                merged.append(f"pa{n}, pz{n}, pf{n}, pg{n}")
                continue
            if fused_call is not None:
                lines.append(f"# {tag}: tiles [{a}, {z}) in one loop, FULL where in [f{c}, g{c})")
                lines.append(fused_call.format(start=a, end=z, full_start=f"f{c}",
                                               full_end=f"g{c}"))
                continue
            lines.append(f"m0, m1 = _split({a}, {z}, f{c}, g{c})")
            lines.append(f"# {tag}: PARTIAL tiles [{a}, m0), FULL tiles [m0, m1), PARTIAL [m1, {z})")
            lines.append(call.format(start=a, end="m0", masked="True"))
            lines.append(call.format(start="m0", end="m1", masked="False"))
            lines.append(call.format(start="m1", end=z, masked="True"))
        spans.append((f"s{c}", f"e{c}"))
    if merge:
        lines.append(f"# the {len(merged)} pieces in one loop")
        lines.append(merged_call.format(pieces=", ".join(merged)))
    return "\n".join(lines)


def _merged_loop(fused_fn: str, n: int) -> str:
    """The fused tile loop (text of ``FWD_FUSED`` or its TMA form) over ``n`` pieces: step
    ``idx`` of ``[0, n<n-1>)`` runs tile ``pa<p> + idx - n<p-1>`` of the piece ``p`` it falls
    in (``n<p>``: tiles of pieces 0..p) with that piece's FULL range; empty pieces take no
    steps."""
    sig = "    start, end, full_start, full_end,\n"
    loop = "    for i_n in range(start, end):\n"
    first = "Key tiles [start, end) of one query tile in one loop (one pipeline fill)."
    if any(fused_fn.count(t) != 1 for t in (sig, loop, first)):
        raise AssertionError("merged loop: the fused template changed")
    params = "".join(f"    pa{p}, pz{p}, pf{p}, pg{p},\n" for p in range(n))
    head = [f"    n{p} = {'' if p == 0 else f'n{p - 1} + '}tl.maximum(pz{p} - pa{p}, 0)"
            for p in range(n)]
    body = head + [f"    for idx in range(0, n{n - 1}):",
                   "        i_n, full_start, full_end = pa0 + idx, pf0, pg0"]
    for p in range(1, n):
        body += [f"        past = idx >= n{p - 1}",
                 f"        i_n = tl.where(past, pa{p} + (idx - n{p - 1}), i_n)",
                 f"        full_start = tl.where(past, pf{p}, full_start)",
                 f"        full_end = tl.where(past, pg{p}, full_end)"]
    text = fused_fn.replace(sig, params).replace(loop, "\n".join(body) + "\n")
    return text.replace(first, f"Key tiles of {n} pieces [pa, pz) of one query tile in one loop "
                               "(one pipeline fill).")


RANGE_HELPERS = '''
@triton.jit
def _tile_span(lo, hi, L, BLOCK: tl.constexpr):
    """Tiles [first, end) covering the positions [lo, hi] clamped to [0, L - 1]."""
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, L - 1)
    first = lo // BLOCK
    end = tl.where(hi >= lo, hi // BLOCK + 1, first)
    return first, end


@triton.jit
def _full_span(lo, hi, L, BLOCK: tl.constexpr):
    """Tiles [first, end) lying entirely inside [lo, hi] and [0, L - 1] (no bounds mask needed)."""
    lo = tl.maximum(lo, 0)
    hi = tl.minimum(hi, L - 1)
    first = (lo + BLOCK - 1) // BLOCK
    end = tl.where(hi >= lo, (hi + 1) // BLOCK, first)
    return first, tl.maximum(end, first)


@triton.jit
def _split(start, end, full_start, full_end):
    """Cut [start, end) into [start, m0) PARTIAL, [m0, m1) FULL, [m1, end) PARTIAL."""
    m0 = tl.minimum(tl.maximum(full_start, start), end)
    m1 = tl.minimum(tl.maximum(full_end, m0), end)
    return m0, m1
'''


def _tiles_doc(kind: str, config) -> str:
    if kind == "fwd":
        return (f"Tiles: BLOCK_M={config.block_m} (queries), BLOCK_N={config.block_n} (keys), "
                f"BLOCK_D={config.block_d}")
    return (f"Tiles: dK/dV BLOCK_N1={config.block_n} keys per program x BLOCK_M1={config.block_m} "
            f"queries per step;\n       dQ BLOCK_M2={config.block_m2} queries per program x "
            f"BLOCK_N2={config.block_n2} keys per step; BLOCK_D={config.block_d}")


def _tiles_consts(kind: str, config) -> str:
    if kind == "fwd":
        return f"BLOCK_M = {config.block_m}\nBLOCK_N = {config.block_n}"
    return (f"BLOCK_M1 = {config.block_m}\nBLOCK_N1 = {config.block_n}\n"
            f"BLOCK_M2 = {config.block_m2}\nBLOCK_N2 = {config.block_n2}")


def _header(pattern, kind: str, config, key: str, names: dict, strategy_doc: str,
            merged: int = 0) -> str:
    src = "\n".join("    " + line for line in pattern.source.splitlines())
    kernels = [names["fwd"]] if kind == "fwd" else [names["dkdv"], names["dq"]]
    inputs = ", ".join(f"{n} ({d}-D index)" for n, d in pattern.inputs.items()) or "none"
    loop_doc = ""
    piece = "interval piece" if config.strategy == "ranges" else "span"
    one_loop = f"one loop per {piece}"
    if merged:
        one_loop = f"one loop over all {merged} interval pieces"
    if kind == "fwd" and config.loop == "fused":
        loop_doc = (f"\nForward loop: fused ({one_loop}, "
                    "predicate only on PARTIAL tiles)")
    elif kind == "bwd" and config.loop == "fused":
        loop_doc = (f"\nBackward loops: fused (dK/dV and dQ: one loop per {piece}, "
                    "predicate only on PARTIAL tiles)")
    elif kind == "fwd" and config.loop == "persistent":
        loop_doc = ("\nForward loop: persistent (each program loops over query tiles, "
                    f"fused key loops: {one_loop})")
    if config.tma:
        which = "Q, K, V, O" if kind == "fwd" else "Q, K, V, dO, dK, dV, dQ"
        loop_doc += (f"\nLoads: TMA tensor descriptors for {which} (block [1, 1, rows, BLOCK_D]; "
                     "the stride\n       arguments are unused)")
    return f'''"""spattn generated {"forward" if kind == "fwd" else "backward"} attention kernel{"s" if kind != "fwd" else ""} for pattern `{pattern.name}`.

Pattern (canonical source):
{src}

Runtime inputs: {inputs}
Strategy: {config.strategy} ({strategy_doc})
{_tiles_doc(kind, config)}
Launch: num_warps={config.num_warps}, num_stages={config.num_stages}, dtype={config.dtype}
Kernels: {", ".join(kernels)}
Codegen version: {CODEGEN_VERSION}; cache key {key}{loop_doc}

Generated by spattn.codegen.kernels: edit the pattern, not this file (the cache
regenerates it when it does not match its key).
"""
import triton
import triton.language as tl

STRATEGY = {config.strategy!r}
{_tiles_consts(kind, config)}
BLOCK_D = {config.block_d}
NUM_WARPS = {config.num_warps}
NUM_STAGES = {config.num_stages}
INPUTS = {dict(pattern.inputs)!r}
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
'''


STRATEGY_DOC = {
    "ranges": "closed-form key ranges computed in the kernel from the tile index",
    "table": "tile spans or CSR lists of PARTIAL and FULL tiles, built by the analysis "
             "at call time",
}


# ------------------------------------------------------------------ forward

FWD_RANGE = '''
@triton.jit
def @@FN@@(
    acc, l_i, m_i, b_q, o_q,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    sm_scale_log2, i_b, i_h, Lq, Lk, H,@@EXTRA@@
    COLS, start, end,
    MASKED: tl.constexpr, TABLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Key tiles [start, end) (tile indices, or CSR slots when TABLE) of one query tile."""
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    for idx in range(start, end):
        if TABLE:
            i_n = tl.load(COLS + idx)
        else:
            i_n = idx
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        p_kt = K + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
        p_v = V + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd
        # -- scores --
        if MASKED:
            b_kt = tl.load(p_kt, mask=m_d[:, None] & (o_n[None, :] < Lk), other=0.0)
        elif HEAD_DIM == BLOCK_D:
            b_kt = tl.load(p_kt)
        else:
            b_kt = tl.load(p_kt, mask=m_d[:, None], other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PREC)      # unscaled: see below
        if MASKED:
            # -- predicate (PARTIAL tile) --
            o_k = o_n[None, :]
@@PRED@@
            b_s = tl.where(m_pattern & (o_k < Lk), b_s, float("-inf"))
        # -- online softmax --
        # log2 units; the scale (> 0) is applied to the row max and in one FMA per score
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * sm_scale_log2)
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # fully masked so far: no NaN
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)
        b_p = tl.math.exp2(b_s * sm_scale_log2 - m_use[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            b_v = tl.load(p_v, mask=(o_n[:, None] < Lk) & m_d[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            b_v = tl.load(p_v)
        else:
            b_v = tl.load(p_v, mask=m_d[None, :], other=0.0)
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i
'''

FWD_FUSED = '''
@triton.jit
def @@FN@@(
    acc, l_i, m_i, b_q, o_q,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    sm_scale_log2, i_b, i_h, Lq, Lk, H,@@EXTRA@@
    start, end, full_start, full_end,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Key tiles [start, end) of one query tile in one loop (one pipeline fill).

    Tiles in [full_start, full_end) are FULL: the uniform flag `partial` skips the
    predicate for them; the others evaluate the predicate and k < Lk.  Loads and dots
    stay outside the branch, so the pipeliner prefetches across FULL and PARTIAL tiles
    alike.  Loads are always bounds-masked (every lane true but on the ragged last tile,
    which _full_span never counts FULL, so its scores also get k < Lk in the branch).
    (Tried on an H200: unmasked body loop + a masked call for the ragged tile was slower,
    the extra call per piece costing more than the masks.)
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    for i_n in range(start, end):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < Lk
        p_kt = K + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
        p_v = V + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd
        # -- scores --
        if HEAD_DIM == BLOCK_D:
            b_kt = tl.load(p_kt, mask=m_n[None, :], other=0.0)
        else:
            b_kt = tl.load(p_kt, mask=m_d[:, None] & m_n[None, :], other=0.0)
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PREC)      # unscaled: see below
        partial = (i_n < full_start) | (i_n >= full_end)
        if partial:
            # -- predicate (PARTIAL tile) --
            o_k = o_n[None, :]
@@PRED@@
            b_s = tl.where(m_pattern & (o_k < Lk), b_s, float("-inf"))
        # -- online softmax --
        # log2 units; the scale (> 0) is applied to the row max and in one FMA per score
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * sm_scale_log2)
        # always guarded (any tile may be PARTIAL): a row masked so far keeps m = -inf, no NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        b_p = tl.math.exp2(b_s * sm_scale_log2 - m_use[:, None])
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None]
        if HEAD_DIM == BLOCK_D:
            b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)
        else:
            b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i
'''

FWD_KERNEL = '''
@triton.jit
def @@FN@@(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,@@INPUT_PARAMS@@@@TABLE_PARAMS@@
    ORDER,
    sm_scale_log2, H, GROUP, Lq, Lk, q_offset,@@PERSIST_PARAMS@@
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,@@TABLE_CONSTS@@
):
    """@@DOC@@
    Output O [B, H, Lq, D] and the natural log-sum-exp LSE [B, H, Lq] (fp32,
    contiguous); a fully masked row gives O = 0 and LSE = -inf.
    """
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
@@BODY@@
'''

FWD_BODY = '''    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < Lq
    m_d = o_d < HEAD_DIM
    o_q = (o_m + q_offset)[:, None]          # query positions [BLOCK_M, 1]
    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh \\
        + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_kh.to(tl.int64) * stride_vh
@@INPUT_BASES@@
@@HOIST@@
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

@@SCHEDULE@@

    # epilogue
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh \\
        + o_m[:, None] * stride_om + o_d[None, :] * stride_od
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh.to(tl.int64) * Lq + o_m, lse, mask=m_m)
'''

FWD_DOC = """Forward attention for one query tile of one (batch, query head).

    Grid: (B * H * n_m,) for n_m query tiles; program i runs work item ORDER[i] =
    (batch * H + head) * n_m + query tile.  ORDER is heavy-first across the grid
    and, among tiles of about the same work, head by head: the programs resident
    together are mostly neighbouring tiles of one head, which read the same keys."""

FWD_PROLOGUE = '''    n_m = tl.cdiv(Lq, BLOCK_M)
    i_w = tl.load(ORDER + tl.program_id(0))
    i_bh = i_w // n_m
    i_b = i_bh // H
    i_h = i_bh % H
    i_kh = i_h // GROUP
    i_m = i_w % n_m

'''

FWD_PERSISTENT_DOC = """Persistent forward attention: each program loops over query tiles.

    Grid: (P,) with P <= N_WORK = B * H * (number of query tiles), about as many
    programs as fit on the device at once.  Program p runs the work items
    ORDER[p], ORDER[p + P], ... (the ORDER of the non-persistent grid, with
    N_WORK = BH * n_m items, BH = B * H).  The work-item loop is flattened with the
    key loop: the pipeliner can load the next item's first keys during this item's
    epilogue."""

FWD_PERSISTENT_PROLOGUE = '''    for i_p in tl.range(tl.program_id(0), N_WORK, tl.num_programs(0), flatten=True):
        i_w = tl.load(ORDER + i_p)
        i_bh = i_w // (N_WORK // BH)
        i_b = i_bh // H
        i_h = i_bh % H
        i_kh = i_h // GROUP
        i_m = i_w % (N_WORK // BH)

'''

TABLE_PARAMS = """
    ROWS_P, COLS_P, ROWS_F, COLS_F, SPAN, stride_tab_b, stride_tab_h,"""
TABLE_CONSTS = """
    SPANS: tl.constexpr,"""


def _table_schedule(call: str, tile: str, what: str, *, transposed: bool = False,
                    fused_call: str | None = None) -> list[str]:
    """Lines that find one tile's row of the table and run its tiles.

    ``SPANS`` (a launch constexpr): the row is a span ``[lo, hi)`` of tiles with its FULL
    run ``[flo, fhi)``, visited by tile index like the ranges strategy (one ``fused_call``
    or three calls); else its CSR lists: the PARTIAL tiles, then the FULL tiles."""
    unit = "query" if transposed else "key"
    direct = call.replace("@@COLS@@", "ORDER").replace("@@TABLE@@", "False")
    listed = call.replace("@@TABLE@@", "True")
    lines = [f"# -- {'transposed ' if transposed else ''}tile table: {what} --",
             f"i_row = i_b * stride_tab_b + i_h * stride_tab_h + {tile}",
             "if SPANS:",
             f"    # {unit} tiles [i_lo, i_hi) in order, FULL in [i_flo, i_fhi): no index loads",
             "    i_lo = tl.load(SPAN + 4 * i_row)",
             "    i_hi = tl.load(SPAN + 4 * i_row + 1)",
             "    i_flo = tl.load(SPAN + 4 * i_row + 2)",
             "    i_fhi = tl.load(SPAN + 4 * i_row + 3)"]
    if fused_call is not None:
        lines.append("    " + fused_call.format(start="i_lo", end="i_hi", full_start="i_flo",
                                                full_end="i_fhi"))
    else:
        lines += ["    " + direct.format(start="i_lo", end="i_flo", masked="True"),
                  "    " + direct.format(start="i_flo", end="i_fhi", masked="False"),
                  "    " + direct.format(start="i_fhi", end="i_hi", masked="True")]
    lines += ["else:",
              "    p_start = tl.load(ROWS_P + i_row)",
              "    p_end = tl.load(ROWS_P + i_row + 1)",
              "    " + listed.replace("@@COLS@@", "COLS_P")
              .format(start="p_start", end="p_end", masked="True"),
              "    f_start = tl.load(ROWS_F + i_row)",
              "    f_end = tl.load(ROWS_F + i_row + 1)",
              "    " + listed.replace("@@COLS@@", "COLS_F")
              .format(start="f_start", end="f_end", masked="False")]
    return lines


def _extra_args(em, inputs) -> tuple[str, str]:
    """(parameter text, argument text) of an inner function: inputs and hoisted names."""
    names = _input_inner_args(inputs) + (list(em.outer_names) if em is not None else [])
    if not names:
        return "", ""
    text = "\n    " + ", ".join(names) + ","
    return text, ", ".join(names) + ", "


def _inner_fns(fused_tpl: str, range_tpl: str, fused_name: str, range_name: str, config,
               extra: str, pred: str, *, fused: bool) -> str:
    """The tile-loop function(s) a kernel calls: the fused loop (``fused``) and/or the
    per-sub-range loop (split schedules and the table's CSR lists)."""
    out = []
    if fused:
        out.append(_fill(fused_tpl, FN=fused_name, EXTRA=extra, PRED=pred))
    if not fused or config.strategy == "table":
        out.append(_fill(range_tpl, FN=range_name, EXTRA=extra, PRED=pred))
    return "\n".join(out)


def render_fwd(pattern, config, key: str, closed_form=None) -> str:
    names = _names(pattern, key[:6])
    inputs = dict(pattern.inputs)
    em = _predicate(pattern, "k")
    pred_code = _ind("\n".join(em.inner), 12) if em is not None else ""
    if em is None:
        pred_code = " " * 12 + "m_pattern = True"
    extra_params, extra_args = _extra_args(em, inputs)
    helpers = bool(em is not None and em.uses_helpers)

    kv = "K, V, i_kh, " if config.tma else _PTR_KV_ARGS
    call = (f"acc, l_i, m_i = {names['fwd_range']}(acc, l_i, m_i, b_q, o_q, {kv}"
            f"sm_scale_log2, i_b, i_h, Lq, Lk, H, "
            f"{extra_args}@@COLS@@, {{start}}, {{end}}, MASKED={{masked}}, TABLE=@@TABLE@@, "
            f"BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM, DOT_PREC=DOT_PREC)")
    persistent = config.loop == "persistent"
    fused = config.loop in ("fused", "persistent")
    fc, n_merged = None, 0
    if fused:
        fc = (f"acc, l_i, m_i = {names['fwd_fused']}(acc, l_i, m_i, b_q, o_q, {kv}"
              f"sm_scale_log2, i_b, i_h, Lq, Lk, H, {extra_args}{{start}}, {{end}}, "
              f"{{full_start}}, {{full_end}}, "
              f"BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM, DOT_PREC=DOT_PREC)")
    if config.strategy == "ranges":
        rows = closed_form.rows
        env = dict(ENV, qs="qs", qe="qe")
        cf_lines, _, h2 = _closed_form_code(rows, env, "r", "rows")
        helpers = helpers or h2
        sched = ["# -- key-tile ranges (closed form over this tile's first/last query position) --",
                 "qs = i_m * BLOCK_M + q_offset",
                 "qe = tl.minimum(i_m * BLOCK_M + BLOCK_M, Lq) - 1 + q_offset"]
        sched += cf_lines
        c = call.replace("@@COLS@@", "ORDER").replace("@@TABLE@@", "False")
        n_merged = merged_pieces(rows) if fused else 0
        mc = fc.replace("{start}, {end}, {full_start}, {full_end}", "{pieces}") if n_merged else None
        sched.append(_range_schedule(rows, prefix="r", length="Lk", block="BLOCK_N", shift="0",
                                     call=c, comment_unit="keys", fused_call=fc,
                                     merged_call=mc))
        schedule = _ind("\n".join(sched), 4)
        table_params = ""
    else:
        sched = _table_schedule(call, "i_m", "PARTIAL key tiles (predicate), then FULL key "
                                "tiles (none)", fused_call=fc)
        schedule = _ind("\n".join(sched), 4)
        table_params = TABLE_PARAMS

    tma = config.tma
    fused_tpl = FWD_FUSED_TMA if tma else FWD_FUSED
    if n_merged:
        fused_tpl = _merged_loop(fused_tpl, n_merged)
    inner_fn = _inner_fns(fused_tpl, FWD_RANGE_TMA if tma else FWD_RANGE, names["fwd_fused"],
                          names["fwd_range"], config, extra_params, pred_code, fused=fused)
    hoist = ""
    if em is not None and em.outer:
        hoist = _ind("# -- predicate terms that do not depend on k: once per program --\n"
                     + "\n".join(em.outer), 4)
    ip = _input_params(inputs)
    body = _fill(FWD_BODY_TMA if tma else FWD_BODY,
                 INPUT_BASES=_ind(_input_bases(inputs, "i_b", "i_h"), 4),
                 HOIST=hoist, SCHEDULE=schedule)
    if persistent:
        body = FWD_PERSISTENT_PROLOGUE + _ind(body, 4)
        doc, persist_params = FWD_PERSISTENT_DOC, "\n    BH, N_WORK,"
    else:
        body = FWD_PROLOGUE + body
        doc, persist_params = FWD_DOC, ""
    kernel = _fill(FWD_KERNEL, FN=names["fwd"],
                   INPUT_PARAMS=("\n    " + ", ".join(ip) + ",") if ip else "",
                   TABLE_PARAMS=table_params, PERSIST_PARAMS=persist_params, DOC=doc,
                   TABLE_CONSTS=TABLE_CONSTS if config.strategy == "table" else "", BODY=body)
    parts = [_header(pattern, "fwd", config, key, names, STRATEGY_DOC[config.strategy],
                     merged=n_merged)]
    if helpers:
        parts.append(HELPERS)
    if config.strategy == "ranges":
        parts.append(RANGE_HELPERS)
    parts.append(inner_fn)
    parts.append(kernel)
    parts.append(f"\nKERNEL = {names['fwd']}\n")
    return _tidy("\n".join(parts))


def _wrap_call(line: str, width: int = 100) -> list[str]:
    """Break a long ``lhs = f(a, b, ...)`` line after commas, aligned under the paren."""
    if len(line) <= width or "(" not in line or not line.rstrip().endswith(")"):
        return [line]
    indent = len(line) - len(line.lstrip())
    open_at = line.index("(")
    head, args = line[:open_at + 1], line[open_at + 1:-1]
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch == "," and depth == 0:
            parts.append(cur.strip() + ",")
            cur = ""
            continue
        depth += ch in "([{"
        depth -= ch in ")]}"
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    pad = " " * (indent + 4)
    out, cur = [head], pad
    for p in parts:
        if len(cur) + len(p) + 1 > width and cur.strip():
            out.append(cur.rstrip())
            cur = pad
        cur += p + " "
    out.append(cur.rstrip())
    out[-1] += ")"
    return out


def _tidy(text: str) -> str:
    lines = []
    for line in text.splitlines():
        lines += _wrap_call(line.rstrip())
    out = []
    for i, line in enumerate(lines):
        if line == "" and out and out[-1] == "":
            nxt = next((x for x in lines[i:] if x), "")
            # two blank lines between top-level definitions, one inside a function
            if nxt[:1] in (" ", ")") or (len(out) >= 2 and out[-2] == ""):
                continue
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


# ----------------------------------------------------------------- backward

DKDV_RANGE = '''
@triton.jit
def @@FN@@(
    b_dk, b_dv, b_k, b_v, o_k,
    Q, DO, LSE2, DELTA, stride_qm, stride_qd, stride_dom, stride_dod,
    sm_scale_log2, i_b, i_h, Lq, Lk, H, q_offset,@@EXTRA@@
    COLS, start, end,
    MASKED: tl.constexpr, TABLE: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Query tiles [start, end) (tile indices, or CSR slots when TABLE) of one key tile.

    Transposed orientation (FlashAttention-2): scores are [BLOCK_N1 keys, BLOCK_M1
    queries], so dV += P^T dO and dK += dS^T Q need no transpose of a computed tile;
    Q^T is loaded transposed through its strides.
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    for idx in range(start, end):
        if TABLE:
            i_m = tl.load(COLS + idx)
        else:
            i_m = idx
        o_m = i_m * BLOCK_M1 + tl.arange(0, BLOCK_M1)
        p_qt = Q + o_m[None, :] * stride_qm + o_d[:, None] * stride_qd       # [BLOCK_D, BLOCK_M1]
        p_do = DO + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod     # [BLOCK_M1, BLOCK_D]
        if MASKED:
            m_m = o_m < Lq
            b_qt = tl.load(p_qt, mask=m_d[:, None] & m_m[None, :], other=0.0)
            b_do = tl.load(p_do, mask=m_m[:, None] & m_d[None, :], other=0.0)
            # rows beyond Lq: lse = +inf -> p = 0 (fully masked rows arrive as +inf too)
            b_lse = tl.load(LSE2 + o_m, mask=m_m, other=float("inf"))
            b_delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)
        else:
            if HEAD_DIM == BLOCK_D:
                b_qt = tl.load(p_qt)
                b_do = tl.load(p_do)
            else:
                b_qt = tl.load(p_qt, mask=m_d[:, None], other=0.0)
                b_do = tl.load(p_do, mask=m_d[None, :], other=0.0)
            b_lse = tl.load(LSE2 + o_m)
            b_delta = tl.load(DELTA + o_m)
        # -- scores (transposed: keys x queries) --
        b_qkt = tl.dot(b_k, b_qt, input_precision=DOT_PREC)
        b_pt = tl.math.exp2(b_qkt * sm_scale_log2 - b_lse[None, :])
        if MASKED:
            # -- predicate (PARTIAL tile) --
            o_q = (o_m + q_offset)[None, :]      # query positions [1, BLOCK_M1]
@@PRED@@
            b_pt = tl.where(m_pattern & (o_k < Lk), b_pt, 0.0)
        # -- gradients --
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), b_dk, input_precision=DOT_PREC)
    return b_dk, b_dv
'''

DKDV_FUSED = '''
@triton.jit
def @@FN@@(
    b_dk, b_dv, b_k, b_v, o_k,
    Q, DO, LSE2, DELTA, stride_qm, stride_qd, stride_dom, stride_dod,
    sm_scale_log2, i_b, i_h, Lq, Lk, H, q_offset,@@EXTRA@@
    start, end, full_start, full_end,
    BLOCK_M1: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Query tiles [start, end) of one key tile in one loop (one pipeline fill).

    Tiles in [full_start, full_end) are FULL: the uniform flag `partial` skips the
    predicate for them.  Loads stay outside the branch and are always bounds-masked
    (rows beyond Lq: lse = +inf, so p = 0).
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    for i_m in range(start, end):
        o_m = i_m * BLOCK_M1 + tl.arange(0, BLOCK_M1)
        m_m = o_m < Lq
        p_qt = Q + o_m[None, :] * stride_qm + o_d[:, None] * stride_qd       # [BLOCK_D, BLOCK_M1]
        p_do = DO + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod     # [BLOCK_M1, BLOCK_D]
        b_qt = tl.load(p_qt, mask=m_d[:, None] & m_m[None, :], other=0.0)
        b_do = tl.load(p_do, mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_lse = tl.load(LSE2 + o_m, mask=m_m, other=float("inf"))
        b_delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)
        # -- scores (transposed: keys x queries) --
        b_qkt = tl.dot(b_k, b_qt, input_precision=DOT_PREC)
        b_pt = tl.math.exp2(b_qkt * sm_scale_log2 - b_lse[None, :])
        partial = (i_m < full_start) | (i_m >= full_end)
        if partial:
            # -- predicate (PARTIAL tile) --
            o_q = (o_m + q_offset)[None, :]      # query positions [1, BLOCK_M1]
@@PRED@@
            b_pt = tl.where(m_pattern & (o_k < Lk), b_pt, 0.0)
        # -- gradients --
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), b_dk, input_precision=DOT_PREC)
    return b_dk, b_dv
'''

DKDV_KERNEL = '''
@triton.jit
def @@FN@@(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,@@INPUT_PARAMS@@@@TABLE_PARAMS@@
    ORDER,
    sm_scale, sm_scale_log2, H, HK, GROUP, Lq, Lk, q_offset,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,@@TABLE_CONSTS@@
):
    """dK, dV of one key tile (BLOCK_N1 keys) of one (batch, key head).

    Grid: (B * HK * n_n,) for n_n key tiles; program i runs work item ORDER[i] =
    (batch * HK + key head) * n_n + key tile, heavy-first as in the forward.  K and V of the tile stay in
    registers; the program loops over the GROUP query heads that share this key head
    (GQA) and, for each, over the query tiles (BLOCK_M1 queries) that see this key
    tile: gradients are summed in registers and stored once (deterministic: each
    element of dK, dV is written by exactly one program).
    LSE is [B, H, Lq] fp32 in log2 units with fully masked rows at +inf; DELTA is
    [B, H, Lq] fp32.
    """
    tl.static_assert(BLOCK_M1 % 16 == 0)
    tl.static_assert(BLOCK_N1 % 16 == 0)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    n_n = tl.cdiv(Lk, BLOCK_N1)
    i_w = tl.load(ORDER + tl.program_id(0))
    i_bkh = i_w // n_n
    i_b = i_bkh // HK
    i_kh = i_bkh % HK
    i_n = i_w % n_n

    o_n = i_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < Lk
    m_d = o_d < HEAD_DIM
    o_k = o_n[:, None]                         # key positions [BLOCK_N1, 1]
    m_nd = m_n[:, None] & m_d[None, :]
    b_k = tl.load(K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
                  + o_n[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_nd, other=0.0)
    b_v = tl.load(V + i_b.to(tl.int64) * stride_vb + i_kh.to(tl.int64) * stride_vh
                  + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_nd, other=0.0)
    b_dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
@@KS@@
    for g in range(0, GROUP):
        i_h = i_kh * GROUP + g
        p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
        p_lse2 = LSE + (i_b * H + i_h).to(tl.int64) * Lq
        p_delta = DELTA + (i_b * H + i_h).to(tl.int64) * Lq
@@INPUT_BASES@@
@@HOIST@@
@@SCHEDULE@@

    # epilogue
    b_dk = b_dk * sm_scale
    tl.store(DK + i_b.to(tl.int64) * stride_dkb + i_kh.to(tl.int64) * stride_dkh
             + o_n[:, None] * stride_dkn + o_d[None, :] * stride_dkd,
             b_dk.to(DK.dtype.element_ty), mask=m_nd)
    tl.store(DV + i_b.to(tl.int64) * stride_dvb + i_kh.to(tl.int64) * stride_dvh
             + o_n[:, None] * stride_dvn + o_d[None, :] * stride_dvd,
             b_dv.to(DV.dtype.element_ty), mask=m_nd)
'''

DQ_RANGE = '''
@triton.jit
def @@FN@@(
    b_dq, b_q, b_do, b_lse, b_delta, o_q,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    sm_scale_log2, i_b, i_h, Lq, Lk, H,@@EXTRA@@
    COLS, start, end,
    MASKED: tl.constexpr, TABLE: tl.constexpr,
    BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Key tiles [start, end) (tile indices, or CSR slots when TABLE) of one query tile.

    K^T and V^T are loaded transposed through their strides ([BLOCK_D, BLOCK_N2]).
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    for idx in range(start, end):
        if TABLE:
            i_n = tl.load(COLS + idx)
        else:
            i_n = idx
        o_n = i_n * BLOCK_N2 + tl.arange(0, BLOCK_N2)
        p_kt = K + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
        p_vt = V + o_n[None, :] * stride_vn + o_d[:, None] * stride_vd
        if MASKED:
            m_dn = m_d[:, None] & (o_n[None, :] < Lk)
            b_kt = tl.load(p_kt, mask=m_dn, other=0.0)
            b_vt = tl.load(p_vt, mask=m_dn, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            b_kt = tl.load(p_kt)
            b_vt = tl.load(p_vt)
        else:
            b_kt = tl.load(p_kt, mask=m_d[:, None], other=0.0)
            b_vt = tl.load(p_vt, mask=m_d[:, None], other=0.0)
        # -- scores --
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PREC)
        b_p = tl.math.exp2(b_s * sm_scale_log2 - b_lse[:, None])
        if MASKED:
            # -- predicate (PARTIAL tile) --
            o_k = o_n[None, :]                   # key positions [1, BLOCK_N2]
@@PRED@@
            b_p = tl.where(m_pattern & (o_k < Lk), b_p, 0.0)
        # -- gradients --
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), b_dq, input_precision=DOT_PREC)
    return b_dq
'''

DQ_FUSED = '''
@triton.jit
def @@FN@@(
    b_dq, b_q, b_do, b_lse, b_delta, o_q,
    K, V, stride_kn, stride_kd, stride_vn, stride_vd,
    sm_scale_log2, i_b, i_h, Lq, Lk, H,@@EXTRA@@
    start, end, full_start, full_end,
    BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Key tiles [start, end) of one query tile in one loop (one pipeline fill).

    Tiles in [full_start, full_end) are FULL: the uniform flag `partial` skips the
    predicate for them.  Loads stay outside the branch and are always bounds-masked.
    """
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    for i_n in range(start, end):
        o_n = i_n * BLOCK_N2 + tl.arange(0, BLOCK_N2)
        m_dn = m_d[:, None] & (o_n[None, :] < Lk)
        p_kt = K + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
        p_vt = V + o_n[None, :] * stride_vn + o_d[:, None] * stride_vd
        b_kt = tl.load(p_kt, mask=m_dn, other=0.0)
        b_vt = tl.load(p_vt, mask=m_dn, other=0.0)
        # -- scores --
        b_s = tl.dot(b_q, b_kt, input_precision=DOT_PREC)
        b_p = tl.math.exp2(b_s * sm_scale_log2 - b_lse[:, None])
        partial = (i_n < full_start) | (i_n >= full_end)
        if partial:
            # -- predicate (PARTIAL tile) --
            o_k = o_n[None, :]                   # key positions [1, BLOCK_N2]
@@PRED@@
            b_p = tl.where(m_pattern & (o_k < Lk), b_p, 0.0)
        # -- gradients --
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), b_dq, input_precision=DOT_PREC)
    return b_dq
'''

DQ_KERNEL = '''
@triton.jit
def @@FN@@(
    Q, K, V, DO, O, LSE, LSE2, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,@@INPUT_PARAMS@@@@TABLE_PARAMS@@
    ORDER,
    sm_scale, sm_scale_log2, H, GROUP, Lq, Lk, q_offset,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,@@TABLE_CONSTS@@
):
    """dQ of one query tile (BLOCK_M2 queries) of one (batch, query head).

    Grid: (B * H * n_m,), work items (batch * H + head) * n_m + query tile in the
    heavy-first ORDER, as in the forward; the key tiles (BLOCK_N2 keys) are
    those of the forward's schedule at this tile shape.  Every query row belongs to
    exactly one program, which also writes the row's DELTA = rowsum(dO * O) and LSE2
    (the forward's LSE in log2 units) for the dK/dV kernel launched after it.
    """
    tl.static_assert(BLOCK_M2 % 16 == 0)
    tl.static_assert(BLOCK_N2 % 16 == 0)
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    n_m = tl.cdiv(Lq, BLOCK_M2)
    i_w = tl.load(ORDER + tl.program_id(0))
    i_bh = i_w // n_m
    i_b = i_bh // H
    i_h = i_bh % H
    i_kh = i_h // GROUP
    i_m = i_w % n_m

    o_m = i_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < Lq
    m_d = o_d < HEAD_DIM
    m_md = m_m[:, None] & m_d[None, :]
    o_q = (o_m + q_offset)[:, None]          # query positions [BLOCK_M2, 1]
    b_q = tl.load(Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
                  + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd, mask=m_md, other=0.0)
    b_do = tl.load(DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                   + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod, mask=m_md, other=0.0)
    b_o = tl.load(O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
                  + o_m[:, None] * stride_om + o_d[None, :] * stride_od, mask=m_md, other=0.0)

    # -- row statistics: delta = rowsum(dO * O); lse in log2 units, a fully masked row's
    #    -inf (and rows beyond Lq) as +inf so that p = exp2(s - lse) = 0 --
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * Lq + o_m, mask=m_m, other=float("-inf"))
    b_lse = b_lse.to(tl.float32) * 1.4426950408889634
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    tl.store(DELTA + i_bh.to(tl.int64) * Lq + o_m, b_delta, mask=m_m)
    tl.store(LSE2 + i_bh.to(tl.int64) * Lq + o_m, b_lse, mask=m_m)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_kh.to(tl.int64) * stride_vh
@@INPUT_BASES@@
@@HOIST@@
    b_dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)

@@SCHEDULE@@

    # epilogue
    b_dq = b_dq * sm_scale
    tl.store(DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
             + o_m[:, None] * stride_dqm + o_d[None, :] * stride_dqd,
             b_dq.to(DQ.dtype.element_ty), mask=m_md)
'''


# ------------------------------------------------------------ TMA variants
#
# On Hopper (and under the interpreter, for the tests) the block loads and stores of
# Q, K, V, dO and the outputs can go through tensor descriptors (TMA): one
# asynchronous bulk copy per tile into shared memory, zero-filled beyond each
# dimension's extent and clipped on store, instead of per-thread pointer arithmetic
# and bounds masks.  ``config.tma`` selects them; the launcher passes
# ``triton.tools.tensor_descriptor.TensorDescriptor`` objects over the 4-D
# [B, heads, L, D] tensors (block [1, 1, rows, BLOCK_D]) in place of the tensors, and
# the stride arguments stay in the signature, unused.  The variants are the pointer
# templates with these exact blocks swapped (checked at import: a template edit that
# breaks one fails loudly).

def _swap(text: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        if text.count(old) != 1:
            raise AssertionError(f"TMA edit matches {text.count(old)} times: {old[:60]!r}")
        text = text.replace(old, new)
    return text


_D_OFFSETS = "    o_d = tl.arange(0, BLOCK_D)\n    m_d = o_d < HEAD_DIM\n    for "
_KV_TMA = ("    K, V, stride_kn, stride_kd, stride_vn, stride_vd,\n", "    K, V, i_kh,\n")
_KT_TMA = "        b_kt = tl.trans(K.load([i_b, i_kh, i_n * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D))\n"
_V_TMA = "        b_v = V.load([i_b, i_kh, i_n * BLOCK_N, 0]).reshape(BLOCK_N, BLOCK_D)\n"
_KV_PTRS = """        p_kt = K + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
        p_v = V + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd
"""

FWD_RANGE_TMA = _swap(
    FWD_RANGE, _KV_TMA, (_D_OFFSETS, "    for "), (_KV_PTRS, ""),
    ("""        if MASKED:
            b_kt = tl.load(p_kt, mask=m_d[:, None] & (o_n[None, :] < Lk), other=0.0)
        elif HEAD_DIM == BLOCK_D:
            b_kt = tl.load(p_kt)
        else:
            b_kt = tl.load(p_kt, mask=m_d[:, None], other=0.0)
""", _KT_TMA),
    ("""        if MASKED:
            b_v = tl.load(p_v, mask=(o_n[:, None] < Lk) & m_d[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            b_v = tl.load(p_v)
        else:
            b_v = tl.load(p_v, mask=m_d[None, :], other=0.0)
""", _V_TMA))

FWD_FUSED_TMA = _swap(
    FWD_FUSED, _KV_TMA, (_D_OFFSETS, "    for "), (_KV_PTRS, ""),
    ("  Loads are always bounds-masked (every lane true but on the ragged last tile,\n"
     "    which _full_span never counts FULL, so its scores also get k < Lk in the branch).\n"
     "    (Tried on an H200: unmasked body loop + a masked call for the ragged tile was slower,\n"
     "    the extra call per piece costing more than the masks.)\n",
     "  K and V come through TMA, zero-filled beyond Lk (the ragged last tile is\n"
     "    never FULL, so its scores also get k < Lk in the branch).\n"),
    ("        m_n = o_n < Lk\n", ""),
    ("""        if HEAD_DIM == BLOCK_D:
            b_kt = tl.load(p_kt, mask=m_n[None, :], other=0.0)
        else:
            b_kt = tl.load(p_kt, mask=m_d[:, None] & m_n[None, :], other=0.0)
""", _KT_TMA),
    ("""        if HEAD_DIM == BLOCK_D:
            b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)
        else:
            b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
""", _V_TMA))

FWD_BODY_TMA = _swap(
    FWD_BODY,
    ("""    p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh \\
        + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)
    p_k = K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_kh.to(tl.int64) * stride_vh
""", "    b_q = Q.load([i_b, i_h, i_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)\n"),
    ("""    p_o = O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh \\
        + o_m[:, None] * stride_om + o_d[None, :] * stride_od
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
""", "    O.store([i_b, i_h, i_m * BLOCK_M, 0], acc.to(O.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))\n"),
    ("    o_d = tl.arange(0, BLOCK_D)\n", ""), ("    m_d = o_d < HEAD_DIM\n", ""))

_QDO_TMA = ("""        b_qt = tl.trans(Q.load([i_b, i_h, i_m * BLOCK_M1, 0]).reshape(BLOCK_M1, BLOCK_D))
        b_do = DO.load([i_b, i_h, i_m * BLOCK_M1, 0]).reshape(BLOCK_M1, BLOCK_D)
""")
_QDO_PTRS = """        p_qt = Q + o_m[None, :] * stride_qm + o_d[:, None] * stride_qd       # [BLOCK_D, BLOCK_M1]
        p_do = DO + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod     # [BLOCK_M1, BLOCK_D]
"""
_QDO_SIG = ("    Q, DO, LSE2, DELTA, stride_qm, stride_qd, stride_dom, stride_dod,\n",
            "    Q, DO, LSE2, DELTA,\n")

DKDV_RANGE_TMA = _swap(
    DKDV_RANGE, _QDO_SIG, (_D_OFFSETS, "    for "),
    ("    Q^T is loaded transposed through its strides.\n",
     "    Q and dO come through TMA (zero-filled beyond Lq), Q^T is a transposed view.\n"),
    (_QDO_PTRS + """        if MASKED:
            m_m = o_m < Lq
            b_qt = tl.load(p_qt, mask=m_d[:, None] & m_m[None, :], other=0.0)
            b_do = tl.load(p_do, mask=m_m[:, None] & m_d[None, :], other=0.0)
""", _QDO_TMA + "        if MASKED:\n            m_m = o_m < Lq\n"),
    ("""            if HEAD_DIM == BLOCK_D:
                b_qt = tl.load(p_qt)
                b_do = tl.load(p_do)
            else:
                b_qt = tl.load(p_qt, mask=m_d[:, None], other=0.0)
                b_do = tl.load(p_do, mask=m_d[None, :], other=0.0)
""", ""))

DKDV_FUSED_TMA = _swap(
    DKDV_FUSED, _QDO_SIG, (_D_OFFSETS, "    for "),
    (_QDO_PTRS + """        b_qt = tl.load(p_qt, mask=m_d[:, None] & m_m[None, :], other=0.0)
        b_do = tl.load(p_do, mask=m_m[:, None] & m_d[None, :], other=0.0)
""", _QDO_TMA))

DKDV_KERNEL_TMA = _swap(
    DKDV_KERNEL,
    ("""    b_k = tl.load(K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
                  + o_n[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_nd, other=0.0)
    b_v = tl.load(V + i_b.to(tl.int64) * stride_vb + i_kh.to(tl.int64) * stride_vh
                  + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_nd, other=0.0)
""", """    b_k = K.load([i_b, i_kh, i_n * BLOCK_N1, 0]).reshape(BLOCK_N1, BLOCK_D)
    b_v = V.load([i_b, i_kh, i_n * BLOCK_N1, 0]).reshape(BLOCK_N1, BLOCK_D)
"""),
    ("""        p_q = Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
        p_do = DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
""", ""),
    ("""    tl.store(DK + i_b.to(tl.int64) * stride_dkb + i_kh.to(tl.int64) * stride_dkh
             + o_n[:, None] * stride_dkn + o_d[None, :] * stride_dkd,
             b_dk.to(DK.dtype.element_ty), mask=m_nd)
    tl.store(DV + i_b.to(tl.int64) * stride_dvb + i_kh.to(tl.int64) * stride_dvh
             + o_n[:, None] * stride_dvn + o_d[None, :] * stride_dvd,
             b_dv.to(DV.dtype.element_ty), mask=m_nd)
""", """    DK.store([i_b, i_kh, i_n * BLOCK_N1, 0], b_dk.to(DK.dtype).reshape(1, 1, BLOCK_N1, BLOCK_D))
    DV.store([i_b, i_kh, i_n * BLOCK_N1, 0], b_dv.to(DV.dtype).reshape(1, 1, BLOCK_N1, BLOCK_D))
"""),
    ("""    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < Lk
    m_d = o_d < HEAD_DIM
    o_k = o_n[:, None]                         # key positions [BLOCK_N1, 1]
    m_nd = m_n[:, None] & m_d[None, :]
""", """    o_k = o_n[:, None]                         # key positions [BLOCK_N1, 1]
"""))

_KTVT_TMA = """        b_kt = tl.trans(K.load([i_b, i_kh, i_n * BLOCK_N2, 0]).reshape(BLOCK_N2, BLOCK_D))
        b_vt = tl.trans(V.load([i_b, i_kh, i_n * BLOCK_N2, 0]).reshape(BLOCK_N2, BLOCK_D))
"""
_KTVT_PTRS = """        p_kt = K + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
        p_vt = V + o_n[None, :] * stride_vn + o_d[:, None] * stride_vd
"""

DQ_RANGE_TMA = _swap(
    DQ_RANGE, _KV_TMA, (_D_OFFSETS, "    for "),
    ("    K^T and V^T are loaded transposed through their strides ([BLOCK_D, BLOCK_N2]).\n",
     "    K and V come through TMA (zero-filled beyond Lk); K^T, V^T are transposed views.\n"),
    (_KTVT_PTRS + """        if MASKED:
            m_dn = m_d[:, None] & (o_n[None, :] < Lk)
            b_kt = tl.load(p_kt, mask=m_dn, other=0.0)
            b_vt = tl.load(p_vt, mask=m_dn, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            b_kt = tl.load(p_kt)
            b_vt = tl.load(p_vt)
        else:
            b_kt = tl.load(p_kt, mask=m_d[:, None], other=0.0)
            b_vt = tl.load(p_vt, mask=m_d[:, None], other=0.0)
""", _KTVT_TMA))

DQ_FUSED_TMA = _swap(
    DQ_FUSED, _KV_TMA, (_D_OFFSETS, "    for "),
    ("        m_dn = m_d[:, None] & (o_n[None, :] < Lk)\n" + _KTVT_PTRS
     + """        b_kt = tl.load(p_kt, mask=m_dn, other=0.0)
        b_vt = tl.load(p_vt, mask=m_dn, other=0.0)
""", _KTVT_TMA))

DQ_KERNEL_TMA = _swap(
    DQ_KERNEL,
    ("""    b_q = tl.load(Q + i_b.to(tl.int64) * stride_qb + i_h.to(tl.int64) * stride_qh
                  + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd, mask=m_md, other=0.0)
    b_do = tl.load(DO + i_b.to(tl.int64) * stride_dob + i_h.to(tl.int64) * stride_doh
                   + o_m[:, None] * stride_dom + o_d[None, :] * stride_dod, mask=m_md, other=0.0)
    b_o = tl.load(O + i_b.to(tl.int64) * stride_ob + i_h.to(tl.int64) * stride_oh
                  + o_m[:, None] * stride_om + o_d[None, :] * stride_od, mask=m_md, other=0.0)
""", """    b_q = Q.load([i_b, i_h, i_m * BLOCK_M2, 0]).reshape(BLOCK_M2, BLOCK_D)
    b_do = DO.load([i_b, i_h, i_m * BLOCK_M2, 0]).reshape(BLOCK_M2, BLOCK_D)
    b_o = O.load([i_b, i_h, i_m * BLOCK_M2, 0]).reshape(BLOCK_M2, BLOCK_D)
"""),
    ("""    p_k = K + i_b.to(tl.int64) * stride_kb + i_kh.to(tl.int64) * stride_kh
    p_v = V + i_b.to(tl.int64) * stride_vb + i_kh.to(tl.int64) * stride_vh
""", ""),
    ("""    tl.store(DQ + i_b.to(tl.int64) * stride_dqb + i_h.to(tl.int64) * stride_dqh
             + o_m[:, None] * stride_dqm + o_d[None, :] * stride_dqd,
             b_dq.to(DQ.dtype.element_ty), mask=m_md)
""", """    DQ.store([i_b, i_h, i_m * BLOCK_M2, 0], b_dq.to(DQ.dtype).reshape(1, 1, BLOCK_M2, BLOCK_D))
"""),
    ("""    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < Lq
    m_d = o_d < HEAD_DIM
    m_md = m_m[:, None] & m_d[None, :]
""", "    m_m = o_m < Lq\n"))

#: Kernel arguments of the tile-loop functions that differ between pointer and TMA loads.
_PTR_KV_ARGS = "p_k, p_v, stride_kn, stride_kd, stride_vn, stride_vd, "
_PTR_QDO_ARGS = "p_q, p_do, p_lse2, p_delta, stride_qm, stride_qd, stride_dom, stride_dod, "


def render_bwd(pattern, config, key: str, closed_form=None) -> str:
    """The backward module: the dQ kernel, then the dK/dV kernel (transposed schedule).

    dQ reads the forward's natural-log LSE and writes, per query row, the LSE in log2
    units (``lse * log2(e)``, fully masked rows ``+inf`` so that ``p = 0``) and
    ``delta = rowsum(dO * O)``, which dK/dV reads: no pre-pass launch.  dK/dV is
    rendered with its own tile shape (``BLOCK_M1`` queries per step, ``BLOCK_N1`` keys
    per program) and dQ with its own (``BLOCK_M2``, ``BLOCK_N2``): the ranges schedules
    use each kernel's constants, the tables are built per shape.
    """
    names = _names(pattern, key[:6])
    inputs = dict(pattern.inputs)
    ip = _input_params(inputs)
    input_params = ("\n    " + ", ".join(ip) + ",") if ip else ""
    table_params = TABLE_PARAMS if config.strategy == "table" else ""
    helpers = False

    # ---- dK/dV: loop variable q
    em_t = _predicate(pattern, "q")
    helpers |= bool(em_t is not None and em_t.uses_helpers)
    pred_t = _ind("\n".join(em_t.inner), 12) if em_t is not None else " " * 12 + "m_pattern = True"
    extra_p, extra_a = _extra_args(em_t, inputs)
    tma = config.tma
    qdo = "Q, DO, p_lse2, p_delta, " if tma else _PTR_QDO_ARGS
    call = (f"b_dk, b_dv = {names['dkdv_range']}(b_dk, b_dv, b_k, b_v, o_k, {qdo}"
            f"sm_scale_log2, i_b, i_h, Lq, Lk, H, q_offset, {extra_a}@@COLS@@, {{start}}, "
            f"{{end}}, MASKED={{masked}}, TABLE=@@TABLE@@, BLOCK_M1=BLOCK_M1, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM, "
            f"DOT_PREC=DOT_PREC)")
    fused = config.loop == "fused"
    fc = None
    if fused:
        fc = (f"b_dk, b_dv = {names['dkdv_fused']}(b_dk, b_dv, b_k, b_v, o_k, {qdo}"
              f"sm_scale_log2, i_b, i_h, Lq, Lk, H, q_offset, {extra_a}{{start}}, {{end}}, "
              f"{{full_start}}, {{full_end}}, "
              f"BLOCK_M1=BLOCK_M1, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM, DOT_PREC=DOT_PREC)")
    ks = ""
    if config.strategy == "ranges":
        cols = closed_form.cols
        env = dict(ENV, ks="ks", ke="ke")
        cf_lines, _, h2 = _closed_form_code(cols, env, "c", "cols")
        helpers |= h2
        ks = _ind("ks = i_n * BLOCK_N1\nke = tl.minimum(i_n * BLOCK_N1 + BLOCK_N1, Lk) - 1", 4)
        sched = ["# -- query-tile ranges (closed form over this key tile's first/last key) --"]
        sched += cf_lines
        c = call.replace("@@COLS@@", "ORDER").replace("@@TABLE@@", "False")
        sched.append(_range_schedule(cols, prefix="c", length="Lq", block="BLOCK_M1",
                                     shift="q_offset", call=c, comment_unit="query positions",
                                     fused_call=fc))
    else:
        sched = _table_schedule(call, "i_n", "PARTIAL query tiles, then FULL query tiles",
                                transposed=True, fused_call=fc)
    hoist_t = ""
    if em_t is not None and em_t.outer:
        hoist_t = _ind("# -- predicate terms that do not depend on q: once per (program, head) --\n"
                       + "\n".join(em_t.outer), 8)
    dkdv_inner = _inner_fns(DKDV_FUSED_TMA if tma else DKDV_FUSED,
                            DKDV_RANGE_TMA if tma else DKDV_RANGE, names["dkdv_fused"],
                            names["dkdv_range"], config, extra_p, pred_t, fused=fused)
    table_consts = TABLE_CONSTS if config.strategy == "table" else ""
    dkdv = _fill(DKDV_KERNEL_TMA if tma else DKDV_KERNEL, FN=names["dkdv"], INPUT_PARAMS=input_params,
                 TABLE_PARAMS=table_params, TABLE_CONSTS=table_consts, KS=ks,
                 INPUT_BASES=_ind(_input_bases(inputs, "i_b", "i_h"), 8),
                 HOIST=hoist_t, SCHEDULE=_ind("\n".join(sched), 8))

    # ---- dQ: loop variable k
    em = _predicate(pattern, "k")
    helpers |= bool(em is not None and em.uses_helpers)
    pred = _ind("\n".join(em.inner), 12) if em is not None else " " * 12 + "m_pattern = True"
    extra_p, extra_a = _extra_args(em, inputs)
    kv = "K, V, i_kh, " if tma else _PTR_KV_ARGS
    call = (f"b_dq = {names['dq_range']}(b_dq, b_q, b_do, b_lse, b_delta, o_q, {kv}"
            f"sm_scale_log2, i_b, i_h, Lq, Lk, H, "
            f"{extra_a}@@COLS@@, {{start}}, {{end}}, MASKED={{masked}}, TABLE=@@TABLE@@, "
            f"BLOCK_N2=BLOCK_N2, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM, DOT_PREC=DOT_PREC)")
    fc = None
    if fused:
        fc = (f"b_dq = {names['dq_fused']}(b_dq, b_q, b_do, b_lse, b_delta, o_q, {kv}"
              f"sm_scale_log2, i_b, i_h, Lq, Lk, H, "
              f"{extra_a}{{start}}, {{end}}, {{full_start}}, {{full_end}}, "
              f"BLOCK_N2=BLOCK_N2, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM, DOT_PREC=DOT_PREC)")
    if config.strategy == "ranges":
        rows = closed_form.rows
        env = dict(ENV, qs="qs", qe="qe")
        cf_lines, _, h2 = _closed_form_code(rows, env, "r", "rows")
        helpers |= h2
        sched = ["# -- key-tile ranges (closed form over this tile's first/last query position) --",
                 "qs = i_m * BLOCK_M2 + q_offset",
                 "qe = tl.minimum(i_m * BLOCK_M2 + BLOCK_M2, Lq) - 1 + q_offset"]
        sched += cf_lines
        c = call.replace("@@COLS@@", "ORDER").replace("@@TABLE@@", "False")
        sched.append(_range_schedule(rows, prefix="r", length="Lk", block="BLOCK_N2", shift="0",
                                     call=c, comment_unit="keys", fused_call=fc))
    else:
        sched = _table_schedule(call, "i_m", "PARTIAL key tiles (predicate), then FULL key "
                                "tiles (none)", fused_call=fc)
    hoist = ""
    if em is not None and em.outer:
        hoist = _ind("# -- predicate terms that do not depend on k: once per program --\n"
                     + "\n".join(em.outer), 4)
    dq_inner = _inner_fns(DQ_FUSED_TMA if tma else DQ_FUSED, DQ_RANGE_TMA if tma else DQ_RANGE,
                          names["dq_fused"], names["dq_range"], config, extra_p, pred, fused=fused)
    dq = _fill(DQ_KERNEL_TMA if tma else DQ_KERNEL, FN=names["dq"], INPUT_PARAMS=input_params, TABLE_PARAMS=table_params,
               TABLE_CONSTS=table_consts,
               INPUT_BASES=_ind(_input_bases(inputs, "i_b", "i_h"), 4), HOIST=hoist,
               SCHEDULE=_ind("\n".join(sched), 4))

    parts = [_header(pattern, "bwd", config, key, names, STRATEGY_DOC[config.strategy])]
    if helpers:
        parts.append(HELPERS)
    if config.strategy == "ranges":
        parts.append(RANGE_HELPERS)
    parts += [dkdv_inner, dkdv, dq_inner, dq]
    parts.append(f"\nDKDV = {names['dkdv']}\nDQ = {names['dq']}\n")
    return _tidy("\n".join(parts))


def render(pattern, kind: str, config, key: str, closed_form=None) -> str:
    """Source text of the ``kind`` ("fwd" or "bwd") module of ``pattern``."""
    if config.strategy == "ranges" and closed_form is None:
        raise ValueError("the ranges strategy needs the pattern's closed form")
    if kind == "fwd":
        return render_fwd(pattern, config, key, closed_form)
    if kind == "bwd":
        return render_bwd(pattern, config, key, closed_form)
    raise ValueError(f"unknown kernel kind {kind!r} (expected 'fwd' or 'bwd')")
