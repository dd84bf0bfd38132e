"""Adversarial random search, third series: per-head key orders, the layout gather modes,
scores with row terms and outer factors, and two-sided position ranges near the 32-bit
limits, against the float64 reference (every element of o, the lse and dq, dk, dv, and the
gradients of a score's tables).

Kinds (each case drawn from one integer seed; replay with ``--case KIND:SEED``):

* ``horder``: a pattern whose keys split into a class per head (residues with offsets,
  stripes of ``b`` keys, negated classes, per-head lists, unions, classes of ``H``) beside
  a window, a band, causality, a sink or documents, ``SPATTN_LAYOUT`` on or auto, GQA,
  head counts that are not powers of two, ``Lq <= Lk`` with or without a ``q_offset``,
  B > 1, through the call forms.
* ``gmode``: a grid pattern (``spattn.neighborhood`` with extra tokens, a declared grid
  program, a flattened expression the runtime discovers) with ``SPATTN_LAYOUT=on`` and
  ``SPATTN_LAYOUT_GATHER`` one of copy, kernel, box, auto, and sometimes explicit forward
  tiles (``SPATTN_BLOCK_M`` / ``_N``: the layout tile prior's 64 x 64 and 128 x 128).
* ``box``: ``SPATTN_LAYOUT_GATHER=box`` on neighbourhoods whose boxes the forward can read
  (1 to 3 axes, no residue classes or extra tokens), forward tiles given or not, tensors
  contiguous, ``[B, N, H, D]`` views, packed or strided.
* ``rowscore``: a score with terms of the query alone (``w[h, q]``, ``t[h]``, ALiBi,
  ``log`` of a query expression that is ``-inf`` on some rows) and outer constant factors
  (positive, negative, zero, a param, a table), over random masks, ``Lq != Lk`` and
  ``q_offset``; gradients of the tables too, and sometimes of the lse.
* ``slayout``: a scored neighbourhood (1 to 3 axes, strides, dilations, causal axes,
  sometimes composed with another mask) with ``SPATTN_LAYOUT=on``: relative-bias tables
  indexed by coordinate offsets and sized exactly for the grid, soft-capping, position
  terms and selects, on either backend, through the call forms (the call runs in the
  mask's layout through ``runtime.scores.LayoutRun``; plans in sequence order).
* ``pbatch``: patterns that depend on the batch element (paddings, per-element and
  per-head key masks, documents, a per-element width, ``b``) on the torch backend, through
  the call forms, or with one query row over a growing cache (the decode path's batched
  steps).
* ``urange``: two-sided ranges of position expressions (``lo <= q - k <= hi``, ``k + c``,
  ``q + k``, ``2 * q - k``) with bounds near ``+-2**31``, empty and reversed ranges,
  ``Lq != Lk`` bottom-right alignment and ``q_offset``s up to ``2**31``.

Which plans served each kind (``HeadOrderedPlan``, each gather mode) is counted and printed
at the end, so a run shows that the paths it meant to reach were reached. Run from the
repository root::

    TRITON_INTERPRET=1 nice -n 10 python -m tests.helpers.adversarial3 --minutes 10 --seed 1
"""
from __future__ import annotations

import collections
import os
import random
import tempfile
import warnings

if __name__ == "__main__":     # run as the search, not imported by a test (on a GPU machine
    # the variable would turn every kernel of the test run into the interpreter's)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SPATTN_CACHE_DIR", tempfile.mkdtemp(prefix="spattn-adversarial-"))

import torch  # noqa: E402

import spattn  # noqa: E402
from spattn.dsl.errors import SpattnError  # noqa: E402
from spattn.ir.cost import constants as cost_constants  # noqa: E402
from spattn.runtime import plan as _plan  # noqa: E402

from tests.helpers.adversarial import rand_mask  # noqa: E402
from tests.helpers import search  # noqa: E402
from tests.helpers.adversarial2 import (DTYPES, FORMS, LAST, _call, _env,  # noqa: E402
                                        _grads, _grid_expr, _grid_pattern, _tensors)
from tests.helpers.adversarial2 import _check as _check2, _tol  # noqa: E402
from tests.helpers.adversarial import _close  # noqa: E402
from tests.helpers.headorder import class_source  # noqa: E402

#: plans built during the current case: (class name, gather mode, the backward's where it
#: differs: a box forward's)
BUILT: list = []
#: over the run: kind -> Counter of the plans its cases built
REACHED: dict = collections.defaultdict(collections.Counter)


def _record(cls):
    init = cls.__init__

    def wrapped(self, *a, **kw):
        init(self, *a, **kw)
        gather = getattr(self, "gather", None)
        backward = getattr(self, "backward_gather", gather)
        BUILT.append((type(self).__name__,
                      gather if backward == gather else f"{gather}+{backward}"))
    cls.__init__ = wrapped


def _record_plans() -> None:
    """Count the permuted plans each case builds (the search's own process only)."""
    for cls in (_plan.HeadOrderedPlan, _plan.RemappedPlan, _plan.OrderedPlan):
        _record(cls)


def _check(desc, pat, q, k, v, got, do, dtype, **kw):
    """adversarial2's check; a score that is ``+inf`` or NaN at an allowed pair (a negative
    or zero factor times a ``-inf`` row term) makes its row NaN in the reference as in the
    kernels (docs/language.md §13), and then the gradients of every key its tiles computed,
    which no contract fixes: only o is compared then."""
    if pat.score is not None:
        from spattn.runtime.reference import pattern_reference
        ints = {n: t for n, t in (kw.get("inputs") or {}).items()
                if n not in (pat.score_inputs or {})}
        tabs = {n: t.detach().double() for n, t in (kw.get("inputs") or {}).items()
                if n in (pat.score_inputs or {})}
        ro, _ = pattern_reference(pat, q.detach().double(), k.detach().double(),
                                  v.detach().double(), q_offset=kw.get("q_offset"), **ints,
                                  **tabs)
        if ro.isnan().any():
            # (the reference's lse of a NaN row is -inf where l is NaN, +inf where it is
            # inf; the kernels' NaN: the output is what is compared then)
            _close(f"{desc} o", got[0], ro, atol=_tol(dtype))
            return
    _check2(desc, pat, q, k, v, got, do, dtype, **kw)


def _run(form, pat, q, k, v, g, dlse_p, **kw):
    """(o, lse, dq, dk, dv[, tables]) of a call in ``form`` and the upstream ``do``,
    ``dlse``."""
    o, lse = (_det_call if form == "det" else lambda *a, **k: _call(form, *a, **k))(
        pat, q, k, v, **kw)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(q.dtype)
    dlse = torch.randn(lse.shape, generator=g) if dlse_p else None
    tabs = [t for n, t in kw.items() if n in (pat.score_inputs or {})]
    return [o, lse, *_grads(o, lse, (q, k, v, *tabs), do, dlse)], do, dlse


# ------------------------------------------------------------------ per-head key orders

def _head_pattern(r: random.Random, H: int) -> tuple:
    """(source, needs doc) of a random pattern with a class atom of ``k`` and ``h``."""
    m = r.choice([2, 3, 4, 5, H, H, H + 1, 2 * H])
    c, b = r.randint(0, 5), r.choice([1, 2, 3, 4, 8])
    atom = class_source(m, c, b, H, r.randint(1, 8))
    atom = r.choice([atom, atom, atom, f"(k // {b}) % H == h", "k % H == h",
                     f"k % H == (h + {c}) % H", f"(k // {b}) % H != h",
                     "(Lk - 1 - k) % H == h", f"k // {b + 2} == h", f"k < 3 * h + {c}",
                     f"abs(k - 4 * h) <= {c}", "is_pow2(k + h + 1)"])
    W, S = r.randint(1, 20), r.randint(1, 4)
    shape = r.randrange(9)
    src = [f"causal & (q - k < {W} | {atom})", f"{atom}", f"causal & ({atom})",
           f"(q - k < {W} & k - q < {W}) | {atom}",
           f"causal & (q - k < {W} | k < {S} | {atom})",
           f"causal & (q - k < {W} | {atom}) & ~(k == q - 1)",
           f"same(doc) & causal & (q - k < {W} | {atom})",
           f"causal & (window({W}) | {atom} | k % {m} == (h + 1) % {m})",
           f"k <= q + {S} & (q - k < {W} | {atom})"][shape]
    return src, shape == 6


def horder_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    Hk = r.choice([1, 1, 2, 3])
    Hq = Hk * r.choice([2, 3, 5]) if Hk == 1 else Hk * r.choice([1, 2])
    src, doc = _head_pattern(r, Hq)
    B, D = r.choice([1, 2, 3]), r.choice([16, 16, 24])
    Lk = r.randint(1, 90)
    big = r.random() < 0.12          # auto's own choice at AUTO_MIN_TOKENS keys and more
    if big:
        backend, Lk, B, D = "torch", r.randint(1024, 1600), 1, 16
    shape = r.choice(["self", "self", "fewer", "offset", "more"])
    Lq, q_offset = Lk, None
    if shape == "fewer":
        Lq = r.randint(1, Lk)
    elif shape == "more":           # bottom-right: the first queries sit before key 0
        Lq = Lk + r.randint(1, 20)
    elif shape == "offset":
        Lq = r.randint(1, 60)
        q_offset = r.choice([0, r.randint(0, Lk), r.randint(-5, Lk + 20)])
    if big and r.random() < 0.3:
        Lq = r.randint(1, 16)                    # a decode-sized call: routed to decode
    dtype = r.choice(DTYPES)
    form = r.choice(FORMS)
    layout = "auto" if big else r.choice(["on", "on", "on", "auto"])
    gather = r.choice(["copy", "kernel", "box", "auto"])
    desc = (f"horder:{seed} {backend} {src!r} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-Lk{Lk}-D{D} "
            f"q_offset={q_offset} {dtype} form={form} layout={layout} gather={gather}")
    LAST["desc"] = desc
    try:
        pat = spattn.compile(src, backend=backend)
    except SpattnError as e:
        return desc + f" (refused at compile: {str(e).splitlines()[0][:80]})"
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hk, Lq, Lk, D, dtype,
                            strided=r.choice([None, None, "every_other"]))
    inputs = {}
    if doc:
        inputs["doc"] = (torch.rand(B if r.random() < 0.5 else 1, Lk, generator=g)
                         < 0.1).cumsum(-1)
        if inputs["doc"].shape[0] == 1 and r.random() < 0.5:
            inputs["doc"] = inputs["doc"][0]
    old = _env({"SPATTN_LAYOUT": layout, "SPATTN_LAYOUT_GATHER": gather})
    try:
        got, do, dlse = _run(form, pat, q, k, v, g, r.random() < 0.3, q_offset=q_offset,
                             **inputs)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    _check(desc, pat, q, k, v, got, do, dtype, q_offset=q_offset, inputs=inputs, dlse=dlse)
    return desc


# ------------------------------------------------------------------ gather modes

def gmode_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["triton", "triton", "torch"])
    if r.random() < 0.3:        # a random flattened expression whose grid the runtime finds
        base = r.choice([2, 3, 4, 5, 6, 8])
        Ws = sorted({base, base * r.choice([2, 3]), r.choice([2, 3, 4, 5, 7])})
        src = _grid_expr(r, Ws, r.randint(1, 3))
        N = r.choice([base * r.randint(2, 10), max(Ws) * r.randint(2, 6) + r.choice([0, 0, 1, 3])])
        desc = repr(src)
        try:
            pat = spattn.compile(src, backend=backend)
        except SpattnError as e:
            return f"gmode:{seed} {desc} (refused at compile: {str(e).splitlines()[0][:80]})"
    else:
        desc, pat, N = _grid_pattern(r, backend)
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2, 3])
    B, D = r.choice([1, 2]), r.choice([16, 16, 24, 32])
    dtype = r.choice(DTYPES)
    form = r.choice(FORMS)
    gather = r.choice(["copy", "kernel", "box", "box", "auto"])
    tiles = r.choice([None, None, (64, 64), (16, 16), (16, 32), (32, 16), (128, 128),
                      (128, 64)])
    env = {"SPATTN_LAYOUT": "on", "SPATTN_LAYOUT_GATHER": gather,
           "SPATTN_BLOCK_M": None if tiles is None else str(tiles[0]),
           "SPATTN_BLOCK_N": None if tiles is None else str(tiles[1])}
    strided = r.choice([None, None, "packed", "every_other"])
    desc = (f"gmode:{seed} {backend} {desc} N={N} B{B}-Hq{Hq}-Hk{Hk}-D{D} {dtype} "
            f"form={form} gather={gather} tiles={tiles} strided={strided}")
    LAST["desc"] = desc
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hk, N, N, D, dtype, strided=strided)
    old = _env(env)
    try:
        got, do, dlse = _run(form, pat, q, k, v, g, r.random() < 0.3)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    _check(desc, pat, q, k, v, got, do, dtype, dlse=dlse)
    return desc


def box_case(seed: int) -> str:
    """``SPATTN_LAYOUT_GATHER=box`` where the boxes can be read: a neighbourhood of 1 to 3
    axes without residue classes or extra tokens (sometimes composed with another
    pattern), the forward tiles given or not, tensors contiguous, transposed ``[B, N, H,
    D]``, packed or strided; the backward through copies or row tables (the cost
    constant ``rows_factor`` set to make the drawn way the cheaper)."""
    r = random.Random(seed)
    nd = r.choice([1, 2, 2, 3])
    shape = tuple(r.randint(2, 40 if nd == 1 else (14 if nd == 2 else 6)) for _ in range(nd))
    ks = tuple(r.randint(1, n) for n in shape)
    st = tuple(r.randint(1, kk) for kk in ks)
    ca = tuple(r.random() < 0.3 for _ in shape)
    pat = spattn.neighborhood(shape, ks, st, 1, ca, backend="triton")
    desc = f"neighborhood({shape}, {ks}, {st}, 1, {ca})"
    if r.random() < 0.3:
        src = f"({pat.source}) & ({r.choice(['causal', 'k != q', 'q - k <= 40'])})"
        pat, desc = spattn.compile(src, backend="triton"), repr(src)
    N = 1
    for n in shape:
        N *= n
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    B, D = r.choice([1, 2]), r.choice([16, 16, 32])
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    tiles = r.choice([None, None, (16, 16), (16, 32), (32, 16), (32, 32), (64, 64)])
    memory = r.choice(["contiguous", "contiguous", "bshd", "packed", "every_other"])
    form = r.choice(FORMS)
    backward = r.choice(["copy", "kernel"])
    desc = (f"box:{seed} triton {desc} N={N} B{B}-Hq{Hq}-Hk{Hk}-D{D} {dtype} form={form} "
            f"tiles={tiles} memory={memory} backward={backward}")
    LAST["desc"] = desc
    g = torch.Generator().manual_seed(seed)
    if memory == "bshd":
        ts = [torch.randn(B, N, h, D, generator=g, dtype=torch.float64).to(dtype)
              .transpose(1, 2).requires_grad_() for h in (Hq, Hk, Hk)]
        q, k, v = ts
    else:
        (q, k, v), _ = _tensors(g, B, Hq, Hk, N, N, D, dtype,
                                strided=None if memory == "contiguous" else memory)
    env = {"SPATTN_LAYOUT": "on", "SPATTN_LAYOUT_GATHER": "box",
           "SPATTN_BLOCK_M": None if tiles is None else str(tiles[0]),
           "SPATTN_BLOCK_N": None if tiles is None else str(tiles[1])}
    old = _env(env)
    try:
        with cost_constants("cpu", rows_factor=-0.5 if backward == "kernel" else 1e9):
            got, do, dlse = _run(form, pat, q, k, v, g, r.random() < 0.3)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    _check(desc, pat, q, k, v, got, do, dtype, dlse=dlse)
    return desc


# ------------------------------------------------------------------ row terms, outer factors

ROW_TERMS = ["w[h, q]", "t[h]", "u[q]", "log(float(max(q - R, 0)))", "log(float(q % 3))",
             "log(float(max(h - 1, 0)))", "-0.5 * float(q)", "float(h) * 0.25",
             "c * t[h]", "log(float(max(Lk - 1 - q, 0)))", "(if q % 2 == 0 then -3.0 else 1.0)",
             "m[h] * float(q - R)"]
FACTORS = ["2.0", "0.5", "-0.5", "-2.0", "0.0", "c", "t[h]", "1e-3", "3.0", "-1.0"]


def _row_score(r: random.Random) -> str:
    kind = r.randrange(8)
    rt = lambda: r.choice(ROW_TERMS)  # noqa: E731
    f = lambda: r.choice(FACTORS)  # noqa: E731
    if kind == 0:
        return f"s + {rt()}"
    if kind == 1:
        return f"{f()} * s + {rt()}"
    if kind == 2:
        return f"{f()} * (s + {rt()})"
    if kind == 3:
        return f"{f()} * s"
    if kind == 4:
        return f"{f()} * tanh(s / 3.0) + {rt()}"
    if kind == 5:
        return f"alibi(m[h]) + {rt()}"
    if kind == 6:
        return f"{f()} * s + rel[h, clamp(q - k + R, 0, 7)] + {rt()}"
    return f"s * {f()} * {f()} + {rt()} + {rt()}"


def rowscore_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "triton", "triton"])
    score = _row_score(r)
    mask = r.choice(["causal", "full", "window(4)", "causal & window(6)", "k >= Lk - 5",
                     rand_mask(r)])
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2, 3])
    B, Lq, Lk, D = r.choice([1, 2]), r.randint(1, 40), r.randint(1, 40), r.choice([16, 24])
    q_offset = r.choice([None, None, 0, r.randint(-5, 45)])
    R = r.randint(0, 12)
    dtype = r.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    form = r.choice(["call", "call", "plan", "bshd", "functional", "module", "det"])
    c = r.choice([0.75, -1.5, 0.0, 2.0])
    params = {n: val for n, val in (("R", R), ("c", c),
                                    ("m", [0.5, -0.25, 0.125, 2.0, 1.0, 0.0][:Hq]))
              if n in _names(score)}
    desc = (f"rowscore:{seed} {backend} mask={mask!r} score={score!r} params={params} "
            f"B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-Lk{Lk}-D{D} q_offset={q_offset} {dtype} form={form}")
    LAST["desc"] = desc
    try:
        pat = spattn.compile(mask, score=score, backend=backend, **params)
    except SpattnError as e:
        return desc + f" (refused at compile: {str(e).splitlines()[0][:80]})"
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hk, Lq, Lk, D, dtype,
                            strided=r.choice([None, None, "every_other"]))
    npos = Lk + Lq + 60
    shapes = {"w": (Hq, npos), "t": (Hq,), "u": (npos,), "rel": (Hq, 8)}
    tabs = {n: torch.randn(shapes[n], generator=g, dtype=torch.float64).to(
        r.choice([dtype, torch.float32])).requires_grad_(True)
        for n in pat.score_inputs}
    try:
        got, do, dlse = _run(form, pat, q, k, v, g, r.random() < 0.3, q_offset=q_offset,
                             **tabs)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    _check(desc, pat, q, k, v, got, do, dtype, q_offset=q_offset, inputs=tabs, dlse=dlse)
    return desc


def slayout_case(seed: int) -> str:
    """A scored neighbourhood in its layout (``runtime.scores.LayoutRun``)."""
    r = random.Random(seed)
    nd = r.choice([1, 2, 2, 3])
    shape = tuple(r.randint(2, 30 if nd == 1 else (12 if nd == 2 else 5)) for _ in range(nd))
    ks = tuple(r.randint(1, n) for n in shape)
    dil = tuple(r.choice([1, 1, 2]) if k * 2 <= n else 1 for k, n in zip(ks, shape))
    st = tuple(r.randint(1, k) for k in ks)
    ca = tuple(r.random() < 0.3 for _ in shape)
    backend = r.choice(["torch", "triton"])
    N, strides = 1, []
    for n in reversed(shape):
        strides.insert(0, N)
        N *= n
    coords = [f"(q // {s}) % {n}" if i else f"q // {s}" for i, (s, n) in
              enumerate(zip(strides, shape))]
    kcoords = [c.replace("q", "k") for c in coords]
    terms = []
    a = r.randrange(nd)
    off = f"{coords[a]} - {kcoords[a]} + {shape[a] - 1}"
    terms.append(r.choice([f"rpb[h, {off}]", f"rpb[h, {off}] * 0.5",
                           f"rpb[h, {coords[0]} - {kcoords[0]} + {shape[0] - 1}, "
                           f"{coords[-1]} - {kcoords[-1]} + {shape[-1] - 1}]"]))
    terms += r.sample(["softcap(3.0) - s", "0.05 * float(q - k)",
                       f"(if {coords[-1]} == {kcoords[-1]} then 0.5 else 0.0)", "t[h]"],
                      r.randint(0, 2))
    score = " + ".join(["s"] + terms)
    mask_extra = r.choice([None, None, "causal", "sink(3)", "k != q"])
    pat = spattn.neighborhood(shape, ks, st, dil, ca) & spattn.compile(
        "true", score=score, backend=backend)
    if mask_extra:
        pat = (pat & mask_extra) if mask_extra != "sink(3)" else (pat | mask_extra)
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    B, D = r.choice([1, 2]), r.choice([16, 32])
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16])
    form = r.choice(["call", "call", "call", "plan", "bshd", "functional", "module", "det"])
    desc = (f"slayout:{seed} {backend} neighborhood({shape}, {ks}, {st}, {dil}, {ca}) "
            f"mask+={mask_extra!r} score={score!r} N={N} B{B}-Hq{Hq}-Hk{Hk}-D{D} {dtype} "
            f"form={form}")
    LAST["desc"] = desc
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hk, N, N, D, dtype, strided=None)
    shapes = {"t": (Hq,)}
    if "rpb[h, " in score and score.count("rpb[h, ") and ", " in score.split("rpb[h, ")[1] \
            .split("]")[0]:
        shapes["rpb"] = (Hq, 2 * shape[0] - 1, 2 * shape[-1] - 1)
    else:
        shapes["rpb"] = (Hq, 2 * shape[a] - 1)
    tabs = {n: torch.randn(shapes[n], generator=g, dtype=torch.float64).to(
        r.choice([dtype, torch.float32])).requires_grad_(True) for n in pat.score_inputs}
    old = _env({"SPATTN_LAYOUT": "on"})
    try:
        got, do, dlse = _run(form, pat, q, k, v, g, r.random() < 0.3, **tabs)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    _check(desc, pat, q, k, v, got, do, dtype, inputs=tabs, dlse=dlse)
    ran = [run for run in pat._layouts.values() if run is not None]
    return desc + (" [layout]" if ran else " [sequence]")


def _det_call(pat, q, k, v, *, q_offset=None, **tabs):
    """A call whose tables' gradients are summed in a fixed order (``deterministic``)."""
    return pat(q, k, v, return_lse=True, q_offset=q_offset, deterministic=True, **tabs)


def _names(src: str) -> set:
    import re
    return set(re.findall(r"[A-Za-z_]\w*", src))


# ------------------------------------------------------------------ unsigned ranges

BIG = 2 ** 31


def _bound(r: random.Random) -> int:
    return r.choice([r.randint(-40, 40), r.randint(-40, 40), BIG - r.randint(1, 50),
                     -BIG + r.randint(0, 50), BIG + r.randint(-3, 3), -BIG - r.randint(0, 3),
                     r.randint(-BIG, BIG), 2 ** 30 + r.randint(-5, 5), 0])


def urange_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["triton", "triton", "triton", "torch"])
    x = r.choice(["q - k", "k - q", "k + C", "q + k", "2 * q - k", "q - C", "k - C",
                  "q + C", "(q - k) // 3", "q - k - C", "3 * k - q + C"])
    lo, hi = _bound(r), _bound(r)
    if r.random() < 0.6:
        lo, hi = min(lo, hi), max(lo, hi)
    if r.random() < 0.3:
        hi = lo + r.randint(0, 30)
    C = r.choice([0, 5, BIG - r.randint(1, 60), -BIG + r.randint(0, 60), 2 ** 30])
    form = r.choice([f"{x} >= A & {x} <= Z", f"A <= {x} & {x} <= Z",
                     f"({x} >= A & {x} <= Z) | k == 0", f"causal & {x} >= A & {x} <= Z",
                     f"~({x} >= A & {x} <= Z)"])
    B, Hq, D = r.choice([1, 2]), r.choice([1, 2]), 16
    Lk = r.randint(1, 70)
    Lq = r.choice([Lk, r.randint(1, 70), r.randint(1, Lk)])
    if r.random() < 0.25:       # a decode-sized call (routed to the decode kernel)
        Lq, Lk = r.randint(1, 16), r.randint(256, 400)
    q_offset = r.choice([None, None, 0, r.randint(-10, 80), BIG - r.randint(1, 200),
                         2 ** 30 + r.randint(0, 50)])
    desc = (f"urange:{seed} {backend} {form!r} A={lo} Z={hi} C={C} B{B}-Hq{Hq}-Lq{Lq}-Lk{Lk} "
            f"q_offset={q_offset}")
    LAST["desc"] = desc
    try:
        pat = spattn.compile(form, backend=backend,
                             **{n: val for n, val in (("A", lo), ("Z", hi), ("C", C))
                                if n in _names(form)})
    except SpattnError as e:
        return desc + f" (refused at compile: {str(e).splitlines()[0][:80]})"
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hq, Lq, Lk, D, torch.float32)
    try:
        got, do, dlse = _run("call", pat, q, k, v, g, False, q_offset=q_offset)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    _check(desc, pat, q, k, v, got, do, torch.float32, q_offset=q_offset)
    return desc


# ------------------------------------------------------------------ per-batch patterns

def _batch_pattern(r: random.Random, B: int, Hq: int, Lk: int, g) -> tuple:
    """(source, runtime inputs) of a random pattern that depends on the batch element."""
    W = r.randint(1, 80)
    first = torch.tensor([r.choice([0, 0, r.randint(0, Lk), Lk + r.randint(0, 3)])
                          for _ in range(B)])
    atom, ins = r.choice([
        ("k >= first[b]", {"first": first}),
        ("k >= first[b] & k != first[b] + 2", {"first": first}),
        ("keep[b, k]", {"keep": torch.rand(B, Lk, generator=g) < r.choice([0.3, 0.9])}),
        ("keep[b, h, k]", {"keep": torch.rand(B, Hq, Lk, generator=g) < 0.8}),
        ("same(doc)", {"doc": (torch.rand(B, Lk, generator=g) < 0.05).cumsum(-1)}),
        ("q - k <= w[b]", {"w": torch.randint(0, 60, (B,), generator=g)}),
        ("b == 1 | k % 3 != 0", {}),
    ])
    base = r.choice(["causal", "causal", f"causal & window({W})", f"q - k >= -{W % 7}",
                     "true", f"causal & (window({W}) | k < 3)", f"k % {r.randint(2, 5)} != 1"])
    return f"{base} & {atom}", ins


def pbatch_case(seed: int) -> str:
    """A pattern that depends on the batch element (paddings, per-element key masks and
    documents, a per-element width, ``b`` itself) on the torch backend: one call through a
    random form (the CPU plan's one item per element where it chooses it), or, with one
    query row, the steps of a growing cache (the decode path's batched steps and their
    kept masks)."""
    r = random.Random(seed)
    B, Hk = r.choice([2, 2, 3, 4]), r.choice([1, 2, 3])
    Hq = Hk * r.choice([1, 2, 4])
    D = r.choice([16, 24])
    dtype = r.choice(DTYPES)
    grow = r.random() < 0.35
    Lk = r.randint(256, 420) if grow else r.randint(1, 300)
    g = torch.Generator().manual_seed(seed)
    src, ins = _batch_pattern(r, B, Hq, Lk, g)
    pat_desc = f"{src!r} inputs={ {n: tuple(t.shape) for n, t in ins.items()} }"
    if grow:
        desc = f"pbatch:{seed} grow {pat_desc} B{B}-Hq{Hq}-Hk{Hk}-Lk{Lk}-D{D} {dtype}"
        LAST["desc"] = desc
        pat = spattn.compile(src, backend="torch")
        cap = Lk + 40
        k, v = (torch.randn(B, Hk, cap, D, generator=g, dtype=torch.float64).to(dtype)
                for _ in range(2))
        full = {n: (t if t.dim() == 1 or t.shape[-1] != Lk else
                    torch.cat([t, t[..., -1:].expand(*t.shape[:-1], 40)], -1))
                for n, t in ins.items()}
        for L in sorted({Lk, Lk + 1, Lk + 2, Lk + r.randint(3, 40), Lk + 1}):
            q = torch.randn(B, Hq, 1, D, generator=g, dtype=torch.float64).to(dtype)
            step = {n: (t[..., :L] if t.dim() > 1 and t.shape[-1] == cap else t)
                    for n, t in full.items()}
            try:
                o, lse = pat(q, k[:, :, :L], v[:, :, :L], return_lse=True, **step)
            except SpattnError as e:
                return desc + f" (refused: {str(e).splitlines()[0][:100]})"
            mask = pat.mask(1, L, num_heads=Hq, batch=B, **step)
            from spattn.runtime.reference import attention_reference
            ro, rl = attention_reference(q.double(), k[:, :, :L].double(),
                                         v[:, :, :L].double(), mask)
            _close(f"{desc} L={L} o", o, ro, atol=_tol(dtype))
            seen = mask.expand(B, Hq, 1, L).any(-1)
            _close(f"{desc} L={L} lse", lse[seen], rl[seen], atol=_tol(dtype))
            assert bool(torch.isneginf(lse[~seen]).all()), f"{desc} L={L}: lse of empty rows"
        return desc
    shape = r.choice(["self", "self", "fewer", "offset"])
    Lq, q_offset = Lk, None
    if shape == "fewer":
        Lq = r.randint(1, Lk)
    elif shape == "offset":
        Lq = r.randint(1, 80)
        q_offset = r.randint(0, Lk + 10)
    form = r.choice(FORMS)
    strided = r.choice([None, None, "every_other", "packed"])
    desc = (f"pbatch:{seed} {pat_desc} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-Lk{Lk}-D{D} "
            f"q_offset={q_offset} {dtype} form={form} strided={strided}")
    LAST["desc"] = desc
    pat = spattn.compile(src, backend="torch")
    (q, k, v), _ = _tensors(g, B, Hq, Hk, Lq, Lk, D, dtype, strided=strided)
    try:
        got, do, dlse = _run(form, pat, q, k, v, g, r.random() < 0.3, q_offset=q_offset,
                             **ins)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    _check(desc, pat, q, k, v, got, do, dtype, q_offset=q_offset, inputs=ins, dlse=dlse)
    return desc


KINDS = {"horder": horder_case, "gmode": gmode_case, "box": box_case,
         "rowscore": rowscore_case, "urange": urange_case, "slayout": slayout_case,
         "pbatch": pbatch_case}


def main():
    args = search.parser(__doc__, KINDS).parse_args()
    warnings.simplefilter("ignore")
    _record_plans()
    refused = collections.Counter()

    def passed(kind, desc):
        refused[kind, "refused" in desc or "skipped" in desc] += 1
        REACHED[kind].update(f"{c}/{gm}" for c, gm in BUILT)

    def summary(kinds):
        for kind in kinds:
            print(f"  {kind}: {refused[kind, False]} run, {refused[kind, True]} refused; plans "
                  f"{dict(REACHED[kind])}")

    search.run(args, KINDS, LAST, search.Hooks(extra=lambda: str(BUILT) if BUILT else "",
                                               begin=BUILT.clear, passed=passed, summary=summary))


if __name__ == "__main__":
    main()
