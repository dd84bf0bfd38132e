"""Adversarial random search, second series: the token layouts around a grid, a caller's
order, the call forms and keywords, routed decode calls and scored plans, against the
float64 reference.

Kinds (each case drawn from one integer seed; replay with ``--case KIND:SEED``):

* ``grid``: a grid pattern (``spattn.neighborhood`` with extra tokens before and after,
  a declared ``grid (...) after T before U`` program, a flattened expression after text
  tokens, each possibly composed with ``causal``, a window or a sink), ``SPATTN_LAYOUT``
  on, auto or off, random ``B, Hq, Hk, D`` and dtype, called through one of the call
  forms (``pat(...)``, a plan, ``layout="bshd"``, ``spattn.attention``,
  ``SparseAttention``): output, lse and the gradients of q, k, v; the permuted plans'
  tokens copied or addressed through row tables (``SPATTN_LAYOUT_GATHER``, also in
  ``order`` and ``disc``).
* ``order``: a random pattern (a random mask, a grid pattern, documents read from a
  runtime input) run in a random caller's order (``[L]``, ``[1, L]`` or ``[B, L]``; random,
  the identity, reversed, or a box order) through each call form.
* ``route``: a decode-sized call ``pat(q, k, v)`` (``Lq <= 16``, ``Lk >= 256``) that the
  runtime routes to the decode path, with documents, windows, sinks, GQA, ``q_offset``.
* ``splan``: a scored pattern through a plan (``p.plan`` then ``p(..., plan=plan)`` with
  fresh tables), ``bshd``, the functional form, T5 buckets and ALiBi: gradients of the
  tables too.

Run from the repository root::

    TRITON_INTERPRET=1 python -m tests.helpers.adversarial2 --minutes 10 --seed 1
"""
from __future__ import annotations

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
from spattn.nn import SparseAttention  # noqa: E402
from spattn.runtime.reference import attention_reference, pattern_reference  # noqa: E402

from tests.helpers.adversarial import _close, rand_bool, rand_mask  # noqa: E402
from tests.helpers.kernels import paged_cache  # noqa: E402
from tests.helpers import search  # noqa: E402

warnings.simplefilter("ignore")
LAST = {"desc": ""}
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16]
DIMS = [16, 16, 17, 24, 32, 40]


def _tol(dtype):
    return {torch.bfloat16: 3e-2, torch.float16: 4e-3}.get(dtype, 5e-4)


def _grid_pattern(r: random.Random, backend: str):
    """``(description, pattern, N)`` of a random grid pattern with extra tokens."""
    kind = r.randrange(4)
    if kind == 0:
        nd = r.choice([1, 2, 2, 3])
        shape = tuple(r.randint(2, 9 if nd < 3 else 5) for _ in range(nd))
        ks, st, dl, ca = [], [], [], []
        for n in shape:
            d = r.choice([1, 1, 2, 3]) if n >= 4 else 1
            kk = r.randint(1, max(1, n // d))
            ks.append(kk)
            dl.append(d)
            st.append(r.randint(1, kk))
            ca.append(r.random() < 0.3)
        T, U = r.choice([0, 0, 1, 3, 7]), r.choice([0, 0, 1, 5])
        args = (shape, tuple(ks), tuple(st), tuple(dl), tuple(ca))
        p = spattn.neighborhood(*args, extra_before=T, extra_after=U, backend=backend)
        N = T + U
        cells = 1
        for n in shape:
            cells *= n
        desc = f"neighborhood{args} before={T} after={U}"
        if r.random() < 0.35:
            extra = r.choice(["causal", "window(3)", "k < 2", "q % 2 == 0", "~(k == q)"])
            src = f"({p.source}) {r.choice(['&', '|'])} ({extra})"
            desc += f" composed {src!r}"
            p = spattn.compile(src, backend=backend)
        return desc, p, N + cells
    if kind == 1:
        R, C = r.randint(1, 7), r.randint(1, 9)
        T, U = r.choice([0, 1, 3, 6]), r.choice([0, 1, 4])
        rr = r.randint(0, 2)
        body = r.choice([
            "text(k) | (~text(q) & ~text(k) & abs(row(q) - row(k)) <= r & abs(col(q) - col(k)) <= r)",
            "(text(q) & k <= q) | (~text(q) & (text(k) | abs(row(q) - row(k)) <= r & abs(col(q) - col(k)) <= r))",
            "((text(q) | answer(q)) & k <= q) | (patch(q) & (text(k) | patch(k) & abs(row(q) - row(k)) <= r & abs(col(q) - col(k)) <= r))",
            "patch(q) & patch(k) & row(q) == row(k)",
            "abs(col(q) - col(k)) <= r & k <= q",
            "col(q) == col(k) | answer(k)",
        ])
        grid = f"grid (row: {R}, col: {C})"
        if T:
            grid += f" after {T}"
        if U:
            grid += f" before {U}"
        src = (f"param r = {rr}\n{grid}\ndef text(x) = x < {T}\n"
               f"def answer(x) = x >= {T + R * C}\ndef patch(x) = ~text(x) & ~answer(x)\n"
               f"pattern p = {body}\n")
        return f"program {src!r}", spattn.compile(src, backend=backend), T + R * C + U
    if kind == 2:
        T, W, Hg = r.randint(0, 9), r.randint(2, 8), r.randint(2, 7)
        ry, rx = r.randint(0, 2), r.randint(0, 2)
        src = (f"k < {T} | (q >= {T} & abs((q - {T}) // {W} - (k - {T}) // {W}) <= {ry} & "
               f"abs((q - {T}) % {W} - (k - {T}) % {W}) <= {rx})")
        if r.random() < 0.4:
            src = f"({src}) & causal"
        U = r.choice([0, 0, 3])
        if U:
            src = f"(({src}) & q < {T + W * Hg} & k < {T + W * Hg}) | (q >= {T + W * Hg} & k <= q)"
        return f"{src!r}", spattn.compile(src, backend=backend), T + W * Hg + U
    # dilated / strided flattened forms
    n = r.randint(2, 6)
    src = r.choice([f"dilated({r.randint(2, 9)}, {n})", f"(q - k) % {n} == 0 & causal",
                    f"abs(q // {n} - k // {n}) <= 1 & q % {n} == k % {n}"])
    return f"{src!r}", spattn.compile(src, backend=backend), n * r.randint(2, 12)


def _call(form: str, pat, q, k, v, *, return_lse=True, order=None, q_offset=None, **inputs):
    """Run ``pat`` through one call form; q, k, v are bhsd; returns bhsd (o, lse)."""
    if form == "bshd":
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        o, lse = pat(qt, kt, vt, layout="bshd", return_lse=True, order=order,
                     q_offset=q_offset, **inputs)
        assert o.shape == qt.shape, f"bshd output shape {tuple(o.shape)}"
        return o.transpose(1, 2), lse
    if form == "plan":
        plan = pat.plan(q, k, v, order=order, q_offset=q_offset, **inputs)
        scored = {n: t for n, t in inputs.items() if n in (pat.score_inputs or {})}
        return pat(q, k, v, plan=plan, return_lse=True, **scored)
    if form == "functional":
        return spattn.attention(q, k, v, pattern=pat, return_lse=True, order=order,
                                q_offset=q_offset, **inputs)
    if form == "module":
        return SparseAttention(pat, backend=pat.backend)(q, k, v, q_offset, order=order,
                                                          return_lse=True, **inputs)
    return pat(q, k, v, return_lse=True, order=order, q_offset=q_offset, **inputs)


FORMS = ["call", "call", "plan", "bshd", "functional", "module"]


def _check(desc, pat, q, k, v, got, do, dtype, q_offset=None, inputs=None, grads=True,
           dlse=None):
    inputs = inputs or {}
    B, Hq, Lq, _ = q.shape
    rl = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    tabs = {n: t.detach().double().requires_grad_(True) for n, t in inputs.items()
            if n in (pat.score_inputs or {})}
    ints = {n: t for n, t in inputs.items() if n not in tabs}
    G = Hq // k.shape[1]
    if pat.score is None:
        kx, vx = (t.repeat_interleave(G, 1) for t in rl[1:])
        m = pat.mask(Lq, k.shape[2], num_heads=Hq, batch=B, q_offset=q_offset, **ints)
        ro, rlse = attention_reference(rl[0], kx, vx, m)
    else:
        ro, rlse = pattern_reference(pat, *rl, q_offset=q_offset, **ints, **tabs)
    o, lse = got[:2]
    tol = _tol(dtype)
    _close(f"{desc} o", o, ro, atol=tol)
    _close(f"{desc} lse", lse, rlse, atol=tol * 4)
    if not grads:
        return
    leaves = rl + list(tabs.values())
    loss = (ro * do.double()).sum()
    if dlse is not None:
        fin = torch.isfinite(rlse)
        loss = loss + (torch.where(fin, rlse, 0.0) * dlse.double()).sum()
    want = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = ["dq", "dk", "dv", *(f"d{n}" for n in tabs)]
    for n, a, b, leaf in zip(names, got[2:], want, leaves):
        if n not in ("dq", "dk", "dv") and dtype != torch.float32 and "(q - k)" in pat.source:
            continue    # a table times positions: delta from a 16-bit o, amplified by q - k
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        scale = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
        _close(f"{desc} {n}", a, b, atol=tol * 5 * scale)


def _gather(seed: int) -> str:
    """``SPATTN_LAYOUT_GATHER`` of a case, drawn apart from its other draws (a seed found
    before the setting existed replays the same case)."""
    return random.Random(~seed).choice(["copy", "kernel"])


def _env(values: dict):
    old = {n: os.environ.get(n) for n in values}
    for n, v in values.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v
    return old


def _tensors(g, B, Hq, Hk, Lq, Lk, D, dtype, grad=True, strided=None):
    """q, k, v ``[B, H, L, D]``; ``strided``: views of larger tensors (a packed ``[B, L,
    H, 3, D]`` projection, or every other row of a longer sequence) instead of contiguous
    leaves (the leaves are then the views' bases, made ``requires_grad``)."""
    if strided == "packed" and Lq == Lk and Hq == Hk:
        base = torch.randn(B, Lq, Hq, 3, D + 3, generator=g, dtype=torch.float64).to(dtype)
        base.requires_grad_(grad)
        views = [base[:, :, :, i, 1:D + 1].transpose(1, 2) for i in range(3)]
        return views, [base]
    if strided == "every_other":
        bases = [torch.randn(B, H, 2 * L, D, generator=g, dtype=torch.float64).to(dtype)
                 .requires_grad_(grad) for H, L in ((Hq, Lq), (Hk, Lk), (Hk, Lk))]
        return [b[:, :, ::2] for b in bases], bases
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(2))
    ts = [t.requires_grad_(grad) for t in (q, k, v)]
    return ts, ts


def grid_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    desc, pat, N = _grid_pattern(r, backend)
    Hk = r.choice([1, 2, 3])
    Hq = Hk * r.choice([1, 2, 3])
    B, D = r.choice([1, 2, 3]), r.choice(DIMS)
    dtype = r.choice(DTYPES)
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32
    form = r.choice(FORMS)
    layout = r.choice(["on", "on", "auto", "off"])
    desc = (f"grid:{seed} {backend} {desc} N={N} B{B}-Hq{Hq}-Hk{Hk}-D{D} {dtype} "
            f"form={form} layout={layout}")
    LAST["desc"] = desc
    g = torch.Generator().manual_seed(seed)
    strided = r.choice([None, None, "packed", "every_other"])
    (q, k, v), leaves = _tensors(g, B, Hq, Hk, N, N, D, dtype, strided=strided)
    dlse = torch.randn(B, Hq, N, generator=g) if r.random() < 0.3 else None
    gather = _gather(seed)
    desc += f" strided={strided} dlse={dlse is not None} gather={gather}"
    LAST["desc"] = desc
    old = _env({"SPATTN_LAYOUT": layout, "SPATTN_LAYOUT_GATHER": gather})
    try:
        o, lse = _call(form, pat, q, k, v)
        do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)
        got = [o, lse, *_grads(o, lse, (q, k, v), do, dlse)]
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    _check(desc, pat, q, k, v, got, do, dtype, dlse=dlse)
    return desc


def _grads(o, lse, xs, do, dlse):
    """dq, dk, dv of ``(o * do).sum() + (lse * dlse).sum()`` (the views' gradients)."""
    xs = list(xs)
    for x in xs:
        x.retain_grad()
    loss = (o.float() * do.float()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse).sum()
    gs = torch.autograd.grad(loss, xs, allow_unused=True)
    return list(gs)


def _order(r: random.Random, g, B, L, pat):
    kind = r.choice(["random", "random", "identity", "reverse", "box", "batch"])
    if kind == "identity":
        perm = torch.arange(L)
    elif kind == "reverse":
        perm = torch.arange(L - 1, -1, -1)
    elif kind == "box" and getattr(pat, "grid", None) is not None and len(pat.grid) == 2 \
            and not pat.grid_offset and not pat.grid_suffix:
        R, C = pat.grid
        by, bx = r.choice([1, 2, 4]), r.choice([1, 2, 4])
        idx = torch.arange(L).view(R, C)
        tiles = []
        for y in range(0, R, by):
            for x in range(0, C, bx):
                tiles.append(idx[y:y + by, x:x + bx].reshape(-1))
        perm = torch.cat(tiles)
    elif kind == "batch":
        perm = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    else:
        perm = torch.randperm(L, generator=g)
    dt = r.choice([torch.int64, torch.int64, torch.int32, torch.int16])
    if L > 30000:
        dt = torch.int64
    if r.random() < 0.2 and perm.dim() == 1:
        perm = perm[None]
    return kind, perm.to(dt)


def order_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    inputs_kind = None
    if r.random() < 0.45:
        pdesc, pat, L = _grid_pattern(r, backend)
    else:
        L = r.randint(1, 48)
        src = rand_mask(r)
        if r.random() < 0.3:
            src = f"({src}) & same(doc)" if r.random() < 0.5 else "causal & same(doc)"
            inputs_kind = "doc"
        pdesc = repr(src)
        try:
            pat = spattn.compile(src, backend=backend)
        except SpattnError:
            return f"order:{seed} {pdesc} (refused at compile)"
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2, 3])
    B, D = r.choice([1, 2, 3]), r.choice(DIMS)
    dtype = r.choice(DTYPES)
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32
    form = r.choice(FORMS)
    g = torch.Generator().manual_seed(seed)
    okind, perm = _order(r, g, B, L, pat)
    desc = (f"order:{seed} {backend} {pdesc} L={L} B{B}-Hq{Hq}-Hk{Hk}-D{D} {dtype} "
            f"form={form} order={okind} {tuple(perm.shape)} {perm.dtype}")
    LAST["desc"] = desc
    strided = r.choice([None, None, "packed", "every_other"])
    (q, k, v), _ = _tensors(g, B, Hq, Hk, L, L, D, dtype, strided=strided)
    dlse = torch.randn(B, Hq, L, generator=g) if r.random() < 0.3 else None
    layout = r.choice([None, "on"])
    gather = _gather(seed)
    desc += f" strided={strided} dlse={dlse is not None} layout={layout} gather={gather}"
    LAST["desc"] = desc
    inputs = {}
    if inputs_kind == "doc":
        if r.random() < 0.5:
            inputs["doc"] = torch.sort(torch.randint(0, 4, (L,), generator=g)).values
        else:
            inputs["doc"] = torch.randint(0, 3, (B, L), generator=g)
    old = _env({"SPATTN_LAYOUT": layout, "SPATTN_LAYOUT_GATHER": gather})
    try:
        o, lse = _call(form, pat, q, k, v, order=perm, **inputs)
        do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)
        got = [o, lse, *_grads(o, lse, (q, k, v), do, dlse)]
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    _check(desc, pat, q, k, v, got, do, dtype, inputs=inputs, dlse=dlse)
    return desc


ROUTE_MASKS = ["causal", "causal & window(W)", "causal & (window(W) | sink(4))",
               "causal & same(doc)", "same(doc) & k <= q & q - k < W", "chunked(W) & causal",
               "full", "k >= Lk - W", "causal & keep[k]", "q % 2 == 0 & causal",
               "causal & k % 3 != 0"]


def route_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    W = r.randint(1, 300)
    src = r.choice(ROUTE_MASKS).replace("W", str(W))
    if r.random() < 0.2:
        src = rand_bool(r, 2)
    Hk = r.choice([1, 2, 3])
    Hq = Hk * r.choice([1, 2, 4])
    B, Lq, D = r.choice([1, 2, 3]), r.randint(1, 16), r.choice(DIMS)
    Lk = r.randint(256, 700)
    q_offset = r.choice([None, None, Lk - Lq, Lk - Lq - r.randint(0, 40), r.randint(0, Lk)])
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    layout = r.choice(["bhsd", "bhsd", "bshd"])
    desc = (f"route:{seed} {backend} {src!r} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-Lk{Lk}-D{D} "
            f"q_offset={q_offset} {dtype} {layout}")
    LAST["desc"] = desc
    try:
        pat = spattn.compile(src, backend=backend)
    except SpattnError:
        return desc + " (refused at compile)"
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hk, Lq, Lk, D, dtype, grad=False,
                            strided=r.choice([None, None, "every_other"]))
    inputs = {}
    if "doc" in pat.inputs:
        inputs["doc"] = torch.sort(torch.randint(0, 5, (Lk,), generator=g)).values
        if r.random() < 0.4:
            inputs["doc"] = torch.sort(torch.randint(0, 5, (B, Lk), generator=g), dim=1).values
    if "keep" in pat.inputs:
        inputs["keep"] = torch.randint(0, 2, (Lk,), generator=g)
    try:
        if layout == "bshd":
            o, lse = pat(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         layout="bshd", return_lse=True, q_offset=q_offset, **inputs)
            o = o.transpose(1, 2)
        elif r.random() < 0.5:
            o, lse = pat(q, k, v, return_lse=True, q_offset=q_offset, **inputs)
        else:
            o = pat(q, k, v, q_offset=q_offset, **inputs)
            lse = None
            o2 = pat(q, k, v, q_offset=q_offset, **inputs)       # the fast entry's repeat
            assert torch.equal(o, o2), f"{desc}: a repeated call differs"
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    m = pat.mask(Lq, Lk, num_heads=Hq, batch=B, q_offset=q_offset, **inputs)
    kx, vx = (t.double().repeat_interleave(Hq // Hk, 1) for t in (k, v))
    ro, rlse = attention_reference(q.double(), kx, vx, m)
    _close(f"{desc} o", o, ro, atol=_tol(dtype))
    if lse is not None:
        _close(f"{desc} lse", lse, rlse, atol=_tol(dtype) * 4)
    return desc


SCORES = ["s + bias[h, t5_bucket(8, 20)]", "s + bias[h, t5_bucket_causal(8, 16)]",
          "alibi(m[h])", "alibi(alibi_slope)", "softcap(c)", "s + rel[h, clamp(q - k, 0, 7)]",
          "softcap(c) + rel[h, clamp(k - q, 0, 7)]", "s * w[h]", "s + w[h] * float(q - k)",
          "(if q - k > 3 then s + rel[h, 7] else s)", "tanh(s) * c + bias[h, t5_bucket(8, 20)]",
          "s + bias[h, log_bucket(abs(q - k), 2, 20, 8)]"]
SHAPES = {"bias": lambda H: (H, 8), "rel": lambda H: (H, 8), "w": lambda H: (H,)}


def splan_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "torch", "triton"])
    score = r.choice(SCORES)
    mask = rand_mask(r) if r.random() < 0.5 else r.choice(
        ["causal", "full", "causal & window(6)", "sink(2) | window(3)", "chunked(5)"])
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    B, Lq, Lk, D = r.choice([1, 2]), r.randint(1, 37), r.randint(1, 37), r.choice(DIMS)
    q_offset = r.choice([None, None, 0, r.randint(-5, 40)])
    dtype = r.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    form = r.choice(["plan", "plan", "bshd", "functional", "module", "call"])
    m = [0.5, -0.25, 0.125, 2.0][:Hq]
    desc = (f"splan:{seed} {backend} mask={mask!r} score={score!r} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}"
            f"-Lk{Lk}-D{D} q_offset={q_offset} {dtype} form={form}")
    LAST["desc"] = desc
    params = {n: v for n, v in (("m", m), ("c", r.choice([0.7, 5.0, 30.0])))
              if f"{n}[" in score or f"({n})" in score or f"* {n}" in score}
    try:
        pat = spattn.compile(mask, score=score, backend=backend, **params)
    except SpattnError:
        return desc + " (refused at compile)"
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hk, Lq, Lk, D, dtype,
                            strided=r.choice([None, None, "packed", "every_other"]))
    tabs = {n: torch.randn(SHAPES[n](Hq), generator=g, dtype=torch.float64).to(dtype)
            .requires_grad_(True) for n in pat.score_inputs}
    try:
        if form == "plan":
            plan = pat.plan(q, k, v, q_offset=q_offset,
                            **{n: t.detach().clone() for n, t in tabs.items()})
            o, lse = pat(q, k, v, plan=plan, return_lse=True, **tabs)
        else:
            o, lse = _call(form, pat, q, k, v, q_offset=q_offset, **tabs)
        do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)
        got = [o, lse, *_grads(o, lse, (q, k, v, *tabs.values()), do, None)]
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    _check(desc, pat, q, k, v, got, do, dtype, q_offset=q_offset, inputs=tabs)
    return desc


def decode_case(seed: int) -> str:
    """``Pattern.decode`` with runtime inputs (documents ``[L]`` or ``[B, L]``, a keep
    mask), per-batch lengths, a contiguous or paged (shuffled, shared-pool) cache, GQA."""
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    W = r.randint(1, 80)
    src = r.choice(["causal & same(doc)", "same(doc) & k <= q & q - k < W",
                    "causal & (window(W) | sink(3)) & keep[k]", "causal & keep[k] | k == 0",
                    "causal & doc[k] <= doc[q]", "(causal & window(W)) | same(doc) & k <= q",
                    "causal & window(W)", "causal & (window(W) | sink(4))"]).replace("W", str(W))
    Hk = r.choice([1, 2, 3])
    Hq = Hk * r.choice([1, 2, 4])
    B, Lq, D = r.choice([1, 2, 3]), r.randint(1, 16), r.choice(DIMS)
    paged = r.choice([0, 0, 8, 16, 64])
    cap = r.randint(Lq, 400)
    if paged:
        cap = -(-cap // paged) * paged
    lens = [r.randint(Lq, cap) for _ in range(B)] if (paged or r.random() < 0.7) else None
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    desc = (f"decode:{seed} {backend} {src!r} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-cap{cap}-D{D} "
            f"lens={lens} paged={paged} {dtype}")
    LAST["desc"] = desc
    pat = spattn.compile(src, backend=backend)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hk, cap, D, generator=g).to(dtype) for _ in range(2))
    inputs = {}
    if "doc" in pat.inputs:
        shape = (cap,) if r.random() < 0.5 else (B, cap)
        inputs["doc"] = torch.sort(torch.randint(0, 4, shape, generator=g), dim=-1).values
    if "keep" in pat.inputs:
        inputs["keep"] = torch.randint(0, 2, (cap,), generator=g).bool() if r.random() < 0.5 \
            else torch.randint(0, 2, (B, cap), generator=g)
    seq = None if lens is None else torch.tensor(lens, dtype=r.choice([torch.int32, torch.int64]))
    try:
        if paged:
            kp, vp, table = paged_cache(k, v, paged, g)
            o, lse = pat.decode(q, kp, vp, seq_lens=seq, page_table=table, return_lse=True,
                                **inputs)
        else:
            o, lse = pat.decode(q, k, v, seq_lens=seq, return_lse=True, **inputs)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    outs, lses = [], []
    for b in range(B):
        L = cap if lens is None else lens[b]
        ins = {n: (t[..., :L] if t.dim() == 1 else t[b:b + 1, :L]) for n, t in inputs.items()}
        m = pat.mask(Lq, L, num_heads=Hq, batch=1, **ins)
        kx, vx = (t[b:b + 1, :, :L].double().repeat_interleave(Hq // Hk, 1) for t in (k, v))
        ro, rlse = attention_reference(q[b:b + 1].double(), kx, vx, m)
        outs.append(ro)
        lses.append(rlse)
    _close(f"{desc} o", o, torch.cat(outs), atol=_tol(dtype))
    _close(f"{desc} lse", lse, torch.cat(lses), atol=_tol(dtype) * 4)
    return desc


def big_case(seed: int) -> str:
    """A grid pattern at 1024 tokens or more on the torch backend with ``SPATTN_LAYOUT``
    auto (the layout the runtime picks by itself), forward and backward."""
    r = random.Random(seed)
    kind = r.randrange(3)
    if kind == 0:
        shape = (r.randint(24, 48), r.randint(24, 48))
        ks = tuple(r.randrange(3, 12, 2) for _ in shape)
        T, U = r.choice([0, 5, 77]), r.choice([0, 0, 9])
        pat = spattn.neighborhood(shape, ks, stride=r.choice([1, 2]),
                                  dilation=r.choice([1, 1, 2]),
                                  is_causal=r.random() < 0.3, extra_before=T, extra_after=U,
                                  backend="torch")
        name, N = f"neighborhood({shape}, {ks}) before={T} after={U}", T + U + shape[0] * shape[1]
    elif kind == 1:
        T, W, Hg, rr = r.choice([0, 13, 77]), r.randint(24, 40), r.randint(30, 40), r.randint(1, 5)
        src = (f"k < {T} | (q >= {T} & k >= {T} & abs((q - {T}) // {W} - (k - {T}) // {W}) <= {rr}"
               f" & abs((q - {T}) % {W} - (k - {T}) % {W}) <= {rr})")
        pat, name, N = spattn.compile(src, backend="torch"), repr(src), T + W * Hg
    else:
        n = r.choice([2, 4, 8])
        src = f"dilated({r.choice([32, 64, 128])}, {n})"
        pat, name, N = spattn.compile(src, backend="torch"), src, n * r.randint(200, 300)
    dtype = r.choice([torch.float32, torch.bfloat16])
    desc = f"big:{seed} torch {name} N={N} {dtype}"
    LAST["desc"] = desc
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, 1, 2, 1, N, N, 16, dtype)
    old = _env({"SPATTN_LAYOUT": "auto"})
    try:
        plan = pat.plan(q, k, v)
        o, lse = pat(q, k, v, plan=plan, return_lse=True)
        do = torch.randn(o.shape, generator=g).to(dtype)
        got = [o, lse, *_grads(o, lse, (q, k, v), do, None)]
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    desc += f" {type(plan).__name__}"
    _check(desc, pat, q, k, v, got, do, dtype)
    return desc


def _grid_atom(r: random.Random, x: str, Ws) -> str:
    W, H = r.choice(Ws), r.choice(Ws)
    T = r.choice([0, 0, 0, 1, 3, W])
    y = f"({x} - {T})" if T else x
    return r.choice([f"{y} // {W}", f"{y} % {W}", f"({y} // {W}) % {H}", f"{y} // {W * H}",
                     x, f"({y} % {W * H}) // {W}"])


def _grid_expr(r: random.Random, Ws, depth: int) -> str:
    if depth == 0 or r.random() < 0.3:
        kind = r.randrange(5)
        if kind == 0:
            a, b = _grid_atom(r, "q", Ws), _grid_atom(r, "k", Ws)
            return f"abs({a} - {b}) <= {r.randint(0, 3)}"
        if kind == 1:
            a = _grid_atom(r, "q", Ws)
            return f"{a} {r.choice(['==', '<=', '>=', '!='])} {_grid_atom(r, 'k', Ws)}"
        if kind == 2:
            return f"(q - k) % {r.choice(Ws)} == {r.randint(0, 2)}"
        if kind == 3:
            return f"{r.choice(['q', 'k'])} {r.choice(['<', '>='])} {r.randint(0, 3 * max(Ws))}"
        return r.choice(["causal", "k <= q", "window(3)", "sink(2)", "q == k"])
    a, b = _grid_expr(r, Ws, depth - 1), _grid_expr(r, Ws, depth - 1)
    return r.choice([f"({a} & {b})", f"({a} & {b})", f"({a} | {b})", f"~({a})"])


def disc_case(seed: int) -> str:
    """A random flattened expression of grid coordinates (``q // W``, ``q % W``,
    ``(q // W) % H``, after ``T`` tokens, ``(q - k) % d``) with ``SPATTN_LAYOUT=on``: the
    grid the runtime discovers, the box and the remap must leave every output element as
    in sequence order."""
    r = random.Random(seed)
    backend = r.choice(["torch", "torch", "triton"])
    base = r.choice([2, 3, 4, 5, 6, 8])
    Ws = sorted({base, base * r.choice([2, 3]), r.choice([2, 3, 4, 5, 7])})
    src = _grid_expr(r, Ws, r.randint(1, 3))
    L = r.choice([base * r.randint(2, 10), max(Ws) * r.randint(2, 6) + r.choice([0, 0, 1, 3]),
                  r.randint(1, 80)])
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    B, D = r.choice([1, 2]), r.choice([16, 17, 24])
    gather = _gather(seed)
    desc = f"disc:{seed} {backend} {src!r} L={L} B{B}-Hq{Hq}-Hk{Hk}-D{D} gather={gather}"
    LAST["desc"] = desc
    try:
        pat = spattn.compile(src, backend=backend)
    except SpattnError:
        return desc + " (refused at compile)"
    g = torch.Generator().manual_seed(seed)
    (q, k, v), _ = _tensors(g, B, Hq, Hk, L, L, D, torch.float32)
    old = _env({"SPATTN_LAYOUT": "on", "SPATTN_LAYOUT_GATHER": gather})
    try:
        plan = pat.plan(q, k, v)
        o, lse = pat(q, k, v, plan=plan, return_lse=True)
        do = torch.randn(o.shape, generator=g)
        got = [o, lse, *_grads(o, lse, (q, k, v), do, None)]
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:100]})"
    finally:
        _env(old)
    desc += f" {type(plan).__name__}"
    _check(desc, pat, q, k, v, got, do, torch.float32)
    return desc


LOOP_MASKS = ["causal", "causal & window(W)", "causal & (window(W) | sink(S))",
              "causal & q - k >= C", "causal & k >= S & window(W)", "k <= q - C | k < S",
              "causal & q - k < [W, S, C, 7][h]", "causal & (q - k) % C != 0",
              "causal & window(W) | k == q + 1", "k <= q + C & k >= q - W",
              "causal & k >= Lk - W", "causal & (window(W) | sink(S)) & k != S + 1",
              "causal & (q - k <= W | q - k >= W + C)", "chunked(W) & causal",
              "causal & k // C == q // C | k < S"]


def loop_case(seed: int) -> str:
    """A decode loop: one pattern object called at growing cache lengths (routed
    ``pat(q, k, v)`` or ``decode``, with or without ``seq_lens``), the CPU step's memo, fast
    entry and one-run steps on the torch backend (some Triton): every step against the
    reference."""
    r = random.Random(seed)
    backend = r.choice(["torch", "torch", "torch", "triton"])
    W, S, C = r.randint(1, 70), r.randint(1, 9), r.randint(1, 12)
    src = r.choice(LOOP_MASKS).replace("W", str(W)).replace("S", str(S)).replace("C", str(C))
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2]) if "[h]" not in src else r.choice([1, 2, 4])
    Hk = Hk if Hq % Hk == 0 else 1
    B, Lq, D = r.choice([1, 1, 2]), r.choice([1, 1, 1, 2, 3, 5]), r.choice([16, 24])
    L0 = r.randint(max(Lq, 200), 560)
    steps = r.randint(3, 8)
    step_by = r.choice([1, 1, Lq, r.randint(1, 40)])
    entry = r.choice(["route", "decode", "decode_lens"])
    scale = r.choice([None, None, 0.3])
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16])
    desc = (f"loop:{seed} {backend} {src!r} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-D{D} L0={L0} "
            f"steps={steps}x{step_by} {entry} scale={scale} {dtype}")
    LAST["desc"] = desc
    pat = spattn.compile(src, backend=backend)
    g = torch.Generator().manual_seed(seed)
    cap = L0 + steps * step_by
    kc, vc = (torch.randn(B, Hk, cap, D, generator=g).to(dtype) for _ in range(2))
    for i in range(steps):
        L = L0 + i * step_by
        q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
        try:
            if entry == "route":
                o = pat(q, kc[:, :, :L], vc[:, :, :L], scale=scale)
            elif entry == "decode":
                o = pat.decode(q, kc[:, :, :L], vc[:, :, :L], scale=scale)
            else:
                lens = torch.tensor([L - r.randint(0, 5 * (b > 0)) for b in range(B)])
                o = pat.decode(q, kc, vc, seq_lens=lens, scale=scale)
        except SpattnError as e:
            return desc + f" (refused at step {i}: {str(e).splitlines()[0][:100]})"
        for b in range(B):
            Lb = L if entry != "decode_lens" else int(lens[b])
            m = pat.mask(Lq, Lb, num_heads=Hq)
            kx, vx = (t[b:b + 1, :, :Lb].double().repeat_interleave(Hq // Hk, 1)
                      for t in (kc, vc))
            qd = q[b:b + 1].double()
            if scale is not None:
                qd = qd * scale * D ** 0.5
            ro, _ = attention_reference(qd, kx, vx, m)
            _close(f"{desc} step {i} (L={Lb}) b={b} o", o[b:b + 1], ro, atol=_tol(dtype))
    return desc


KINDS = {"grid": grid_case, "order": order_case, "route": route_case, "splan": splan_case,
         "decode": decode_case, "big": big_case, "disc": disc_case,
         "loop": loop_case}


def main():
    args = search.parser(__doc__, KINDS).parse_args()
    search.run(args, KINDS, LAST)


if __name__ == "__main__":
    main()
