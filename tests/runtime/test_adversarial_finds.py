"""Bugs the adversarial search (``tests/helpers/adversarial.py``) and the explored property
tests found, each with its class of inputs, on both backends (the Triton kernels under the
interpreter) against the float64 reference."""
import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnInputError, SpattnValueError
from spattn.runtime.reference import attention_reference, pattern_reference

from tests.helpers.adversarial import score_case
from tests.runtime.test_review_scores import assert_matches, run


@pytest.mark.interpreter
@pytest.mark.parametrize("mask,score,tables", [
    ("full", "0.75", {}),
    ("causal", "float(q) * 0.25", {}),
    ("k < q & q >= 4", "w[h] * log(float(max(k - 5, 0)))", {"w": (2,)}),
], ids=["B2-H2-Lq20-Lk24-const", "B2-H2-Lq20-Lk24-rows", "B2-H2-Lq20-Lk24-cols-table"])
def test_scores_without_s_fill_the_tile(mask, score, tables):
    """A score that reads neither ``s`` nor both positions is a scalar, a row or a column of
    the tile: the kernels broadcast it to the tile (the dots of the backward and the
    softmax rows were of the wrong shape: an interpreter AssertionError, a compile error on
    the GPU)."""
    p = spattn.compile(mask, score=score, backend="triton")
    got, want, _ = run(p, B=2, Lq=20, Lk=24, Hk=1, q_offset=3, tables=tables, seed=11)
    assert_matches(got, want, score)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_decode_refuses_a_list_shorter_than_the_heads(backend):
    """A list indexed by ``h`` with fewer entries than query heads is a SpattnValueError in
    a decode step as in a call (the Triton decode kernel selected an entry of the list with
    no bounds check: eight heads ran against four entries); with one entry per head the step
    matches the reference."""
    pat = spattn.compile("causal & q - k < [8, 20, 40, 70][h]", backend=backend)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(2))
    with pytest.raises(SpattnValueError, match=r"4 entries but is indexed with h"):
        pat.decode(torch.randn(1, 8, 2, 16, generator=g), k, v)
    q = torch.randn(1, 4, 2, 16, generator=g)
    o, lse = pat.decode(q, k, v, return_lse=True)
    kx, vx = (t.double().repeat_interleave(2, 1) for t in (k, v))
    ro, rl = attention_reference(q.double(), kx, vx, pat.mask(2, 40, num_heads=4))
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)
    torch.testing.assert_close(lse.double(), rl, atol=2e-4, rtol=2e-3)


@pytest.mark.interpreter
@pytest.mark.parametrize("src,score,params,H", [
    ("causal & k < [100, 100, 0][q // 20]", None, {}, 1),
    ("causal", "s * m[h]", {"m": [0.5, 0.25]}, 4),
], ids=["B1-H1-L64-mask-list-by-q", "B1-H4-L64-score-list-by-h"])
def test_triton_refuses_a_list_indexed_out_of_range(src, score, params, H):
    """A list whose index leaves it at some positions of the call (``q // 20`` reaches 3 at
    L = 64; ``h`` reaches 3 with four heads) is refused on Triton as by the evaluator (the
    torch backend, ``Pattern.mask``): the tile analysis only refused a list index wholly
    out of range on a tile, so an EMPTY tile hid it, and the kernels select list entries
    unchecked (a float list of a score was not checked at all)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, H, 64, 16, generator=g) for _ in range(3))
    # a score's list too short for the call's heads is the call's error (SpattnInputError,
    # checked before any work); a mask's list is the evaluator's (SpattnValueError)
    refused = SpattnValueError if score is None else SpattnInputError
    for backend in ["torch", "triton"]:
        pat = spattn.compile(src, score=score, backend=backend, **params)
        with pytest.raises(refused, match=r"3 entries|2 entries"):
            pat(q, k, v)
    with pytest.raises(SpattnValueError, match=r"3 entries|2 entries"):
        pat.mask(64, 64, num_heads=H) if score is None else pattern_reference(
            pat, q.double(), k.double(), v.double())
    # in range: 60 positions (q // 20 <= 2), two heads
    q, k, v = (t[:, :2, :60] for t in (q, k, v))
    o = pat(q, k, v)
    ro, _ = pattern_reference(pat, q.double(), k.double(), v.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_list_too_short_for_the_heads_names_the_call(backend):
    """A per-head list with fewer entries than the call's heads is refused, on either backend,
    with the values its index takes and the call that gives them (the torch backend said only
    that the index took values "out of 0..2", from inside its tile analysis)."""
    src = "param spans = [1, 2, 3]\npattern p = causal & q - k < spans[h]\n"
    pat = spattn.compile(src, backend=backend)
    q, k, v = (torch.randn(2, 4, 16, 16) for _ in range(3))
    with pytest.raises(SpattnValueError, match=r"list \[1, 2, 3\] has 3 entries but is indexed "
                       r"with h taking values in 0\.\.3 for Lq=16, Lk=16, q_offset=0, 4 heads "
                       r"\(give one entry per head"):
        pat(q, k, v)
    o = pat(q[:, :3], k[:, :3], v[:, :3])
    ro, _ = pattern_reference(pat, *(t[:, :3].double() for t in (q, k, v)))
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)


def test_table_indexed_outside_the_neighbourhood_says_every_pair_reads_it():
    """A relative position bias sized for the neighbourhood (NATTEN's ``[H, 2k - 1, 2k - 1]``)
    is read by every pair of the call, masked or not: the refusal says so and how to clamp
    (it spoke only of query offsets and shifts); clamped, the call matches the reference."""
    g = torch.Generator().manual_seed(2)
    rpb = torch.randn(2, 5, 5, generator=g)
    q, k, v = (torch.randn(1, 2, 36, 16, generator=g) for _ in range(3))
    d = "coord(q, [6, 6], {a}) - coord(k, [6, 6], {a})"
    mask = "neighborhood([6, 6], 3)"
    bad = spattn.compile(mask, score=f"s + rpb[h, {d.format(a=0)} + 2, {d.format(a=1)} + 2]",
                         backend="torch")
    with pytest.raises(SpattnInputError, match=r"every \(q, k\) pair of the call reads it, "
                       r"allowed by the mask or not: clamp the index \(clamp\(i, 0, 4\)\)"):
        bad(q, k, v, rpb=rpb)
    good = spattn.compile(mask, score=f"s + rpb[h, clamp({d.format(a=0)} + 2, 0, 4), "
                          f"clamp({d.format(a=1)} + 2, 0, 4)]", backend="torch")
    o = good(q, k, v, rpb=rpb)
    ro, _ = pattern_reference(good, q.double(), k.double(), v.double(), rpb=rpb.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_score_integers_are_exact_or_refused(backend):
    """The ints of a score obey the mask's rule (exact in 64 bits, or a SpattnValueError
    naming the value): ``k * 2**62`` wrapped silently in the torch backend and the
    reference alike, and on Triton any constant of 2**31 or more was a raw interpreter
    error (an int32 literal: the kernels' 64-bit choice looked at the mask only)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    bad = spattn.compile("causal", score="s + float(k * 4611686018427387904) * 1e-18",
                         backend=backend)
    with pytest.raises(SpattnValueError, match=r"4611686018427387904 \* k"):
        bad(q, k, v)
    ok = spattn.compile("causal", score="s + float(k * 1099511627776 + 3000000000) * 1e-12",
                        backend=backend)
    o = ok(q, k, v)
    ro, _ = pattern_reference(ok, q.double(), k.double(), v.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)


@pytest.mark.interpreter
@pytest.mark.parametrize("src", ["k // 2147483648 == 0 & causal",
                                 "q % 4611686018427387904 == k % 64", "strided(2147483648)"],
                         ids=["B1-H2-L16-div-2p31", "B1-H2-L16-mod-2p62", "B1-H2-L16-strided-2p31"])
def test_a_literal_divisor_past_int32_runs_in_64_bits(src):
    """A constant divisor of 2**31 or more (with a small dividend) makes the kernel 64-bit,
    as any other literal past int32 does: the 32-bit choice read divisors of lengths and
    constants as host values and emitted the literal into an int32 kernel (a raw
    interpreter error, 'Scalar 2147483648 is out of range for type int32'). The 32-bit
    decode kernel refuses it with a SpattnValueError."""
    pat = spattn.compile(src, backend="triton")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    o = pat(q, k, v)
    ro, _ = attention_reference(q.double(), k.double(), v.double(), pat.mask(16, 16, num_heads=2))
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)
    kc, vc = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(2))
    with pytest.raises(SpattnValueError, match="64-bit"):
        pat.decode(q[:, :, :2], kc, vc)


@pytest.mark.interpreter
@pytest.mark.parametrize("big", [3000000000, 2 ** 63], ids=["B1-H2-L5-entry-3e9", "B1-H2-L5-entry-2p63"])
def test_a_list_entry_the_call_never_reads_is_still_a_literal(big):
    """Every entry of a list is a literal of the kernel, read or not: an entry past int32
    (past int64) that the call's positions never select kept the kernel 32-bit (a raw
    interpreter error, 'Scalar ... out of range for type int32'); it now makes the kernel
    64-bit (and an entry past int64 is written wrapped: it is never selected)."""
    vals = [i % 9 for i in range(60)]
    vals[55] = big
    pat = spattn.compile(f"causal & q - k <= {vals}[q % 60]", backend="triton")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    o = pat(q, k, v)
    ro, _ = attention_reference(q.double(), k.double(), v.double(), pat.mask(5, 5, num_heads=2))
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("mask,score,params,shape,q_offset,kw", [
    # adversarial score:1428086513 (a near-tie at k = q - 1 of one row)
    ("clamp((1 * k), 5, 17) >= abs(clamp(q, -3, 10))", "max(softcap(30.0), (alibi(m[h]) + 0.5))",
     {"m": [0.5]}, (2, 1, 23, 16, 16), -6, {}),
    # the same branches, nearly tied at every pair k = q - 1 (s small)
    ("causal & q - k <= 1", "max(softcap(1000.0), alibi(0.5) + 0.5)", {}, (2, 2, 40, 40, 16),
     None, {"scale": 0.05}),
    ("causal & q - k <= 1", "max(alibi(0.5) + 0.5, s * 1.0000001)", {}, (2, 2, 40, 40, 16),
     None, {"scale": 0.05}),
    ("causal & q - k <= 1", "min(alibi(-0.75) - 0.75, s * 0.9999999)", {}, (2, 2, 40, 40, 16),
     None, {"scale": 0.05}),
], ids=["B2-H1-Lq23-Lk16-D16-adversarial-1428086513", "B2-H2-L40-D16-max-softcap-near-ties",
        "B2-H2-L40-D16-max-near-ties", "B2-H2-L40-D16-min-near-ties"])
def test_max_of_nearly_tied_branches_has_one_derivative(backend, mask, score, params, shape,
                                                        q_offset, kw):
    """The derivative of ``max(a, b)`` is ``w a' + (1 - w) b'`` with one ``w = step(a - b)``
    (``min``: ``step(b - a)``): each side's weight was its own step, ``step(a - b)`` and
    ``step(b - a)``, whose differences sympy writes in different orders, so at a near-tie the
    two float32 roundings could give both sides 0 (a derivative 0 where it is 1) or both 1."""
    B, H, Lq, Lk, D = shape
    p = spattn.compile(mask, score=score, backend=backend, **params)
    for seed in range(3):
        g = torch.Generator().manual_seed(1000 * seed + Lq)
        q = torch.randn(B, H, Lq, D, generator=g, requires_grad=True)
        k, v = (torch.randn(B, H, Lk, D, generator=g, requires_grad=True) for _ in range(2))
        o = p(q, k, v, q_offset=q_offset, **kw)
        do = torch.randn(o.shape, generator=g)
        got = [o, *torch.autograd.grad(o, (q, k, v), do)]
        rl = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ro, _ = pattern_reference(p, *rl, q_offset=q_offset, **kw)
        want = [ro, *torch.autograd.grad(ro, rl, do.double())]
        for n, a, b in zip(["o", "dq", "dk", "dv"], got, want):
            torch.testing.assert_close(a.double(), b, atol=2e-4 * (1 if n == "o" else 5),
                                       rtol=2e-3, msg=lambda m: f"{score} seed {seed} {n}: {m}")


def test_adversarial_score_1428086513_replays():
    """The found case itself (torch backend, its own seed's inputs): dQ and dK were wrong at
    one pair, ``k = q - 1`` of row 14, where ``softcap(30.0)`` and ``alibi(0.5) + 0.5``
    nearly tie."""
    assert "max(softcap(30.0), (alibi(m[h]) + 0.5))" in score_case(1428086513)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_abs_of_a_division_has_no_nan_derivative(backend):
    """adversarial score:762742104: the derivative of ``abs(x / d)`` (``d`` a value sympy
    cannot prove non-zero) came back as ``x' (1 / x) x``, NaN at the pairs where the
    ``else`` branch ``q % 4`` is 0 (a NaN in dQ and dK where the reference has none); it is
    ``sign(x / d) x' / d``."""
    p = spattn.compile("causal & (sink(3) | window(4))", backend=backend,
                       score="sqrt(abs((if k - q > -2 then s else float(q % 4)) / "
                             "float(abs(Lq) + 1)) + 0.25)")
    got, want, _ = run(p, B=2, Lq=18, Lk=20, Hk=1, seed=5)
    assert_matches(got, want, "abs of a division")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_sign_and_step_of_s_differentiate_to_zero(backend):
    """``sign`` and ``step`` of a value of ``s`` have derivative 0 (torch's): sympy's
    ``sign`` and ``Heaviside`` differentiated to a ``DiracDelta``, a NotImplementedError
    out of the first backward."""
    p = spattn.compile("causal", score="s * sign(s) + step(s - 0.5) * 0.75", backend=backend)
    got, want, _ = run(p, B=1, Lq=20, Lk=20, Hk=1, seed=8)
    assert_matches(got, want, "sign and step")


@pytest.mark.parametrize("case", ["call:3", "call:8", "layout:2", "decode:3", "seq:6", "ws:23"])
def test_gpu_search_cases_run_on_the_cpu(monkeypatch, case):
    """The GPU search's cases (``tests/helpers/gpu_fuzz.py``) on the CPU's default backend:
    the harness stays runnable, and these draws (bshd views at D = 192, a learned table
    at a q_offset, a flattened 2-D window with GQA, a paged decode step, a sequence of calls
    that rewrites its tensors, a call through a plan as the warp-specialised forward's
    cases make one) match the float64 reference."""
    import tests.helpers.gpu_fuzz as gf
    monkeypatch.setattr(gf, "DEV", "cpu")
    kind, seed = case.split(":")
    desc = gf.KINDS[kind](int(seed))
    assert "refused" not in desc, desc


@pytest.mark.interpreter
@pytest.mark.parametrize("src,H,q_offset", [
    ("q // 9223372036854775808 == k // 9223372036854775808", 2, None),
    ("chunked(9223372036854775808) & causal", 2, None),
    ("[-4, 2147483648][h] <= q - k", 2, None),
    ("(if h == 0 then 2147483648 else -4) <= q - k", 2, None),
    ("k * [-1, 2147483648][h] <= q", 2, None),
    ("q - k >= [1, 4294967295][h]", 2, -3)],
    ids=["div-2p63", "chunked-2p63", "list-2p31-and-negative", "if-2p31-and-negative",
         "coefficient-list-2p31", "list-2p32-minus-1"])
def test_literals_at_the_integer_widths_edges(src, H, q_offset):
    """Constants at the edges of the kernels' integer widths (a divisor of exactly 2**63,
    whose key range holds the coefficient -2**63; a list or ``if`` of a negative constant
    and one in 2**31 .. 2**32 - 1, which Triton types uint32) compile and match the
    reference (Triton refused them: an int32 range error, an unsigned-and-negative
    operation)."""
    p = spattn.compile(src, backend="triton")
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(1, H, 30, 16, generator=g) for _ in range(3))
    o = p(q, k, v, q_offset=q_offset)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), q_offset=q_offset)
    torch.testing.assert_close(o.double(), ro, rtol=1e-4, atol=1e-5)


def test_tile_grids_of_lengths_near_2p63():
    """Tile boxes over a span near 2**63 (Lq = 2**63 - 1 against 8 keys, the queries from
    8 - Lq): no intermediate leaves int64 (torch.arange's own length arithmetic did)."""
    p = spattn.compile("causal & window(5)")
    t = p.tiles(2 ** 63 - 1, 8, 2 ** 60, 4)[0, 0]
    assert t.shape == (8, 2) and t[:-1].eq(0).all() and t[-1].tolist() == [1, 1]


def _far_rows(g, L: int, D: int) -> torch.Tensor:
    """A random ``[1, 1, L, D]`` float32 tensor whose rows lie ``2**31 / (L - 1)`` elements
    apart, so that its last row's offset passes 2**31 (a view of a large, untouched
    allocation: only the rows' pages are written)."""
    S = (1 << 31) // (L - 1) + 1
    t = torch.empty(L * S).as_strided((1, 1, L, D), (0, 0, S, 1))
    return t.copy_(torch.randn(1, 1, L, D, generator=g))


@pytest.mark.interpreter
@pytest.mark.parametrize("far", ["v", "do", "decode-k", "decode-v", "routed-k"])
def test_an_operand_whose_offsets_pass_int32(far):
    """The kernels compute element offsets in 32 bits unless some operand's pass 2**31:
    v's and the output gradient's were not looked at (the forward and the backward read
    past them: a segfault), and the decode kernel looked at none (a sequence-major cache
    viewed as ``[B, H, L, D]`` passes 2**31 at 64K keys of 32 x 1024 channels)."""
    pat = spattn.compile("causal & window(40)", backend="triton")
    g = torch.Generator().manual_seed(17)
    L, D = 200, 16
    near = lambda *s: torch.randn(*s, generator=g)     # noqa: E731
    if far in ("v", "do"):
        q, k = near(1, 1, L, D), near(1, 1, L, D)
        v = _far_rows(g, L, D) if far == "v" else near(1, 1, L, D)
        do = _far_rows(g, L, D) if far == "do" else near(1, 1, L, D)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        o = pat(*leaves)
        o.backward(do)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        want = pattern_reference(pat, *ref)[0]
        want.backward(do.double())
        torch.testing.assert_close(o.detach().double(), want.detach(), atol=2e-5, rtol=2e-5)
        for a, b in zip(leaves, ref):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=2e-5)
        return
    q = near(1, 1, 2, D)
    k = _far_rows(g, L, D) if far.endswith("k") else near(1, 1, L, D)
    v = _far_rows(g, L, D) if far.endswith("v") else near(1, 1, L, D)
    o = pat(q, k, v) if far.startswith("routed") else pat.decode(q, k, v)
    want = pattern_reference(pat, q.double(), k.double(), v.double())[0]
    torch.testing.assert_close(o.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("src, kw", [("causal & keep[q]", "keep"), ("causal", "q_offset")],
                         ids=["keep-q", "q-offset"])
def test_query_rows_without_keys_are_zero_whatever_their_values(backend, src, kw):
    """Query rows the pattern allows no key (padding queries, rows above the first key)
    holding NaN: the output there is 0 and the lse -inf, and every other row matches the
    float64 reference (the torch backend's rows were NaN: NaN plus the mask's -inf)."""
    pat = spattn.compile(src, backend=backend)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 100, 16, generator=g) for _ in range(3))
    q[:, :, :30] = float("nan")
    if kw == "keep":
        keep = torch.ones(100, dtype=torch.bool)
        keep[:30] = False
        args = {"keep": keep}
    else:
        args = {"q_offset": -30}
    o, lse = pat(q, k, v, return_lse=True, **args)
    assert torch.equal(o[:, :, :30], torch.zeros_like(o[:, :, :30]))
    assert torch.isneginf(lse[:, :, :30]).all()
    want, wlse = pattern_reference(pat, q[:, :, 30:].double(), k.double(), v.double(),
                                   **({"keep": keep, "q_offset": 30} if kw == "keep"
                                      else {"q_offset": 0}))
    torch.testing.assert_close(o[:, :, 30:].double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[:, :, 30:].double(), wlse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("Lq, Lk", [(8, 8), (2, 300)], ids=["B1-H2-L8-D16", "B1-H2-Lq2-Lk300-D16"])
def test_a_query_whose_rows_overlap_in_memory(backend, Lq, Lk):
    """q from ``unfold`` (rows one element apart, each element in up to 16 rows): ATen's CPU
    attention writes its output with q's strides, so its rows overlapped and raced (errors
    up to 1e38). Forward, backward, and a repeated decode step (the fast entry)."""
    pat = spattn.compile("causal", backend=backend)
    D = 16
    g = torch.Generator().manual_seed(Lq + Lk)
    k, v = (torch.randn(1, 2, Lk, D, generator=g) for _ in range(2))
    for _ in range(3):
        base = torch.randn(2 * Lq + D, generator=g)
        q = base.unfold(0, D, 1)[:2 * Lq].reshape(1, 2, Lq, D)
        assert q.stride()[2] == 1 and q.stride()[1] == Lq
        leaf = base.clone().requires_grad_(Lq == 8)
        qq = leaf.unfold(0, D, 1)[:2 * Lq].reshape(1, 2, Lq, D)
        kk, vv = (t.clone().requires_grad_(Lq == 8) for t in (k, v))
        o = pat(qq, kk, vv)
        rd = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = pattern_reference(pat, *rd)
        torch.testing.assert_close(o.double(), ref, atol=2e-6, rtol=1e-5)
        if Lq == 8:
            do = torch.randn(o.shape, generator=g)
            o.backward(do)
            ref.backward(do.double())
            torch.testing.assert_close(kk.grad.double(), rd[1].grad, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(vv.grad.double(), rd[2].grad, atol=2e-5, rtol=1e-4)
            # dq of every row, summed into the shared elements as unfold's backward does
            dbase = torch.zeros(2 * Lq + D, dtype=torch.float64)
            rows = rd[0].grad.reshape(2 * Lq, D)
            for i in range(2 * Lq):
                dbase[i:i + D] += rows[i]
            torch.testing.assert_close(leaf.grad.double(), dbase, atol=2e-5, rtol=1e-4)


def test_analyses_name_the_heads_of_a_list_too_short():
    """``explain``, ``tiles`` and the CLI's ``show`` refuse a per-head list shorter than the
    heads with the index's values and the head count, as a call does (they said only
    'outside 0..1')."""
    p = spattn.compile("window(s[h])", s=[1, 2], backend="torch")
    for analyse in (lambda: p.explain(8, num_heads=3), lambda: p.tiles(8, 8, 4, 4, num_heads=3)):
        with pytest.raises(SpattnValueError, match=r"indexed with h taking values in 0\.\.2, "
                                                   r"outside 0\.\.1 \(3 heads: give one entry"):
            analyse()


@pytest.mark.gpu
def test_a_learnable_table_with_strided_keys_on_the_gpu():
    """gpu_fuzz ``call:479877199``: a score table requiring grad, K and V whose last dimension
    has stride 2, bf16, D = 256, bshd: the compiled forward's output was off by 1.29 times
    the reference's largest value (an illegal memory access with ``SPATTN_SCORE_LOAD=early``);
    the interpreter runs it correctly. Such K and V are copied on CUDA (``usage.plain_qkv``)."""
    import tests.helpers.gpu_fuzz as gf
    desc = gf.KINDS["call"](479877199)
    assert "refused" not in desc, desc


def test_gpu_search_scores_of_a_million(monkeypatch):
    """gpu_fuzz ``call:1796589311``: a score of the positions alone near 1e6
    (``float(q * k // 3)``, chunked causal, bf16): dV 5.9e-2 of its largest entry off the
    float64 reference, on the GPU's generated backward and on the CPU's. The backward
    recomputes each probability from the row's float32 lse (about 1e6: an ulp of 0.06), the
    documented limit of large scores (docs/backends.md, "Large scores"); the search's
    gradient tolerance now grows with the rows' |lse| by four of its float32 ulps, and the
    case stays checked within them."""
    import tests.helpers.gpu_fuzz as gf
    monkeypatch.setattr(gf, "DEV", "cpu")
    desc = gf.KINDS["call"](1796589311)
    assert "refused" not in desc and "float32 ulps" in desc, desc
