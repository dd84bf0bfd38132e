"""Scores whose sum has terms of the query alone (ALiBi's ``-m * (q - r)`` after the split at
the tile's first query, a bias of the query or the head): the Triton kernels leave those
terms out of every pair and add them to the row's log-sum-exp (``ir.score.row_terms``,
docs/backends.md "Scores"); a positive constant factor of the rest (softcap's) joins the
softmax's scale (``ir.score.outer_factor``). Under the interpreter, against the float64 reference: the
output, the lse the call returns, and the gradients to q, k, v and the learnable tables;
a row whose term is ``-inf`` allows nothing (output 0, lse ``-inf``, no gradient)."""
import pytest
import torch

import spattn
from spattn.codegen.kernels import _score_code
from spattn.runtime.reference import pattern_reference

pytestmark = pytest.mark.interpreter

H = 3

# (id, mask, score, tables {name: shape})
CASES = [
    ("alibi", "causal", "alibi(alibi_slope)", {}),
    ("query-head-and-key-tables", "causal & window(20)", "s + w[h, q] + u[k] + t[h]",
     {"w": (H, 48), "u": (48,), "t": (H,)}),
    ("query-term-over-full", "full", "s - 0.5 * float(q) + 0.25 * float(k)", {}),
    ("learned-slope", "causal", "s - m[h] * float(q - k)", {"m": (H,)}),
    # softcap's constant factor goes to the softmax's scale, its row terms to the lse
    ("softcap-beside-row-terms", "causal & window(30)", "softcap(3.0) + 0.25 * float(q) + t[h]",
     {"t": (H,)}),
    # log(0) = -inf: the first query's row allows nothing
    ("row-at-minus-inf", "causal", "s + log(float(q))", {}),
]


def _call(case, *, B=2, Lq=40, Lk=48, D=16, Hk=H, q_offset=None, seed=0):
    name, mask, score, tables = case
    p = spattn.compile(mask, score=score, backend="triton")
    assert _score_code(p, "fwd", False).row_value is not None      # the path under test
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).requires_grad_(True)
    k = torch.randn(B, Hk, Lk, D, generator=g).requires_grad_(True)
    v = torch.randn(B, Hk, Lk, D, generator=g).requires_grad_(True)
    ins = {n: (torch.rand(shape, generator=g) * 0.5).requires_grad_(True)
           for n, shape in tables.items()}
    o, lse = p(q, k, v, q_offset=q_offset, return_lse=True, **ins)
    do = torch.randn(o.shape, generator=g)
    leaves = [q, k, v] + list(ins.values())
    got = torch.autograd.grad(o, leaves, do)
    ref = [x.detach().double().requires_grad_(True) for x in leaves]
    ro, rlse = pattern_reference(p, *ref[:3], q_offset=q_offset,
                                 **dict(zip(ins, ref[3:])))
    want = torch.autograd.grad(ro, ref, do.double())
    return o, lse, got, ro, rlse, want, ["dq", "dk", "dv"] + [f"d{n}" for n in ins]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_row_terms_in_the_lse(case):
    o, lse, got, ro, rlse, want, names = _call(
        case, q_offset=0 if case[0] == "row-at-minus-inf" else 5)
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)
    dead = rlse == float("-inf")
    assert torch.equal(lse == float("-inf"), dead)
    torch.testing.assert_close(lse.double()[~dead], rlse[~dead], atol=2e-4, rtol=1e-4)
    for what, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=2e-3, msg=what)
    if case[0] == "row-at-minus-inf":
        assert bool(dead[:, :, 0].all()) and bool((o[:, :, 0] == 0).all())


def test_row_terms_with_grouped_heads_and_a_decode_offset():
    """GQA (3 query heads on one key head) and queries aligned to the end of the keys: the
    row term reads the query's position, not its row."""
    o, lse, got, ro, rlse, want, names = _call(CASES[1], Lq=7, Lk=48, Hk=1)
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(lse.double(), rlse, atol=2e-4, rtol=1e-4)
    for what, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=2e-3, msg=what)


def test_every_kernel_moves_the_rows():
    """The forward adds them to the lse it stores; dQ and dK/dV subtract them from the lse
    they read; no pair of any kernel computes the query's term."""
    p = spattn.compile("causal", score="alibi(alibi_slope)")
    for kind in ("fwd", "dq", "dkdv"):
        sc = _score_code(p, kind, False)
        assert sc.row_lines and not any("o_q" in line for line in sc.lines
                                         if not line.startswith("o_r ="))
    assert "lse = tl.where(m_none, float(\"-inf\"), lse + b_rw * LN2)" in p.kernel_source("fwd")
    soft = spattn.compile("causal", score="softcap(3.0) + 0.25 * float(q)")
    for kind in ("fwd", "dq", "dkdv"):
        sc = _score_code(soft, kind, False)
        assert sc.row_value is not None and float(sc.factor) == pytest.approx(3.0 * 1.4426950408889634)
    bwd = p.kernel_source("bwd")
    assert "b_lse - tl.sum(" in bwd[bwd.index("def attn_bwd_dq"):]          # dQ
    assert "b_lse[None, :] - (" in bwd[bwd.index("def _dkdv"):]              # dK/dV


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_dead_and_live_rows(backend):
    """``s + log(float(h - 1))``: NaN on head 0 (its rows are NaN, the lse too: a NaN row's
    lse was -inf in the reference and on the torch backend, NaN in the kernels), ``-inf``
    on head 1 (nothing allowed: output 0, lse ``-inf``), a constant on head 2 (the
    reference's output and lse)."""
    p = spattn.compile("causal", score="s + log(float(h - 1))", backend=backend)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, H, 20, 16, generator=g) for _ in range(3))
    o, lse = p(q, k, v, return_lse=True)
    ro, rlse = pattern_reference(p, q.double(), k.double(), v.double())
    for got, want in ((o, ro), (lse, rlse)):
        assert bool(got[:, 0].isnan().all()) and bool(want[:, 0].isnan().all())
    assert bool((o[:, 1] == 0).all()) and bool((lse[:, 1] == float("-inf")).all())
    assert bool((rlse[:, 1] == float("-inf")).all())
    torch.testing.assert_close(o[:, 2].double(), ro[:, 2], atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(lse[:, 2].double(), rlse[:, 2], atol=2e-4, rtol=1e-4)
