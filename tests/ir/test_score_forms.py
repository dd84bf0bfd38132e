"""The forms in which kernels compute a score (ir/score.py ``emitted_form``): the same
value as the score (times log2(e) in log2 units) for random scores, exact int splits of
``q - k`` differences at a tile's first query, no division by a constant left, and the
float32 error of ALiBi's split form at long distances."""
import math

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir import build as B
from spattn.ir.evaluate import evaluate
from spattn.ir.lower import parse_score_ir
from spattn.ir.nodes import FConst, FDiv, walk
from spattn.ir.printer import to_source
from spattn.ir.score import (LOG2E, TILE_QUERY, emitted_form, reciprocal, score_env,
                             score_values, split_tile_query)

from tests.helpers.ir_exprs import score_exprs

Q, K, H = B.var("q"), B.var("k"), B.var("h")


@settings(max_examples=40, deadline=None)
@given(score_exprs(), st.sampled_from([None, 3.0, -0.5, 30.0]), st.booleans(),
       st.integers(-20, 20), st.integers(0, 2**16))
@example(parse_score_ir("s - 0.5 * float(q - k)"), None, True, 3, 0)
@example(parse_score_ir("[0.5, 0.25, 2.0][h] * float(k - q) + s"), None, False, -7, 1)
@example(parse_score_ir("30.0 * tanh(s / 30.0)"), None, True, 0, 2)
@example(parse_score_ir("(s + float(2 * k - 3 * q + h)) * (1.0 + [1.0, 2.0, 3.0][h])"),
         4.0, True, 5, 3)
def test_emitted_form_is_the_score(f, div, log2, qr, seed):
    """Any tile's first query ``qr`` (the split is exact in ints whatever it is)."""
    if div is not None:
        f = B.fdiv(f, B.fconst(div))
    g = torch.Generator().manual_seed(seed)
    env = dict(score_env(6, 7, num_heads=3, batch=1, q_offset=-2), **{TILE_QUERY: qr})
    s = (torch.rand(1, 3, 6, 7, generator=g, dtype=torch.float64) - 0.5) * 8
    want = score_values(f, s, env, {}) * (LOG2E if log2 else 1.0)
    got = score_values(emitted_form(f, log2), s, env, {})
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=to_source(f))


@settings(max_examples=40)
@given(score_exprs(), st.sampled_from([3.0, -0.5, 7.0]))
def test_no_division_by_a_constant_is_left(f, c):
    r = reciprocal(B.fdiv(f, B.fconst(c)))
    assert not any(isinstance(n, FDiv) and isinstance(n.b, FConst) for n in walk(r))
    assert not any(isinstance(n, FDiv) and isinstance(n.b, FConst)
                   for n in walk(emitted_form(f, True)))


@settings(max_examples=60)
@given(st.integers(-5, 5).filter(bool), st.integers(-5, 5).filter(bool), st.integers(-9, 9),
       st.integers(-50, 50), st.integers(-50, 50), st.integers(-50, 50), st.integers(0, 3))
def test_split_at_the_tile_query_is_exact(a, b, c, q, k, r, h):
    """``a*q + b*k + h + c = x[q := r] + a*(q - r)``: the first of the key (and heads),
    the second of the query; in ints, exactly."""
    x = B.add(B.scale(Q, a), B.scale(K, b), H, B.const(c))
    col, row = split_tile_query(x)
    assert "q" not in {n.name for n in walk(col) if hasattr(n, "name")}
    assert "k" not in {n.name for n in walk(row) if hasattr(n, "name")}
    env = {"q": q, "k": k, "h": h, TILE_QUERY: r}
    assert evaluate(col, env) + evaluate(row, env) == a * q + b * k + h + c


def test_split_needs_a_linear_query_and_a_key():
    assert split_tile_query(B.add(B.floordiv(Q, B.const(2)), K)) is None   # q // 2: not linear
    assert split_tile_query(B.add(Q, H)) is None                             # no key
    assert split_tile_query(B.sub(B.mul(Q, K), K)) is None                   # q * k: pairwise
    assert split_tile_query(B.add(B.scale(Q, 1 << 20), K)) is None           # too wide a row


def test_alibi_split_form_in_float32_at_long_distances():
    """ALiBi over L = 4096 keys for the last query tile (BM = 128), the smallest and the
    largest slopes of 8 heads (2^-8, 2^-1): the float32 split form (the score times
    log2(e), its row and column parts rounded apart) is within a few float32 ulps of the
    value's magnitude plus the slope's times the tile height, and the softmax weights it
    gives (in float32, as the kernel) match float64 to 1e-6."""
    p = spattn.compile("causal", score="alibi(alibi_slope)")
    L, BM, nh = 4096, 128, 8
    form = emitted_form(p.score, True)
    env = score_env(BM, L, num_heads=nh, batch=1, q_offset=L - BM)
    env[TILE_QUERY] = L - BM
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, nh, BM, L, generator=g, dtype=torch.float64) * 3
    ref = score_values(p.score, s, env, {}) * LOG2E
    got = score_values(form, s.float(), env, {}).double()
    eps = 2.0 ** -24
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / nh) for i in range(nh)], dtype=torch.float64)
    bound = 8 * eps * (ref.abs() + (slopes * LOG2E * BM).view(1, nh, 1, 1) + 3 * LOG2E)
    assert ((got - ref).abs() <= bound).all()
    allowed = env["q"] >= env["k"]
    pr = torch.softmax((ref * math.log(2)).masked_fill(~allowed, -math.inf), -1)
    pg = torch.softmax((got.float() * math.log(2)).masked_fill(~allowed, -math.inf), -1)
    pg = pg.double()
    assert (pr - pg).abs().max() < 1e-6
    for h in (0, nh - 1):          # slope 2^-1 and 2^-8
        assert (pr[0, h] - pg[0, h]).abs().max() < 1e-6
