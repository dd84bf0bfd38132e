"""Random search on a CUDA device: the compiled kernels (not the interpreter) on shapes,
dtypes and tensor layouts that the GPU tests do not list, against the float64 reference.

Four kinds of case, each drawn from one integer seed (replayed with ``--case KIND:SEED``):

* ``call``: a random mask (``tests.helpers.adversarial.rand_mask``) and, in a third of the
  cases, a random score with its tables; ``B <= 3``, ``Hk <= 4`` with 1, 2 or 4 query heads
  per key head, ``Lq`` and ``Lk`` from 1 to 3000 (often equal, often not multiples of a
  tile), ``D`` from 16 to 256 (powers of two and not; v's another in a fifth of the
  cases), bf16, fp16 or fp32, ``[B, H, L, D]`` or ``layout="bshd"``, contiguous or strided
  views (rows apart, transposed memory, a last dimension of stride 2), a ``q_offset`` now
  and then, the lse, and in most cases the backward (q, k, v and the tables).
* ``layout``: ``spattn.neighborhood`` on 1-3 axes (random kernel, stride, dilation, causal
  axes) or a flattened 2-D window, at grid sizes up to 96 x 96, forward and backward, with
  the token layouts on by default.
* ``decode``: ``Pattern.decode`` (and the routed ``pat(q, k, v)``) with ``Lq <= 16``, caches
  up to 20000 keys, per-batch lengths, paged or contiguous caches, GQA and, in a third of
  the cases, a score.
* ``ws``: a ``call`` case the warp-specialised forward can run (``SPATTN_WS_FWD=1``: bf16
  or fp16, D 64 or 128, no score, an additive one or a capped one, at least 128 queries
  and keys),
  through a plan whose forward stage, where it is that kernel, runs a random grid (1 to
  200 programs or one per work item), so that programs take several items of any kind in
  turn; its backward takes the warp-specialised dK/dV and dQ kernels wherever they run
  (``SPATTN_WS_BWD=1``, ``SPATTN_WS_DQ=1``).
* ``seq``: eight calls of one pattern in a row, each changing one thing a memo could hold
  on to (fresh tensors, tensors or the runtime input written in place, views at another
  offset, a key more), each against the reference.

A case passes when it is refused with a ``SpattnError`` or matches the reference: outputs
elementwise within ``tol * max|ref|`` and normwise within ``tol`` (16-bit: 2e-2 for o and
lse, 5e-2 for gradients; fp32: 2e-3), no NaN or inf where the reference has none, and a
fully masked row 0. Any other exception is a failure; a CUDA error ends the search (the
context is lost) after printing its case. Run it on the device from the repository root::

    python -m tests.helpers.gpu_fuzz --minutes 5 --seed 1
    python -m tests.helpers.gpu_fuzz --case call:1234
"""
from __future__ import annotations

import random

import torch

import spattn
from spattn.dsl.errors import SpattnError
from spattn.runtime.reference import attention_reference, pattern_reference

from tests.helpers.adversarial import (DECODE_MASKS, TABLE_SHAPES, rand_bool,
                                       rand_mask, rand_score, score_params)
from tests.helpers.adversarial2 import _env
from tests.helpers.kernels import paged_cache
from tests.helpers import search

DEV = "cuda"
DIMS = [16, 32, 40, 48, 64, 64, 72, 80, 96, 128, 128, 128, 160, 192, 256]
DTYPES = [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]
LAST = {"desc": ""}


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _tol(dtype, grad=False):
    if dtype == torch.float32:
        return 2e-3
    return 5e-2 if grad else 2e-2


def _check(what, got, want, tol):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~torch.isfinite(want)
    assert torch.equal(got.isnan(), want.isnan()), \
        f"{what}: NaN at {int((got.isnan() != want.isnan()).sum())} places the reference has none"
    assert torch.equal(got[bad], want[bad]), f"{what}: inf at other places"
    g, w = got[~bad], want[~bad]
    if w.numel() == 0:
        return
    scale = float(w.abs().max().clamp_min(1.0))
    err = float((g - w).abs().max()) / scale
    assert err <= tol, f"{what}: max error {err:.3e} of max|ref| (tol {tol:.0e})"
    # normwise against at least 0.05 per element: a gradient that is 0 in exact arithmetic
    # (one key per row, a table entry that shifts whole rows) is rounding noise here
    nerr = float((g - w).norm() / w.norm().clamp_min(0.05 * w.numel() ** 0.5))
    assert nerr <= tol, f"{what}: normwise error {nerr:.3e} (tol {tol:.0e})"


def _length(r):
    return r.choice([r.randint(1, 64), r.randint(65, 700), r.randint(700, 3000),
                     r.choice([128, 256, 1024, 2048])])


def _tensor(r, g, B, H, L, D, dtype, layout):
    """A random ``[B, H, L, D]`` tensor (``[B, L, H, D]`` for bshd), sometimes a strided view
    of a larger one."""
    shape = (B, L, H, D) if layout == "bshd" else (B, H, L, D)
    how = r.random()
    kw = dict(generator=g, device=DEV, dtype=dtype)     # (views of dtype: .to would copy)
    if how < 0.2:       # a slice of a wider last dimension: rows not contiguous
        t = torch.randn(*shape[:-1], D + 8, **kw)[..., 3:3 + D]
    elif how < 0.35 and layout != "bshd":    # [B, L, H, D] memory seen as [B, H, L, D]
        t = torch.randn(B, L, H, D, **kw).transpose(1, 2)
    elif how < 0.45:    # every other element of the last dimension: its stride 2
        t = torch.randn(*shape[:-1], 2 * D, **kw)[..., ::2]
    else:
        t = torch.randn(*shape, **kw)
    return t


def rand_additive(r: random.Random) -> str:
    """A random additive score (``spattn.ir.score.additive``: ``c * s`` plus terms of the
    pair's offset, the key alone and the query alone), which the Gluon kernels apply."""
    terms = [r.choice(["s", "2.0 * s", "0.5 * s"])]
    for _ in range(r.randint(1, 3)):
        n = r.randint(2, 300)
        terms.append(r.choice([
            "alibi(m[h]) - s", "alibi(alibi_slope) - s", f"0.01 * float(k - q + {n})",
            "-0.03 * float(q - k)", f"0.3 * float(k % {n})", f"0.5 * float((k + h) // {n})",
            f"0.2 * float(q % {n})", "exp(-float(h))", f"0.1 * float(b * {n % 7})"]))
    return " + ".join(terms)


def rand_capped(r: random.Random) -> str:
    """A random capped score (``spattn.ir.score.capped``: ``c * tanh(f * s)``), which the
    Gluon forward applies (the generated backward runs)."""
    if r.random() < 0.5:
        return f"softcap({r.choice([1.0, 5.0, 20.0, 30.0, 50.0])})"
    return f"{r.choice([0.5, 3.0, 40.0])} * tanh({r.choice([-2.0, 0.05, 1.0])} * s)"


def call_case(seed: int, ws: bool = False) -> str:
    r = random.Random(seed)
    mask = rand_mask(r) if r.random() < 0.8 else r.choice(
        ["causal", "window(100)", "causal & same(doc)", "full", "dilated(64, 3)",
         "strided(37)", "global_tokens(5) | local(40, 60)", "prefix_lm(300)"])
    score = rand_score(r, r.randint(1, 3)) if r.random() < 0.35 and not ws else None
    if ws and r.random() < 0.35:
        score = rand_additive(r)
        side = random.Random(-1 - seed)     # (its own draws: the case's others stay as they were)
        if side.random() < 0.3:
            score = rand_capped(side)
    Hk = r.randint(1, 4)
    Hq = Hk * r.choice([1, 1, 2, 4])
    B = r.choice([1, 1, 2, 3])
    Lq = max(_length(r), 128 if ws else 1)
    Lk = Lq if r.random() < 0.5 else max(_length(r), 128 if ws else 1)
    D = r.choice([64, 128] if ws else DIMS)
    dtype = r.choice(DTYPES[:3] if ws else DTYPES)
    layout = r.choice(["bhsd", "bhsd", "bshd"])
    q_offset = r.choice([None, None, None, 0, r.randint(-50, 3000)])
    backward = r.random() < 0.7
    Dv = D if r.random() < 0.8 or ws else r.choice(DIMS)
    grid = r.choice([1, 3, 7, 64, 200, None]) if ws else None
    desc = (f"{'ws' if ws else 'call'}:{seed} mask={mask!r} score={score!r} "
            f"B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-Lk{Lk}-D{D}"
            f"{'' if Dv == D else f'-Dv{Dv}'} {str(dtype)[6:]} {layout} q_offset={q_offset} "
            f"backward={backward}" + (f" grid={grid}" if ws else ""))
    LAST["desc"] = desc
    params = {} if score is None else score_params(score, Hq)
    try:
        p = spattn.compile(mask, score=score, **params) if score else spattn.compile(mask)
    except SpattnError:
        return desc + " (refused at compile)"
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = _tensor(r, g, B, Hq, Lq, D, dtype, layout).requires_grad_(backward)
    k = _tensor(r, g, B, Hk, Lk, D, dtype, layout).requires_grad_(backward)
    v = _tensor(r, g, B, Hk, Lk, Dv, dtype, layout).requires_grad_(backward)
    ins = {}
    if "doc" in p.inputs:
        ins["doc"] = torch.sort(torch.randint(0, r.randint(1, 40), (max(Lq, Lk) + 3000,),
                                              generator=g, device=DEV)).values
    tabs = {n: torch.randn(TABLE_SHAPES[n](Hq), generator=g, device=DEV).to(dtype)
            .requires_grad_(backward and r.random() < 0.5)
            for n in getattr(p, "score_inputs", {})}
    kw = {"layout": "bshd"} if layout == "bshd" else {}
    try:
        if ws:
            old = _env({"SPATTN_WS_FWD": "1", "SPATTN_WS_BWD": "1",    # (read by the plan)
                        "SPATTN_WS_DQ": "1"})
            try:
                plan = p.plan(q, k, v, q_offset=q_offset, **kw, **ins)
            finally:
                _env(old)
            stage = plan.forward_stage
            if getattr(stage, "gluon", False):
                stage.grid = (grid or stage.n_work,)
                desc += f" ({stage.n_masks} PARTIAL tiles)"
            else:
                desc += " (the generated forward)"
            LAST["desc"] = desc
            o, lse = p(q, k, v, return_lse=True, plan=plan)
        else:
            o, lse = p(q, k, v, q_offset=q_offset, return_lse=True, **kw, **ins, **tabs)
    except SpattnError as e:
        return desc + f" (refused at the call: {str(e).splitlines()[0][:80]})"
    _sync()
    if layout == "bshd":
        o = o.transpose(1, 2)
    leaves = [q, k, v, *(t for t in tabs.values() if t.requires_grad)]
    got = [o, lse]
    do = torch.randn(o.shape, generator=g, device=DEV).to(dtype)
    if backward:
        got += list(torch.autograd.grad(o, leaves, do, allow_unused=True))
        _sync()
    bh = (lambda t: t.transpose(1, 2)) if layout == "bshd" else (lambda t: t)
    rl = [bh(t.detach()).double().requires_grad_(backward) for t in (q, k, v)]
    rt = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in tabs.items()}
    ro, rlse = pattern_reference(p, *rl, q_offset=q_offset, **ins, **rt)
    if ro.isnan().any():
        return desc + " (NaN in the reference: an unguarded score)"
    want = [ro, rlse]
    if backward:
        want += list(torch.autograd.grad(ro, rl + [t for t in rt.values() if t.requires_grad],
                                         do.double(), allow_unused=True))
    names = ["o", "lse", "dq", "dk", "dv", *(f"d{n}" for n, t in tabs.items() if t.requires_grad)]
    # the backward recomputes each probability from the row's float32 lse: a row whose lse
    # is large loses about an ulp of it in every probability (docs/backends.md, "Large
    # scores"), so the gradients' tolerance grows with it
    finite = rlse[torch.isfinite(rlse)]
    big = float(finite.abs().max()) if finite.numel() else 0.0
    if big > 1e4:
        desc += f" (|lse| up to {big:.1e}: gradients within its float32 ulps)"
    for i, (n, a, b) in enumerate(zip(names, got, want)):
        if i >= 2:
            leaf = leaves[i - 2]
            a = torch.zeros_like(leaf) if a is None else a
            a = bh(a) if i < 5 else a
            b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        tol = _tol(dtype, grad=i >= 2) * (5 if i >= 5 else 1)
        _check(f"{desc} {n}", a, b, tol + (4 * big * 2.0 ** -24 if i >= 2 else 0.0))
    return desc


def layout_case(seed: int) -> str:
    r = random.Random(seed)
    if r.random() < 0.7:
        nd = r.choice([1, 2, 2, 3])
        shape = tuple(r.randint(4, {1: 3000, 2: 96, 3: 20}[nd]) for _ in range(nd))
        ks, st, dl, ca = [], [], [], []
        for n in shape:
            d = r.choice([1, 1, 1, 2, 3]) if n >= 8 else 1
            kk = r.randint(1, max(1, min(n // d, 33)))
            ks.append(kk)
            dl.append(d)
            st.append(r.randint(1, kk))
            ca.append(r.random() < 0.25)
        args = (shape, tuple(ks), tuple(st), tuple(dl), tuple(ca))
        name = f"neighborhood{args}"
        pat = spattn.neighborhood(*args)
        N = 1
        for n in shape:
            N *= n
    else:
        Hg, W = r.randint(4, 80), r.randint(4, 80)
        ry, rx = r.randint(0, 8), r.randint(0, 8)
        src = f"abs(q // {W} - k // {W}) <= {ry} & abs(q % {W} - k % {W}) <= {rx}"
        if r.random() < 0.3:
            src += " & causal"
        name, pat, N = repr(src), spattn.compile(src), Hg * W
    Hk = r.randint(1, 3)
    Hq = Hk * r.choice([1, 2])
    B, D = r.choice([1, 2]), r.choice([32, 64, 64, 128, 128, 96])
    dtype = r.choice(DTYPES[:3])
    backward = r.random() < 0.7
    desc = f"layout:{seed} {name} N={N} B{B}-Hq{Hq}-Hk{Hk}-D{D} {str(dtype)[6:]} backward={backward}"
    LAST["desc"] = desc
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g, device=DEV).to(dtype).requires_grad_(backward)
    k, v = (torch.randn(B, Hk, N, D, generator=g, device=DEV).to(dtype).requires_grad_(backward)
            for _ in range(2))
    try:
        o, lse = pat(q, k, v, return_lse=True)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:80]})"
    got = [o, lse]
    do = torch.randn(o.shape, generator=g, device=DEV).to(dtype)
    if backward:
        got += list(torch.autograd.grad(o, (q, k, v), do))
    _sync()
    rl = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    ro, rlse = attention_reference(*rl, pat.mask(N, N, num_heads=Hq, device=DEV))
    want = [ro, rlse] + (list(torch.autograd.grad(ro, rl, do.double())) if backward else [])
    for i, (n, a, b) in enumerate(zip(["o", "lse", "dq", "dk", "dv"], got, want)):
        _check(f"{desc} {n}", a, b, _tol(dtype, grad=i >= 2))
    return desc


def decode_case(seed: int) -> str:
    r = random.Random(seed)
    W = r.randint(1, 3000)
    src = r.choice(DECODE_MASKS).replace("W", str(W)) if r.random() < 0.7 else rand_bool(r, 3)
    score = rand_score(r, r.randint(1, 3)) if r.random() < 0.3 else None
    Hk = r.choice([1, 2, 4, 8])
    Hq = Hk * r.choice([1, 2, 4, 8])
    B, Lq, D = r.choice([1, 2, 5, 16]), r.randint(1, 16), r.choice([64, 128, 128, 96, 256, 32])
    paged = r.choice([0, 0, 16, 64, 128])
    cap = r.randint(max(Lq, 1), r.choice([300, 5000, 20000]))
    if paged:
        cap = -(-cap // paged) * paged
    if B * Hq * cap * D > 2 ** 27:        # the reference's K and V in float64, per query head
        B = 1
    lens = [r.randint(Lq, cap) for _ in range(B)] if r.random() < 0.6 else None
    if paged and lens is None:
        lens = [cap] * B
    splits = r.choice([None, None, None, 1, 4, 32])
    dtype = r.choice(DTYPES[:3])
    desc = (f"decode:{seed} mask={src!r} score={score!r} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-cap{cap}-D{D} "
            f"lens={lens} paged={paged} splits={splits} {str(dtype)[6:]}")
    LAST["desc"] = desc
    params = {} if score is None else score_params(score, Hq)
    try:
        pat = spattn.compile(src, score=score, **params) if score else spattn.compile(src)
    except SpattnError:
        return desc + " (refused at compile)"
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, device=DEV).to(dtype)
    k, v = (torch.randn(B, Hk, cap, D, generator=g, device=DEV).to(dtype) for _ in range(2))
    tabs = {n: torch.randn(TABLE_SHAPES[n](Hq), generator=g, device=DEV).to(dtype)
            for n in getattr(pat, "score_inputs", {})}
    seq = None if lens is None else torch.tensor(lens, device=DEV)
    try:
        if paged:
            kp, vp, table = paged_cache(k, v, paged, g)
            o, lse = pat.decode(q, kp, vp, seq_lens=seq, page_table=table.to(torch.int32),
                                return_lse=True, num_splits=splits, **tabs)
        else:
            o, lse = pat.decode(q, k, v, seq_lens=seq, return_lse=True, num_splits=splits,
                                **tabs)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:80]})"
    _sync()
    tol = _tol(dtype)
    G = Hq // Hk
    outs, lses = [], []
    for b in range(B):      # the whole batch at element b's length (a score may read b)
        L = cap if lens is None else lens[b]
        kx, vx = (t[:, :, :L].double().repeat_interleave(G, 1) for t in (k, v))
        ro, rlse = pattern_reference(pat, q.double(), kx, vx,
                                     **{n: t.double() for n, t in tabs.items()})
        outs.append(ro[b:b + 1])
        lses.append(rlse[b:b + 1])
    _check(f"{desc} o", o, torch.cat(outs), tol)
    _check(f"{desc} lse", lse, torch.cat(lses), tol)
    if lens is None and not paged:
        with torch.no_grad():
            for L in (cap, max(Lq, cap - 1)):
                o = pat(q, k[:, :, :L], v[:, :, :L], **tabs)
                _sync()
                kx, vx = (t[:, :, :L].double().repeat_interleave(G, 1) for t in (k, v))
                ro = pattern_reference(pat, q.double(), kx, vx,
                                       **{n: t.double() for n, t in tabs.items()})[0]
                _check(f"{desc} routed L{L}", o, ro, tol)
    return desc


def seq_case(seed: int) -> str:
    """Calls of one pattern in a row, each changing one thing the last-call memo, the plan
    cache, the tables' memo or a TMA descriptor could hold on to: fresh tensors of the same
    shapes, the same tensors written in place, the runtime input written in place, views
    at another offset of a larger buffer, a key more, the lse, the backward."""
    r = random.Random(seed)
    src = r.choice(["causal & same(doc)", "window(W) | k < doc[q] % 3", "causal & window(W)",
                    "dilated(W, 3)", "causal & (window(W) | sink(4))", "same(doc) & k <= q + W"])
    src = src.replace("W", str(r.randint(1, 400)))
    Hk = r.randint(1, 3)
    Hq = Hk * r.choice([1, 2])
    B, L, D = r.choice([1, 2]), r.randint(17, 2500), r.choice([32, 64, 128, 80])
    dtype = r.choice(DTYPES[:3])
    desc = f"seq:{seed} {src!r} B{B}-Hq{Hq}-Hk{Hk}-L{L}-D{D} {str(dtype)[6:]}"
    LAST["desc"] = desc
    pat = spattn.compile(src)
    g = torch.Generator(device=DEV).manual_seed(seed)
    big = L + 64

    def fresh(H, n, off=0):
        t = torch.randn(B, H, n + off, D, generator=g, device=DEV).to(dtype)
        return t[:, :, off:]
    doc = torch.sort(torch.randint(0, r.randint(1, 30), (big,), generator=g, device=DEV)).values
    q, k, v = fresh(Hq, L), fresh(Hk, L), fresh(Hk, L)
    steps = ["same", "fresh", "inplace", "doc", "offset", "key", "same", "fresh"]
    r.shuffle(steps)
    done = []
    for step in steps:
        if step == "fresh":
            q, k, v = fresh(Hq, q.shape[2]), fresh(Hk, k.shape[2]), fresh(Hk, k.shape[2])
        elif step == "inplace":
            with torch.no_grad():
                q.mul_(-1.5)
                v.add_(1.0)
        elif step == "doc" and "doc" in pat.inputs:
            doc.copy_(torch.sort(torch.randint(0, r.randint(1, 30), (big,), generator=g,
                                               device=DEV)).values)
        elif step == "offset":
            off = r.choice([1, 3, 8, 64])
            q, k, v = fresh(Hq, q.shape[2], off), fresh(Hk, k.shape[2], off), \
                fresh(Hk, k.shape[2], off)
        elif step == "key":
            k, v = fresh(Hk, k.shape[2] + 1), fresh(Hk, k.shape[2] + 1)
        backward = r.random() < 0.5
        ins = {"doc": doc} if "doc" in pat.inputs else {}
        qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
        done.append(f"{step}{'+bwd' if backward else ''}")
        LAST["desc"] = desc + " steps=" + ",".join(done)
        try:
            o, lse = pat(qq, kk, vv, return_lse=True, **ins)
        except SpattnError as e:
            return LAST["desc"] + f" (refused: {str(e).splitlines()[0][:80]})"
        got = [o, lse]
        do = torch.randn(o.shape, generator=g, device=DEV).to(dtype)
        if backward:
            got += list(torch.autograd.grad(o, (qq, kk, vv), do))
        _sync()
        rl = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
        ro, rlse = pattern_reference(pat, *rl, **ins)
        want = [ro, rlse] + (list(torch.autograd.grad(ro, rl, do.double())) if backward else [])
        for i, (n, a, b) in enumerate(zip(["o", "lse", "dq", "dk", "dv"], got, want)):
            _check(f"{LAST['desc']} {n}", a, b, _tol(dtype, grad=i >= 2))
    return LAST["desc"]


def ws_case(seed: int) -> str:
    return call_case(seed, ws=True)


KINDS = {"call": call_case, "layout": layout_case, "decode": decode_case, "seq": seq_case,
         "ws": ws_case}


def main():
    ap = search.parser(__doc__, KINDS)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the harness")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    # a float64 reference too large for the device is the harness's limit, not the library's
    search.run(args, KINDS, LAST, search.Hooks(
        skip=(torch.OutOfMemoryError,), on_skip=torch.cuda.empty_cache,
        fatal=lambda e: "CUDA" in str(e) or "illegal" in str(e).lower()))


if __name__ == "__main__":
    main()
