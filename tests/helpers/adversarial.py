"""Adversarial random search over the newest code paths, against the float64 reference.

Five kinds of case, each drawn from one integer seed (so a failure is replayed exactly with
``--case KIND:SEED``):

* ``score``: a random score expression (``s``, positions, heads, lengths, float params and
  lists, 1-D and 2-D learnable tables, the float functions, ``if``, ``log_bucket``) over a
  random mask (prelude calls and random comparisons), random ``B, Hq, Hk, Lq, Lk, D``,
  ``q_offset`` and dtype, on the torch backend or the Triton kernels under the interpreter:
  output and gradients of q, k, v and the tables against ``pattern_reference``.
* ``layout``: ``SPATTN_LAYOUT=on`` with a random grid pattern (``spattn.neighborhood`` with
  random shape, kernel, stride, dilation and causal axes, or a flattened 2-D window written
  by hand, possibly conjoined with ``causal``) on both backends, forward and backward.
* ``decode``: ``Pattern.decode`` with random ``Lq <= 16``, cache capacity, per-batch
  lengths, contiguous or paged cache, GQA, random masks: output and lse against the
  reference on each batch element's own length.
* ``sdecode``: the same with a random score (as ``score`` draws them) and its tables, in
  float32 or bfloat16.
* ``vmap``: ``vmap(grad(f))`` of a random mask and score, with random mapped dims and
  runtime inputs and tables mapped or shared: each sample against its own reference.

A case passes when the call raises a ``SpattnError`` (refused with a message) or matches the
reference; any other exception, a NaN where the reference has none, or a wrong element is a
failure. Run it as a module from the repository root::

    TRITON_INTERPRET=1 python -m tests.helpers.adversarial --minutes 10 --seed 1
    TRITON_INTERPRET=1 python -m tests.helpers.adversarial --case score:1234
"""
from __future__ import annotations

import os
import random
import re
import tempfile

if __name__ == "__main__":     # run as the search, not imported by a test (on a GPU machine
    # the variable would turn every kernel of the test run into the interpreter's)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SPATTN_CACHE_DIR", tempfile.mkdtemp(prefix="spattn-adversarial-"))

import torch  # noqa: E402

import spattn  # noqa: E402
from spattn.dsl.errors import SpattnError  # noqa: E402
from spattn.runtime.reference import attention_reference, pattern_reference  # noqa: E402

from tests.helpers.kernels import paged_cache  # noqa: E402
from tests.helpers import search  # noqa: E402

INTS = ["q", "k", "h", "b", "Lq", "Lk", "H", "(q - k)", "(k - q)", "(k // 3)", "(q % 4)",
        "(q // 5 - k // 5)", "log_bucket(abs(q - k), 2, 20, 6)", "t5_bucket(8, 20)",
        "t5_bucket_causal(8, 16)", "((q + 3000000000) % 7)", "((k * 3000000000) // 2999999999)",
        "(q * k // 3)"]
LEAVES = ["s", "s", "s", "0.5", "-2.0", "1e-3", "c", "m[h]", "w[h]", "w[0]",
          "rel[h, clamp(q - k, 0, 7)]", "bias[q % 3, k % 5]", "alibi_slope"]
PARAMS = {"c": 0.75, "m": [0.5, -0.25, 2.0, 0.125]}
TABLE_SHAPES = {"w": lambda H: (H,), "rel": lambda H: (H, 8), "bias": lambda H: (3, 5)}
MASKS = ["causal", "full", "window(5)", "k < q & q >= 4", "causal & window(7)",
         "sink(3) | window(4)", "q % 2 == 0", "k % 3 != 1 & causal", "chunked(8)",
         "abs(q - k) <= 2 | k == 0", "q >= k + 5", "false", "k >= Lk - 4"]


def rand_score(r: random.Random, depth: int) -> str:
    leaf = r.choice(LEAVES) if r.random() < 0.7 else f"float({r.choice(INTS)})"
    if depth == 0 or r.random() < 0.25:
        return leaf
    sub = lambda: rand_score(r, depth - 1)  # noqa: E731
    kind = r.randrange(12)
    if kind == 0:
        return f"({sub()} {r.choice(['+', '-', '*'])} {sub()})"
    if kind == 1:
        return f"({sub()} / float(abs({r.choice(INTS)}) + 1))"
    if kind == 2:
        return f"{r.choice(['tanh', 'abs'])}({sub()})"
    if kind == 3:
        return f"exp(tanh({sub()}))"
    if kind == 4:
        return f"log(1.5 + tanh({sub()}))"
    if kind == 5:
        return f"sqrt(abs({sub()}) + 0.25)"
    if kind == 6:
        args = ", ".join(sub() for _ in range(r.randint(2, 3)))
        return f"{r.choice(['min', 'max'])}({args})"
    if kind == 7:
        return f"clamp({sub()}, -1.0, {sub()})"
    if kind == 8:
        return f"(if {r.choice(INTS)} > {r.randint(-2, 6)} then {sub()} else {sub()})"
    if kind == 9:
        return f"softcap({r.choice(['2.0', '0.5', '30.0'])})"
    if kind == 10:
        return f"alibi({r.choice(['m[h]', '0.25', 'alibi_slope'])})"
    return f"({sub()} + {sub()})"


def score_params(score: str, Hq: int) -> dict:
    """The :data:`PARAMS` that ``score`` names, lists cut or repeated to ``Hq`` entries (a
    list shorter than the heads would be refused, and the case would test nothing)."""
    return {n: (v * -(-Hq // len(v)))[:Hq] if isinstance(v, list) else v
            for n, v in PARAMS.items() if re.search(rf"\b{n}\b", score)}


def rand_int(r: random.Random, depth: int) -> str:
    """A random int expression of q, k, h (floor division and modulo by constants of both
    signs, abs, min, max, clamp, if, lists indexed by h: a one-entry list is refused on more
    than one head)."""
    if depth == 0 or r.random() < 0.3:
        return r.choice(["q", "k", "h", "q", "k", str(r.randint(-5, 40)), "Lk", "Lq"])
    a = lambda: rand_int(r, depth - 1)  # noqa: E731
    kind = r.randrange(8)
    if kind == 0:
        return f"({a()} {r.choice(['+', '-'])} {a()})"
    if kind == 1:
        return f"({r.randint(-3, 4)} * {a()})"
    if kind == 2:
        d = r.choice([-3, -2, 2, 3, 4, 5, 8, 16])
        return f"({a()} {r.choice(['//', '%'])} {d if d > 0 else f'({d})'})"
    if kind == 3:
        return f"abs({a()})"
    if kind == 4:
        return f"{r.choice(['min', 'max'])}({a()}, {a()})"
    if kind == 5:
        lo = r.randint(-5, 10)
        return f"clamp({a()}, {lo}, {lo + r.randint(0, 20)})"
    if kind == 6:
        return f"(if {a()} {r.choice(['<', '<=', '=='])} {a()} then {a()} else {a()})"
    n = r.choice([1, 2, 4, 4])      # one entry indexed by h: a literal in the kernel
    return f"[{', '.join(str(r.randint(-4, 30)) for _ in range(n))}][{'h' if n == 1 else f'h % {n}'}]"


def rand_bool(r: random.Random, depth: int) -> str:
    if depth == 0 or r.random() < 0.35:
        if r.random() < 0.3:
            return r.choice(MASKS)
        return f"{rand_int(r, 2)} {r.choice(['<', '<=', '>', '>=', '==', '!='])} {rand_int(r, 2)}"
    a = lambda: rand_bool(r, depth - 1)  # noqa: E731
    kind = r.randrange(3)
    if kind == 0:
        return f"({a()} & {a()})"
    if kind == 1:
        return f"({a()} | {a()})"
    return f"~({a()})"


def rand_mask(r: random.Random) -> str:
    if r.random() < 0.4:
        return rand_bool(r, 3)
    a = r.choice(MASKS)
    if r.random() < 0.3:
        a = f"({a}) {r.choice(['&', '|'])} ({r.choice(MASKS)})"
    return a


def _close(what, got, want, atol, rtol=2e-3):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN at other places than the reference"
    inf = want.isinf()
    assert torch.equal(got.isinf() & ~nan, inf), f"{what}: inf at other places"
    ok = ~(nan | inf)
    torch.testing.assert_close(got[ok], want[ok], atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def score_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "torch", "triton"])
    mask, score = rand_mask(r), rand_score(r, r.randint(1, 4))
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    B = r.choice([1, 2])
    Lq, Lk = r.randint(1, 40), r.randint(1, 40)
    D = r.choice([16, 32])
    Dv = D if r.random() < 0.8 else r.choice([8, 24, 48])     # v's own head dim (MLA)
    q_offset = r.choice([None, None, 0, r.randint(-10, 50), 2 ** 31 - r.randint(0, 30)])
    if q_offset is not None and q_offset > 2 ** 30 and re.search(
            r"\bq\b|alibi", score.replace("(q + 3000000000) % 7", "")):
        q_offset = None     # a score of q ~ 2**31 loses s in float32 (docs/language.md §13)
    dtype = r.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16])
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32
    desc = (f"score:{seed} {backend} mask={mask!r} score={score!r} B{B}-Hq{Hq}-Hk{Hk}-"
            f"Lq{Lq}-Lk{Lk}-D{D}-Dv{Dv} q_offset={q_offset} {dtype}")
    LAST["desc"] = desc
    params = score_params(score, Hq)
    try:
        p = spattn.compile(mask, score=score, backend=backend, **params)
    except SpattnError:
        return desc + " (refused at compile)"
    assert spattn.compile(p.source, backend=backend) == p, f"{desc}: source {p.source}"
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(B, Hk, Lk, D, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(B, Hk, Lk, Dv, generator=g).to(dtype).requires_grad_(True)
    tabs = {n: torch.randn(TABLE_SHAPES[n](Hq), generator=g).to(dtype).requires_grad_(True)
            for n in p.score_inputs}
    try:
        o = p(q, k, v, q_offset=q_offset, **tabs)
    except SpattnError as e:
        return desc + f" (refused at the call: {str(e).splitlines()[0][:80]})"
    do = torch.randn(o.shape, generator=g).to(dtype)
    leaves = [q, k, v, *tabs.values()]
    got = [o, *torch.autograd.grad(o, leaves, do, allow_unused=True)]
    rl = [x.detach().double().requires_grad_(True) for x in leaves]
    ro, _ = pattern_reference(p, *rl[:3], q_offset=q_offset, **dict(zip(tabs, rl[3:])))
    if ro.isnan().any():
        return desc + " (NaN in the reference: an unguarded score)"
    want = [ro, *torch.autograd.grad(ro, rl, do.double(), allow_unused=True)]
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-4
    names = ["o", "dq", "dk", "dv", *(f"d{n}" for n in tabs)]
    for n, a, b, leaf in zip(names, got, want, [ro] + rl):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        scale = max(1.0, float(b.detach().abs().max()) if b.numel() else 1.0)
        _close(f"{desc} {n}", a, b, atol=tol * scale * (1 if n == "o" else 5))
    return desc


def _layout_pattern(r: random.Random, backend: str):
    if r.random() < 0.6:
        nd = r.choice([1, 2, 2, 3])
        shape = tuple(r.randint(3, 12 if nd < 3 else 6) for _ in range(nd))
        ks, st, dl, ca = [], [], [], []
        for n in shape:
            d = r.choice([1, 1, 2, 3]) if n >= 6 else 1
            k = r.randint(1, max(1, n // d))
            ks.append(k)
            dl.append(d)
            st.append(r.randint(1, k))
            ca.append(r.random() < 0.3)
        args = (shape, tuple(ks), tuple(st), tuple(dl), tuple(ca))
        return f"neighborhood{args}", spattn.neighborhood(*args, backend=backend)
    Hg, W = r.randint(2, 10), r.randint(2, 12)
    ry, rx = r.randint(0, 3), r.randint(0, 3)
    src = f"abs(q // {W} - k // {W}) <= {ry} & abs(q % {W} - k % {W}) <= {rx}"
    if r.random() < 0.3:
        src += " & causal"
    if r.random() < 0.2:
        src = f"({src}) | k < {r.randint(1, W)}"
    p = spattn.compile(src, backend=backend)
    return f"{src!r} L={Hg * W}", (p, Hg * W)


def layout_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    name, pat = _layout_pattern(r, backend)
    if isinstance(pat, tuple):
        pat, N = pat
    else:
        N = 1
        for n in pat.grid:
            N *= n
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    B, D = r.choice([1, 2]), r.choice([16, 32])
    Lq, q_offset = N, None
    if getattr(pat, "grid", None) is None and r.random() < 0.4:
        # a flattened pattern called on part of the grid's rows, or shifted rows
        Lq = r.randint(1, N)
        q_offset = r.choice([None, 0, r.randint(0, N - Lq)])
    desc = (f"layout:{seed} {backend} {name} N={N} B{B}-Hq{Hq}-Hk{Hk}-D{D} Lq={Lq} "
            f"q_offset={q_offset}")
    LAST["desc"] = desc
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hk, N, D, generator=g, requires_grad=True) for _ in range(2))
    old = os.environ.get("SPATTN_LAYOUT")
    os.environ["SPATTN_LAYOUT"] = "on"
    try:
        plan = pat.plan(q, k, v, q_offset=q_offset)
        o, lse = pat(q, k, v, plan=plan, return_lse=True, q_offset=q_offset)
        do = torch.randn(o.shape, generator=g)
        got = [o, lse, *torch.autograd.grad(o, (q, k, v), do)]
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:80]})"
    finally:
        if old is None:
            os.environ.pop("SPATTN_LAYOUT")
        else:
            os.environ["SPATTN_LAYOUT"] = old
    desc += f" {type(plan).__name__}"
    rl = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kx, vx = (t.repeat_interleave(Hq // Hk, 1) for t in rl[1:])
    ro, rlse = attention_reference(rl[0], kx, vx,
                                   pat.mask(Lq, N, num_heads=Hq, q_offset=q_offset))
    want = [ro, rlse, *torch.autograd.grad(ro, rl, do.double())]
    for n, a, b in zip(["o", "lse", "dq", "dk", "dv"], got, want):
        _close(f"{desc} {n}", a, b, atol=5e-4 * (1 if n in ("o", "lse") else 4))
    return desc


DECODE_MASKS = ["causal", "causal & window(W)", "causal & (window(W) | sink(4))",
                "causal & q % 2 == 0", "causal & q - k < [8, 20, 40, 70][h]",
                "full", "k % 5 != 0 & causal", "chunked(W)", "k >= q - W & k <= q + 3",
                "causal & k >= Lk - W", "window(W) | k < 2", "q >= 3 & k < W"]


def decode_case(seed: int) -> str:
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    W = r.randint(1, 64)
    src = r.choice(DECODE_MASKS).replace("W", str(W))
    if r.random() < 0.4:
        src = rand_bool(r, 3)
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2, 4])
    B, Lq, D = r.choice([1, 2, 3]), r.randint(1, 16), r.choice([16, 32])
    paged = r.choice([0, 0, 16, 32])
    cap = r.randint(Lq, 300)
    if paged:
        cap = -(-cap // paged) * paged
    lens = [r.randint(Lq, cap) for _ in range(B)] if r.random() < 0.7 else None
    if paged and lens is None:
        lens = [cap] * B
    splits = r.choice([None, None, 1, 3, 8])
    g = torch.Generator().manual_seed(seed)
    ins, inputs = {}, ""
    if r.random() < 0.4:        # a per-batch (or per-head) runtime input: padding masks
        inputs = r.choice(["keep", "keep-head", "first", "first-end"])
        dtype = r.choice([torch.bool, torch.int32, torch.int64])
        if inputs.startswith("keep"):
            shape = (B, Hq, cap) if inputs == "keep-head" else (B, cap)
            keep = torch.rand(shape, generator=g) > r.random() * 0.5
            if r.random() < 0.5:          # a left padding per row
                keep = torch.arange(cap) >= torch.randint(0, cap + 1, shape[:-1] + (1,),
                                                          generator=g)
            ins["keep"] = keep.to(dtype)
            src = f"({src}) & keep[{'h, ' if inputs == 'keep-head' else ''}k] != 0"
        else:
            ins["first"] = torch.randint(0, cap + 1, (B,), generator=g).to(
                torch.int32 if dtype == torch.int32 else torch.int64)
            src = f"({src}) & k >= first[b]" + (" & k < first[b] + W" if inputs == "first-end"
                                                 else "")
            src = src.replace("W", str(W))
    desc = (f"decode:{seed} {backend} {src!r} B{B}-Hq{Hq}-Hk{Hk}-Lq{Lq}-cap{cap}-D{D} "
            f"lens={lens} paged={paged} splits={splits} inputs={inputs or None}")
    LAST["desc"] = desc
    pat = spattn.compile(src, backend=backend)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hk, cap, D, generator=g)
    v = torch.randn(B, Hk, cap, D, generator=g)
    seq = None if lens is None else torch.tensor(lens)
    try:
        if paged:
            kp, vp, table = paged_cache(k, v, paged, g)
            o, lse = pat.decode(q, kp, vp, seq_lens=seq, page_table=table.to(torch.int32),
                                return_lse=True, num_splits=splits, **ins)
        else:
            o, lse = pat.decode(q, k, v, seq_lens=seq, return_lse=True, num_splits=splits,
                                **ins)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:80]})"
    outs, lses = [], []
    for b in range(B):
        L = cap if lens is None else lens[b]
        m = pat.mask(Lq, L, num_heads=Hq, batch=B, **ins)[b:b + 1]
        kx, vx = (t[b:b + 1, :, :L].double().repeat_interleave(Hq // Hk, 1) for t in (k, v))
        ro, rlse = attention_reference(q[b:b + 1].double(), kx, vx, m)
        outs.append(ro)
        lses.append(rlse)
    _close(f"{desc} o", o, torch.cat(outs), atol=5e-4)
    _close(f"{desc} lse", lse, torch.cat(lses), atol=5e-4)
    if lens is None and not paged and cap >= 256 and cap >= 4 * Lq:
        # the same step as calls, routed to decode: the first builds the routed fast entry,
        # the second (one key fewer when that stays routed) takes it
        for L in (cap, cap - 1) if cap - 1 >= max(256, 4 * Lq) else (cap, cap):
            o = pat(q, k[:, :, :L], v[:, :, :L], **ins)
            m = pat.mask(Lq, L, num_heads=Hq, batch=B, **ins)
            kx, vx = (t[:, :, :L].double().repeat_interleave(Hq // Hk, 1) for t in (k, v))
            _close(f"{desc} routed L{L}", o, attention_reference(q.double(), kx, vx, m)[0],
                   atol=5e-4)
        # routed calls at a q_offset (a static cache's layers): the first leaves the entry,
        # the second takes it, the third (another offset) leaves it
        at = cap - Lq - r.randint(0, 40)
        kx, vx = (t.double().repeat_interleave(Hq // Hk, 1) for t in (k, v))
        for off in (at, at, at + 1):
            o = pat(q, k, v, q_offset=off, **ins)
            m = pat.mask(Lq, cap, num_heads=Hq, batch=B, q_offset=off, **ins)
            _close(f"{desc} routed q_offset={off}", o,
                   attention_reference(q.double(), kx, vx, m)[0], atol=5e-4)
    return desc


def sdecode_case(seed: int) -> str:
    """A decode step of a random mask with a random score (tables, lists, params), random
    ``Lq``, capacity, per-batch lengths, paged or not, GQA, splits, both backends: output
    and lse against element b of the whole batch's reference at length lens[b]."""
    r = random.Random(seed)
    backend = r.choice(["torch", "triton"])
    W = r.randint(1, 64)
    mask = r.choice(DECODE_MASKS).replace("W", str(W)) if r.random() < 0.6 else rand_mask(r)
    score = rand_score(r, r.randint(1, 4))
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2, 4])
    B, Lq, D = r.choice([1, 2, 3]), r.randint(1, 16), r.choice([16, 32])
    paged = r.choice([0, 0, 16, 32])
    cap = r.randint(max(Lq, 1), 300)
    if paged:
        cap = -(-cap // paged) * paged
    lens = [r.randint(Lq, cap) for _ in range(B)] if r.random() < 0.7 else None
    if paged and lens is None:
        lens = [cap] * B
    splits = r.choice([None, None, 1, 3, 8])
    dtype = r.choice([torch.float32, torch.float32, torch.bfloat16])
    desc = (f"sdecode:{seed} {backend} mask={mask!r} score={score!r} B{B}-Hq{Hq}-Hk{Hk}-"
            f"Lq{Lq}-cap{cap}-D{D} lens={lens} paged={paged} splits={splits} {dtype}")
    LAST["desc"] = desc
    params = score_params(score, Hq)
    try:
        pat = spattn.compile(mask, score=score, backend=backend, **params)
    except SpattnError:
        return desc + " (refused at compile)"
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, cap, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, cap, D, generator=g).to(dtype)
    tabs = {n: torch.randn(TABLE_SHAPES[n](Hq), generator=g).to(dtype) for n in pat.score_inputs}
    seq = None if lens is None else torch.tensor(lens)
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
    outs, lses = [], []
    G = Hq // Hk
    for b in range(B):
        L = cap if lens is None else lens[b]
        ro, rlse = pattern_reference(pat, q.double(), *(t[:, :, :L].double()
                                                        .repeat_interleave(G, 1) for t in (k, v)),
                                     **{n: t.double() for n, t in tabs.items()})
        outs.append(ro[b:b + 1])
        lses.append(rlse[b:b + 1])
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-4
    _close(f"{desc} o", o, torch.cat(outs), atol=tol, rtol=tol if dtype == torch.bfloat16
           else 2e-3)
    _close(f"{desc} lse", lse, torch.cat(lses), atol=tol, rtol=tol if dtype == torch.bfloat16
           else 2e-3)
    if lens is None and not paged and cap >= 256 and cap >= 4 * Lq:
        # as routed calls: the first leaves the routed fast entry, the second takes it
        for L in (cap, cap - 1) if cap - 1 >= max(256, 4 * Lq) else (cap, cap):
            with torch.no_grad():
                o = pat(q, k[:, :, :L], v[:, :, :L], **tabs)
            ro = pattern_reference(pat, q.double(), *(t[:, :, :L].double()
                                                      .repeat_interleave(G, 1) for t in (k, v)),
                                   **{n: t.double() for n, t in tabs.items()})[0]
            _close(f"{desc} routed L{L}", o, ro, atol=tol,
                   rtol=tol if dtype == torch.bfloat16 else 2e-3)
    return desc


#: masks over a runtime input ``doc``: source -> the shape of ``doc`` given ``B``, ``Hq``
#: and a length ``P`` that covers every position read (an index read at ``b`` takes no
#: leading batch dim)
DOC_MASKS = {"same(doc)": lambda B, Hq, P: (P,),
             "doc[q] >= doc[k] | causal": lambda B, Hq, P: (P,),
             "doc[b, q] == doc[b, k]": lambda B, Hq, P: (B, P),
             "k >= doc[b, h]": lambda B, Hq, P: (B, Hq)}


def vmap_case(seed: int) -> str:
    """``vmap(grad(f))`` over a random mask (possibly conjoined with one reading a runtime
    input ``doc``) with a random score or none, random mapped dims of q, k, v (or unmapped),
    ``doc`` and the tables mapped or shared, with or without a leading batch dim, both
    backends: each sample's output and gradients of q, k, v and the tables against its own
    float64 reference."""
    from torch.func import grad, vmap
    r = random.Random(seed)
    backend = r.choice(["torch", "torch", "triton"])
    mask = rand_mask(r)
    doc = r.choice(sorted(DOC_MASKS)) if r.random() < 0.5 else None
    if doc is not None:
        mask = f"({mask}) & {doc}"
    score = rand_score(r, r.randint(1, 3)) if r.random() < 0.6 else None
    Hk = r.choice([1, 2])
    Hq = Hk * r.choice([1, 2])
    N, B = r.randint(1, 3), r.choice([1, 2])
    Lq, Lk = r.randint(1, 24), r.randint(1, 24)
    D = 16
    q_offset = r.choice([None, 0, r.randint(-5, 30)])
    dims = [r.choice([0, 0, 1, None]) for _ in range(3)]
    if all(d is None for d in dims):
        dims[0] = 0
    desc = (f"vmap:{seed} {backend} mask={mask!r} score={score!r} N{N}-B{B}-Hq{Hq}-Hk{Hk}-"
            f"Lq{Lq}-Lk{Lk} q_offset={q_offset} dims={dims}")
    LAST["desc"] = desc
    params = score_params(score, Hq) if score else {}
    try:
        p = spattn.compile(mask, score=score, backend=backend, **params)
    except SpattnError:
        return desc + " (refused at compile)"
    g = torch.Generator().manual_seed(seed)

    def mapped(shape, d):
        """``[N, *shape]`` per-sample values, and the tensor as passed (mapped at ``d``)."""
        x = torch.randn(N, *shape, generator=g)
        return x, (x[0] if d is None else x.movedim(0, d))

    (qs, q), (ks, k), (vs, v) = (mapped(s, d) for s, d in zip(
        [(B, Hq, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D)], dims))
    do = torch.randn(N, B, Hq, Lq, D, generator=g)
    names, per, vals, in_dims = [], [], [], []
    if doc is not None:
        shape = DOC_MASKS[doc](B, Hq, Lk + Lq + abs(q_offset or 0) + 2)
        if "doc[b" not in doc and r.random() < 0.3:
            shape = (r.choice([1, B]),) + shape       # a leading batch dim
        d = r.choice([0, None])
        x = torch.randint(0, 3, (N, *shape), generator=g).sort(-1).values
        names.append("doc")
        per.append(x)
        vals.append(x[0] if d is None else x)
        in_dims.append(d)
    for n in p.score_inputs:
        shape = TABLE_SHAPES[n](Hq)
        shape = r.choice([(), (1,), (B,)]) + shape
        d = r.choice([0, None])
        x = torch.randn(N, *shape, generator=g)
        names.append(n)
        per.append(x)
        vals.append(x[0] if d is None else x)
        in_dims.append(d)
    tables = [i for i, n in enumerate(names) if n in p.score_inputs]

    def f(q, k, v, do, *xs):
        o = p(q, k, v, q_offset=q_offset, **dict(zip(names, xs)))
        return (o * do).sum(), o

    try:
        gs, o = vmap(grad(f, argnums=(0, 1, 2, *(4 + i for i in tables)), has_aux=True),
                     in_dims=(*dims, 0, *in_dims))(q, k, v, do, *vals)
    except SpattnError as e:
        return desc + f" (refused: {str(e).splitlines()[0][:80]})"
    for i in range(N):
        xs = {n: (x[i] if d is not None else x[0]) for n, x, d in zip(names, per, in_dims)}
        leaves = [t[i if d is not None else 0].double().requires_grad_(True)
                  for t, d in zip((qs, ks, vs), dims)]
        tl = {n: (t.double().requires_grad_(True) if n in p.score_inputs else t)
              for n, t in xs.items()}
        ro, _ = pattern_reference(p, *leaves, q_offset=q_offset, **tl)
        if ro.isnan().any():
            return desc + " (NaN in the reference: an unguarded score)"
        want = torch.autograd.grad((ro * do[i].double()).sum(),
                                   leaves + [tl[names[j]] for j in tables], allow_unused=True)
        _close(f"{desc} o[{i}]", o[i], ro, atol=2e-4)
        for n, a, b, leaf in zip(["dq", "dk", "dv", *(names[j] for j in tables)], gs, want,
                                 leaves + [tl[names[j]] for j in tables]):
            b = torch.zeros_like(leaf) if b is None else b
            scale = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
            _close(f"{desc} {n}[{i}]", a[i], b, atol=1e-3 * scale)
    return desc


LAST = {"desc": ""}
KINDS = {"score": score_case, "layout": layout_case, "decode": decode_case,
         "sdecode": sdecode_case, "vmap": vmap_case}


def main():
    args = search.parser(__doc__, KINDS).parse_args()
    search.run(args, KINDS, LAST)


if __name__ == "__main__":
    main()
