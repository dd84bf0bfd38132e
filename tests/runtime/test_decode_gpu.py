"""On the GPU: the decode kernels in bf16 at 8K..32K keys against the float64 reference,
replayed from a CUDA graph while the cache grows, and compiled once per bucket.

Skipped without CUDA (marker ``gpu``): ``python -m pytest -m gpu tests/runtime/test_decode_gpu.py``.
"""
import pytest
import torch

import spattn
from spattn.runtime import decode as dec
from spattn.runtime.reference import attention_reference

pytestmark = pytest.mark.gpu

CASES = {
    "causal": "causal",
    "window": "causal & window(4096)",
    "streaming": "causal & (window(4096) | sink(4))",
    "documents": "input doc\npattern documents = causal & same(doc)",
}


def _ref(pat, q, k, v, lens, ins):
    outs = []
    for b, L in enumerate(lens):
        m = pat.mask(q.shape[2], L, num_heads=q.shape[1], batch=q.shape[0], device=q.device,
                     **ins)[b:b + 1]
        outs.append(attention_reference(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L],
                                        m)[0])
    return torch.cat(outs)


def _bf16_qkv(B, Hq, Hk, Lq, cap, D, g):
    """Fresh bf16 q ``[B, Hq, Lq, D]``, k and v ``[B, Hk, cap, D]`` on the GPU, drawn in that
    order from ``g``."""
    def draw(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    return draw(B, Hq, Lq, D), draw(B, Hk, cap, D), draw(B, Hk, cap, D)


def _counting_steps(full: list, key):
    """A patch of ``decode._step`` that appends ``key(positional arguments)`` of every call
    (the full path) to ``full``."""
    from unittest import mock
    real = dec._step

    def counted(*a, **kw):
        full.append(key(a))
        return real(*a, **kw)
    return mock.patch.object(dec, "_step", counted)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", list(CASES))
def test_decode_bf16(name, paged):
    g = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hk, Lq, cap, D = 3, 32, 8, 2, 12288, 128
    pat = spattn.compile(CASES[name])
    q, k, v = _bf16_qkv(B, Hq, Hk, Lq, cap, D, g)
    lens = [cap, 9001, 5000]
    ins = {"doc": torch.sort(torch.randint(0, 9, (B, cap), device="cuda", generator=g),
                             dim=-1).values} if name == "documents" else {}
    seq = torch.tensor(lens, device="cuda", dtype=torch.int32)
    if paged:
        ps, n = 64, cap // 64
        perm = torch.randperm(B * n, device="cuda", generator=g)
        table = perm.view(B, n).to(torch.int32)
        kp = torch.empty(B * n, ps, Hk, D, device="cuda", dtype=k.dtype)
        vp = torch.empty_like(kp)
        kp[table.view(-1).long()] = k.view(B, Hk, n, ps, D).permute(0, 2, 3, 1, 4).reshape(
            B * n, ps, Hk, D)
        vp[table.view(-1).long()] = v.view(B, Hk, n, ps, D).permute(0, 2, 3, 1, 4).reshape(
            B * n, ps, Hk, D)
        o = pat.decode(q, kp, vp, seq_lens=seq, page_table=table, **ins)
    else:
        o = pat.decode(q, k, v, seq_lens=seq, **ins)
    ref = _ref(pat, q, k, v, lens, ins)
    err = float((o.double() - ref).norm() / ref.norm())
    assert err < 1e-2, f"{name}: rel. error {err:.2e}"


def test_cuda_graph_replay_while_the_cache_grows():
    """One capture, replayed at growing lengths (seq_lens updated in place): no recompile,
    the results of each length."""
    pat = spattn.compile("causal & (window(1000) | sink(4))")
    g = torch.Generator(device="cuda").manual_seed(1)
    B, Hq, Hk, cap, D = 2, 32, 8, 8192, 128
    q, k, v = _bf16_qkv(B, Hq, Hk, 1, cap, D, g)
    seq = torch.tensor([5000, 4100], device="cuda", dtype=torch.int32)
    step = lambda: pat.decode(q, k, v, seq_lens=seq, check=False)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    plan = next(p for p in dec.DECODE_PLANS._plans.values() if p.pattern == pat)
    kc = plan.module.KERNEL.device_caches[torch.cuda.current_device()][0]
    n0 = len(kc)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lens in ([5000, 4100], [5001, 4101], [7777, 8192]):
        seq.copy_(torch.tensor(lens))
        graph.replay()
        torch.cuda.synchronize()
        ref = _ref(pat, q, k, v, lens, {})
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < 1e-2, f"{lens}: rel. error {err:.2e}"
    assert len(kc) == n0


def test_strided_lengths_and_column_major_page_table_eager_and_graph():
    """``seq_lens`` as a slice of stride 2 and a column-major page table: the step of their
    values, called eagerly and replayed from a CUDA graph after the lengths' storage is
    written in place (the graph replays the contiguous copies too)."""
    pat = spattn.compile("causal & (window(1000) | sink(4))")
    g = torch.Generator(device="cuda").manual_seed(3)
    B, Hq, Hk, cap, D, ps = 3, 16, 4, 4096, 128, 64
    q, k, v = _bf16_qkv(B, Hq, Hk, 1, cap, D, g)
    n = cap // ps
    table = torch.randperm(B * n, device="cuda", generator=g).view(B, n).to(torch.int32)
    kp = torch.empty(B * n, ps, Hk, D, device="cuda", dtype=k.dtype)
    vp = torch.empty_like(kp)
    for t, pool in ((k, kp), (v, vp)):
        pool[table.view(-1).long()] = t.view(B, Hk, n, ps, D).permute(0, 2, 3, 1, 4).reshape(
            B * n, ps, Hk, D)
    table_cm = table.t().contiguous().t()
    wide = torch.full((2 * B,), 7, device="cuda", dtype=torch.int32)
    seq = wide[::2]

    def step():
        return pat.decode(q, kp, vp, seq_lens=seq, page_table=table_cm, check=False)
    lens = [cap, 3001, 1500]
    seq.copy_(torch.tensor(lens))
    ref = _ref(pat, q, k, v, lens, {})
    err = float((step().double() - ref).norm() / ref.norm())
    assert err < 1e-2, f"eager: rel. error {err:.2e}"
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lens in ([2000, 4096, 65], [4000, 100, 3999]):
        seq.copy_(torch.tensor(lens))
        graph.replay()
        torch.cuda.synchronize()
        ref = _ref(pat, q, k, v, lens, {})
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < 1e-2, f"graph {lens}: rel. error {err:.2e}"


def test_growing_contiguous_cache_compiles_once():
    """pat(q, k[:, :, :L], v[:, :, :L]) for growing L (routed to decode): one plan per
    bucket, one compiled kernel."""
    pat = spattn.compile("causal & window(512)")
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    dec.DECODE_PLANS.clear()
    compiled = set()
    for L in range(2049, 4097, 97):
        o = pat(q, k[:, :, :L], k[:, :, :L])
        plan = next(iter(dec.DECODE_PLANS._plans.values()))
        compiled.add(len(plan.module.KERNEL.device_caches[torch.cuda.current_device()][0]))
        ref = attention_reference(q, k[:, :, :L], k[:, :, :L], pat.mask(1, L, device="cuda"))[0]
        assert float((o.double() - ref).norm() / ref.norm()) < 1e-2
    assert len(dec.DECODE_PLANS) == 1 and len(compiled) == 1


@pytest.mark.parametrize("name", ["causal", "left-padding", "softcap"])
def test_repeated_routed_steps_fast_entry_and_bound_launches(name):
    """Routed steps of a growing cache (a model's layers, token after token): the first
    takes the full path, the others the plan's fast entry and its bound launches; a step
    captured in a CUDA graph replays right. Every step against the float64 reference."""
    from spattn.runtime.reference import pattern_reference
    src = {"causal": "causal", "left-padding": "causal & k >= first[b]",
           "softcap": "causal & k >= first[b]"}[name]
    pat = spattn.compile(src, score="softcap(30)" if name == "softcap" else None)

    def _ref(pat, q, k, v, lens, ins):
        G = q.shape[1] // k.shape[1]
        L = lens[0]
        return pattern_reference(pat, q.double(), k[:, :, :L].double().repeat_interleave(G, 1),
                                 v[:, :, :L].double().repeat_interleave(G, 1), **ins)[0]
    g = torch.Generator(device="cuda").manual_seed(3)
    B, Hq, Hk, cap, D = 4, 32, 8, 4608, 128
    q, k, v = _bf16_qkv(B, Hq, Hk, 1, cap, D, g)
    ins = {"first": torch.tensor([0, 397, 1200, 5], device="cuda")} if name != "causal" else {}
    q = q * 4 if name == "softcap" else q                # scores past the softcap's knee
    dec.DECODE_PLANS.clear()
    full = []
    with _counting_steps(full, lambda a: a[2].shape[2]):     # the cache's length
        for L in range(4100, 4600, 50):
            o = pat(q, k[:, :, :L], v[:, :, :L], **ins)
            ref = _ref(pat, q, k, v, [L] * B, ins)
            err = float((o.double() - ref).norm() / ref.norm())
            assert err < 1e-2, f"L{L}: rel. error {err:.2e}"
    assert full == [4100]
    plan = next(iter(dec.DECODE_PLANS._plans.values()))
    assert plan.fast_routed is not None
    assert any(b is not None for b in plan._launches.values())
    assert any(b is not None for b in plan._combines.values())
    L = 4500
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pat(q, k[:, :, :L], v[:, :, :L], **ins)
    q.copy_(torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g))
    graph.replay()
    torch.cuda.synchronize()
    ref = _ref(pat, q, k, v, [L] * B, ins)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_routed_steps_at_a_q_offset_static_cache():
    """A static cache's steps: every layer gets all the slots and the token's ``q_offset``;
    the first layer of a token takes the full path, the others the fast entry of that
    offset. Each step against the float64 reference (the keys past the query unwritten
    noise the pattern never reads)."""
    from spattn.runtime.reference import pattern_reference
    pat = spattn.compile("causal & k >= first[b]")
    g = torch.Generator(device="cuda").manual_seed(4)
    B, Hq, Hk, cap, D = 4, 32, 8, 8192, 128
    q, k, v = _bf16_qkv(B, Hq, Hk, 1, cap, D, g)
    ins = {"first": torch.tensor([0, 397, 1200, 5], device="cuda")}
    dec.DECODE_PLANS.clear()
    full = []
    with _counting_steps(full, lambda a: a[7]):              # q_offset
        for off in (4000, 4001, 4002):
            ref = pattern_reference(pat, q.double(), k.double().repeat_interleave(4, 1),
                                    v.double().repeat_interleave(4, 1), q_offset=off,
                                    **ins)[0]
            for _layer in range(3):
                o = pat(q, k, v, q_offset=off, **ins)
                err = float((o.double() - ref).norm() / ref.norm())
                assert err < 1e-2, f"q_offset {off}: rel. error {err:.2e}"
    assert full == [4000, 4001, 4002]


#: scored decode cases: (mask, score, tables(Hq, cap, device, generator))
SCORED = {
    "softcap": ("causal", "softcap(50)", lambda H, cap, dev, g: {}),
    "alibi": ("causal & window(4096)", "s + slope[h] * float(k - q)",
              lambda H, cap, dev, g: {"slope": torch.rand(H, device=dev, generator=g)}),
    "rel-bias": ("causal & (window(4096) | sink(4))", "s + rel[h, clamp(q - k, 0, 4095)]",
                 lambda H, cap, dev, g: {"rel": torch.randn(H, 4096, device=dev, generator=g)}),
}


def _scored_ref(pat, q, k, v, lens, tables):
    from spattn.runtime.reference import pattern_reference
    G = q.shape[1] // k.shape[1]
    outs = []
    for b, L in enumerate(lens):
        outs.append(pattern_reference(pat, q[b:b + 1].double(),
                                      k[b:b + 1, :, :L].double().repeat_interleave(G, 1),
                                      v[b:b + 1, :, :L].double().repeat_interleave(G, 1),
                                      **{n: t.double() for n, t in tables.items()})[0])
    return torch.cat(outs)


@pytest.mark.parametrize("name", list(SCORED))
def test_scored_decode_bf16_and_cuda_graph(name):
    """A score on the decode kernel in bf16 (grouped heads, ragged lengths, two query rows),
    then one CUDA-graph capture replayed while the cache grows."""
    src, score, make = SCORED[name]
    pat = spattn.compile(src, score=score)
    g = torch.Generator(device="cuda").manual_seed(2)
    B, Hq, Hk, cap, D = 2, 32, 8, 12288, 128
    q, k, v = _bf16_qkv(B, Hq, Hk, 2, cap, D, g)
    tables = make(Hq, cap, "cuda", g)
    seq = torch.tensor([cap, 7001], device="cuda", dtype=torch.int32)
    o = pat.decode(q, k, v, seq_lens=seq, **tables)
    ref = _scored_ref(pat, q, k, v, [cap, 7001], tables)
    err = float((o.double() - ref).norm() / ref.norm())
    assert err < 1e-2, f"{name}: rel. error {err:.2e}"
    step = lambda: pat.decode(q, k, v, seq_lens=seq, check=False, **tables)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for lens in ([5000, 4100], [9999, 12288]):
        seq.copy_(torch.tensor(lens))
        graph.replay()
        torch.cuda.synchronize()
        ref = _scored_ref(pat, q, k, v, lens, tables)
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < 1e-2, f"{name} {lens}: rel. error {err:.2e}"


@pytest.mark.parametrize("streams", [1, 2], ids=["one-stream", "two-streams"])
def test_steps_of_threads_on_one_plan(streams):
    """Four threads stepping one decode plan, on one stream or each pair on its own: every
    step combines its own split kernel's partials (against the float64 reference)."""
    import threading
    pat = spattn.compile("causal & window(4096)")
    side = [torch.cuda.current_stream()] + [torch.cuda.Stream() for _ in range(streams - 1)]
    errors = []

    def work(i):
        g = torch.Generator(device="cuda").manual_seed(40 + i)
        try:
            with torch.cuda.stream(side[i % streams]):
                for _ in range(8):
                    q, k, v = _bf16_qkv(2, 8, 2, 1, 8192, 128, g)
                    o = pat.decode(q, k, v)
                    want = _ref(pat, q.double(), k.double(), v.double(), [8192, 8192], {})
                    err = float((o.double() - want).abs().max())
                    if err > 2e-2:
                        errors.append(f"thread {i}: max error {err:.3g}")
        except Exception as e:      # noqa: BLE001 -- reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not errors, errors
