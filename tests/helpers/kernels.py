"""Shared helpers of the Triton kernel tests (interpreter on the CPU).

Patterns, runtime-input factories, hand-written closed forms (until and besides
``ir.ranges``) and a float64 dense reference.
"""
from __future__ import annotations



from types import SimpleNamespace

import torch

import spattn
from spattn.ir.ranges import Interval
from spattn.ir import build as B
from spattn.runtime.reference import attention_reference

BIG = 10 ** 6
V = B.var
C = B.const


def _add(x, c):
    return B.add(x, C(c))


def trivial_cf():
    """A closed form valid for every pattern: all keys / all queries, no FULL part."""
    return SimpleNamespace(rows=(Interval(None, None, None, None),),
                           cols=(Interval(None, None, None, None),))


def window_cf(W):
    """causal & window(W): keys [qs-W+1, qe], FULL [qe-W+1, qs]; transposed likewise."""
    qs, qe, ks, ke = V("qs"), V("qe"), V("ks"), V("ke")
    return SimpleNamespace(
        rows=(Interval(_add(qs, 1 - W), qe, _add(qe, 1 - W), qs),),
        cols=(Interval(ks, _add(ke, W - 1), ke, _add(ks, W - 1)),))


def window_sink_cf(W, S):
    """causal & (window(W) | sink(S)): two intervals (the second overlaps the first)."""
    qs, qe, ks, ke = V("qs"), V("qe"), V("ks"), V("ke")
    sink_ok = B.cmp("<=", ks, C(S - 1))
    sink_full = B.cmp("<=", ke, C(S - 1))
    return SimpleNamespace(
        rows=(Interval(_add(qs, 1 - W), qe, _add(qe, 1 - W), qs),
              Interval(C(0), B.min_(C(S - 1), qe), C(0), B.min_(C(S - 1), qs))),
        cols=(Interval(ks, _add(ke, W - 1), ke, _add(ks, W - 1)),
              Interval(ks, B.select(sink_ok, C(BIG), _add(ks, -1)),
                       ke, B.select(sink_full, C(BIG), _add(ke, -1)))))


def global_local_cf(n, left, right):
    """global_tokens(n) | local(left, right): three intervals."""
    qs, qe, ks, ke = V("qs"), V("qe"), V("ks"), V("ke")
    g_any = B.cmp("<=", qs, C(n - 1))
    g_all = B.cmp("<=", qe, C(n - 1))
    k_any = B.cmp("<=", ks, C(n - 1))
    k_all = B.cmp("<=", ke, C(n - 1))
    return SimpleNamespace(
        rows=(Interval(_add(qs, -left), _add(qe, right), _add(qe, -left), _add(qs, right)),
              Interval(C(0), C(n - 1), C(0), C(n - 1)),
              Interval(C(0), B.select(g_any, C(BIG), C(-1)), C(0), B.select(g_all, C(BIG), C(-1)))),
        cols=(Interval(_add(ks, -right), _add(ke, left), _add(ke, -right), _add(ks, left)),
              Interval(C(-BIG), C(n - 1), C(-BIG), C(n - 1)),
              Interval(B.select(k_any, C(-BIG), C(1)), B.select(k_any, C(BIG), C(0)),
                       B.select(k_all, C(-BIG), C(1)), B.select(k_all, C(BIG), C(0)))))


def chunked_cf(c):
    """chunked(c): keys [qs//c*c, qe//c*c + c-1], FULL [qe//c*c, qs//c*c + c-1]."""
    qs, qe, ks, ke = V("qs"), V("qe"), V("ks"), V("ke")

    def lo(x):
        return B.mul(B.floordiv(x, C(c)), C(c))
    return SimpleNamespace(
        rows=(Interval(lo(qs), _add(lo(qe), c - 1), lo(qe), _add(lo(qs), c - 1)),),
        cols=(Interval(lo(ks), _add(lo(ke), c - 1), lo(ke), _add(lo(ks), c - 1)),))


def analysis_cf(pattern):
    """The analysis's closed form (``ir.ranges.closed_form``) if usable by the kernels, else None."""
    from spattn.codegen.config import get_closed_form, ranges_ok
    cf = get_closed_form(pattern)
    return cf if cf is not None and ranges_ok(cf) else None


# ---------------------------------------------------------------- inputs

def doc_ids(L, n_docs, gen, batch=None):
    """Sorted document ids over L positions (optionally [batch, L])."""
    def one():
        cuts = torch.sort(torch.randperm(L - 1, generator=gen)[: n_docs - 1] + 1).values
        ids = torch.zeros(L, dtype=torch.int64)
        ids[cuts] = 1
        return torch.cumsum(ids, 0)
    if batch is None:
        return one()
    return torch.stack([one() for _ in range(batch)])


def block_table(nq, nk, gen, density=0.4):
    t = (torch.rand(nq, nk, generator=gen) < density).to(torch.int64)
    t[:, 0] = 1
    return t


# -------------------------------------------------------------- reference

def reference(pattern, q, k, v, *, scale, q_offset, inputs, grad=False):
    """float64 dense reference ``(out, lse[, (qd, kd, vd)])``."""
    Bn, H, Lq, _ = q.shape
    Lk = k.shape[2]
    m = pattern.mask(Lq, Lk, num_heads=H, batch=Bn, q_offset=q_offset, **inputs)
    qd, kd, vd = (x.detach().double().requires_grad_(grad) for x in (q, k, v))
    out, lse = attention_reference(qd, kd, vd, m, scale=scale)
    if grad:
        return out, lse, (qd, kd, vd), m
    return out, lse, m


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def check_close(name, got, want, tol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def check_lse(got, want, tol=1e-3):
    """lse: -inf exactly where the reference is -inf, close elsewhere; never NaN."""
    assert not torch.isnan(got).any()
    ninf = torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), ninf), "lse -inf rows differ"
    if (~ninf).any():
        g, w = got[~ninf].double(), want[~ninf]
        err = float(((g - w).abs() / w.abs().clamp_min(1.0)).max())
        assert err < tol, f"lse: relative error {err:.2e}"


def compile_pattern(src, **params):
    return spattn.compile(src, **params)


def rand_qkv(Bn, Hq, Hk, Lq, Lk, D, dtype=torch.float32, seed=0, layout="bhld"):
    gen = torch.Generator().manual_seed(seed)

    def make(H, L):
        if layout == "blhd":   # [B, L, H, D] transposed to [B, H, L, D]: non-contiguous
            return torch.randn(Bn, L, H, D, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(Bn, H, L, D, generator=gen).to(dtype)
    return make(Hq, Lq), make(Hk, Lk), make(Hk, Lk)


def paged_cache(k, v, page_size, g, spare=2):
    """A contiguous cache ``[B, Hk, cap, D]`` as pools ``[pages, page_size, Hk, D]`` of
    shuffled pages in k's dtype and on its device, with ``spare`` pages of noise:
    ``(k_pool, v_pool, page_table)``, the table int64 ``[B, cap // page_size]``."""
    B, Hk, cap, D = k.shape
    n = cap // page_size
    table = torch.randperm(B * n + spare, generator=g, device=k.device)[:B * n].view(B, n)
    pools = []
    for t in (k, v):
        pool = torch.randn(B * n + spare, page_size, Hk, D, generator=g, device=k.device) \
            .to(k.dtype)
        pool[table.reshape(-1)] = t.view(B, Hk, n, page_size, D).permute(0, 2, 3, 1, 4) \
            .reshape(B * n, page_size, Hk, D)
        pools.append(pool)
    return pools[0], pools[1], table


def check_table_paths(monkeypatch, build):
    """``build()`` (a list of ``(table arguments, grid order, form)`` from
    ``fwd_tables`` / ``bwd_tables``) through the table and order kernels of
    ``runtime/spans_kernel.py`` and through the torch path, each from a fresh
    classification: the same forms and orders, the same spans where spans are used, the
    same runs and PARTIAL lists where runs are used, the same CSR lists elsewhere, the same
    row strides."""
    from spattn.runtime import tables as tb
    got, want = [], []
    for dev, out in ((True, got), (False, want)):
        monkeypatch.setattr(tb, "_device_tables", lambda d, dev=dev: dev)
        out.extend(build())
    assert len(got) == len(want)
    for (ga, go, gs), (wa, wo, ws) in zip(got, want):
        assert gs == ws
        assert torch.equal(go, wo)
        if gs == "spans":
            assert torch.equal(ga[4], wa[4])
        elif gs == "runs":          # PARTIAL lists and the runs
            assert all(torch.equal(x, y) for x, y in zip(ga[:2] + ga[4:5], wa[:2] + wa[4:5]))
        else:
            assert all(torch.equal(x, y) for x, y in zip(ga[:4], wa[:4]))
        assert ga[5:] == wa[5:]


def record_descriptors(monkeypatch) -> list:
    """Record ``(rows, block_d)`` of every TMA descriptor the launchers build (they
    still build it: ``triton_backend._desc`` is wrapped, not replaced)."""
    from spattn.runtime import triton_backend as tb
    built, real = [], tb._desc

    def spy(t, rows, block_d):
        built.append((rows, block_d))
        return real(t, rows, block_d)
    monkeypatch.setattr(tb, "_desc", spy)
    return built
