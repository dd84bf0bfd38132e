"""The Triton kernels of folded scores (docs/backends.md "Scores": log2 or natural units,
the scale folded into the score's factors, query-only and key-only terms on the tile's
vectors, q - k split at the tile's first query) against the float64 reference: outputs and
gradients to q, k, v and the tables, under the interpreter; ALiBi at 4096 keys with the
smallest and largest slopes."""
import pytest
import torch

import spattn
from spattn.codegen.kernels import _score_code
from spattn.runtime.reference import pattern_reference

from tests.runtime.test_score_loads import _flags, _run
from tests.runtime.test_scores import H, check

pytestmark = pytest.mark.interpreter

# (id, mask, score, params, tables {name: shape}, needs doc)
CASES = [
    ("alibi", "causal", "alibi(alibi_slope)", {}, {}, False),
    ("softcap", "causal", "softcap(3.0)", {}, {}, False),
    ("table-bias", "causal & window(24)", "s + rel[h, clamp(q - k, 0, 23)]", {},
     {"rel": (H, 24)}, False),
    ("q-and-k-terms", "causal", "s + w[q] + u[k]", {}, {"w": (48,), "u": (48,)}, False),
    ("times-s", "causal", "s * t[h]", {}, {"t": (H,)}, False),
    ("int-distance-over-a-constant", "full", "(s - 0.25 * (q - k)) / 2.0 + w[q]", {},
     {"w": (48,)}, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_folded_scores_match_the_reference(case):
    check(case, "triton", Lq=40, Lk=48, q_offset=5)


@pytest.mark.parametrize("table", [False, True], ids=["no-table", "table"])
def test_query_terms_infinite_past_the_rows(table):
    """A term of the query alone finite on every row of the call and infinite past it
    (-2 log(Lk - 1 - q) is +inf from q = Lk - 1 on, beyond Lq = 5): the backward's padded
    rows keep p = 0 (lse +inf), so no gradient is NaN, a table's included."""
    score = "-2.0 * (s + log(float(max(Lk - 1 - q, 0))))"
    tables = {}
    if table:
        score, tables = score + " + rel[h, clamp(q - k, 0, 7)]", {"rel": (H, 8)}
    check(("rows-infinite-past-lq", "chunked(8) | window(5)", score, {}, tables, False),
          "triton", Lq=5, Lk=16, q_offset=0)


def test_units_follow_the_count():
    """Scores of vectors and of s run in log2 units; a pairwise table in natural ones."""
    units = {c[0]: _score_code(spattn.compile(c[1], score=c[2]), "fwd", False).log2
             for c in CASES}
    assert units == {"alibi": True, "softcap": True, "table-bias": False,
                     "q-and-k-terms": True, "times-s": True,
                     "int-distance-over-a-constant": True}


def test_alibi_at_4096_keys():
    """The last 32 queries of 4096 against every key, the largest and the smallest slopes
    of 8 heads (2^-1, 2^-8), fp32: the split of k - q at the tile's first query keeps outputs
    and gradients at the float64 reference's precision at every distance."""
    p = spattn.compile("causal", score="alibi(m[h])", m=[0.5, 2.0 ** -8], backend="triton")
    g = torch.Generator().manual_seed(4096)
    B, nh, Lq, Lk, D = 1, 2, 32, 4096, 16
    q = torch.randn(B, nh, Lq, D, generator=g).requires_grad_(True)
    k = torch.randn(B, nh, Lk, D, generator=g).requires_grad_(True)
    v = torch.randn(B, nh, Lk, D, generator=g).requires_grad_(True)
    o = p(q, k, v)
    do = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad(o, (q, k, v), do)
    ref = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ro, _ = pattern_reference(p, *ref)
    want = torch.autograd.grad(ro, ref, do.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)
    for what, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=2e-3, msg=what)


@pytest.mark.parametrize("score, params", [
    ("alibi(1e4)", {}), ("alibi(m[h])", {"m": [100.0, 0.5]}), ("s - 1e30 * float(q - k)", {}),
    ("alibi(8.0)", {}), ("alibi(1.0 / m[h])", {"m": [1e-4, 2.0]}),
    ("alibi(max(m[h], 0.5))", {"m": [1e4, 0.1]})],
    ids=["alibi-1e4", "slopes-100-and-half", "1e30", "alibi-8", "reciprocal-slope",
         "max-slope"])
def test_large_slopes_are_computed_per_pair(score, params):
    """A difference of positions times a factor not known to be within ``SPLIT_FACTOR``
    (beyond it, or a function of params the bound does not read) is not split at the tile's
    first query: its two parts, each about the slope times the tile's height,
    would lose the score near the diagonal (where the weight is largest) to their rounding.
    The lse and the gradients match the float64 reference (with the split, alibi(1e4) was
    off by 2e-2 in the lse and 1e-2 in the gradients, alibi(1e30) by 4 in the lse)."""
    from spattn.ir.score import TILE_QUERY, emitted_form
    from spattn.ir.nodes import Var, walk
    p = spattn.compile("causal", score=score, backend="triton", **params)
    assert not any(isinstance(n, Var) and n.name == TILE_QUERY
                   for n in walk(emitted_form(p.score, True)))
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g).requires_grad_() for _ in range(3))
    o, lse = p(q, k, v, return_lse=True)
    do, dl = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((o, lse), (q, k, v), (do, dl))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, rl = pattern_reference(p, *ref)
    want = torch.autograd.grad((ro, rl), ref, (do.double(), dl.double()))
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(lse.double(), rl, atol=2e-5, rtol=2e-4)
    for what, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-3, msg=what)


def test_standard_alibi_slopes_stay_split():
    """The slopes ALiBi's models use (``2^(-8i/H)``, at most 1/2) keep the split form."""
    from spattn.ir.score import TILE_QUERY, emitted_form
    from spattn.ir.nodes import Var, walk
    for score, params in (("alibi(m[h])", {"m": [0.5, 2.0 ** -8]}), ("alibi(0.5)", {}),
                          ("alibi(alibi_slope)", {})):
        p = spattn.compile("causal", score=score, **params)
        assert any(isinstance(n, Var) and n.name == TILE_QUERY
                   for n in walk(emitted_form(p.score, True))), score


@pytest.mark.parametrize("load", ["pair", "early", "gather"])
@pytest.mark.parametrize("far", [False, True], ids=["near", "far-64bit"])
def test_split_difference_in_every_load_variant(load, far, monkeypatch):
    """A split ``q - k`` beside a gathered table and a key vector, every load placement,
    with positions near 2**40 (64-bit kernels: the tile's first query is 64-bit too)."""
    monkeypatch.setenv("SPATTN_SCORE_LOAD", load)
    off = 2 ** 40 if far else 0
    p = spattn.compile("k < 20 | q % 3 == k % 3", backend="triton",
                       score=f"s - 0.25 * (q - k - {off}) + w[k % 8] "
                             f"+ rel[h, clamp(q - k - {off}, 0, 7)]")
    plan = _run(p, 24, {"w": (8,), "rel": (H, 8)}, q_offset=off, seed=7 + far)
    assert plan.forward_stage.config.int64 == far and _flags(plan)[0] == load
