"""Property tests of score IR: canonical printing round-trips, equal scores hash equal,
the sympy derivative matches autograd (random scores from tests/helpers/ir_exprs.py)."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spattn.ir import build as B
from spattn.ir.lower import parse_score_ir
from spattn.ir.nodes import FLOAT, Score
from spattn.ir.printer import to_source
from spattn.ir.score import derivative, score_env, score_values

from tests.helpers.ir_exprs import score_exprs


@settings(max_examples=40)
@given(score_exprs())
def test_printed_scores_parse_back(f):
    assert f.type == FLOAT
    assert parse_score_ir(to_source(f)) == f


@settings(max_examples=40)
@given(score_exprs(depth=2), score_exprs(depth=2))
def test_sums_and_products_are_canonical(a, b):
    assert B.fadd(a, b) == B.fadd(b, a) and hash(B.fadd(a, b)) == hash(B.fadd(b, a))
    assert B.fmul(a, b) == B.fmul(b, a)
    assert B.fadd(B.fadd(a, b), B.SCORE) == B.fadd(a, B.fadd(b, B.SCORE))


@settings(max_examples=25, deadline=None)
@given(score_exprs(), st.integers(0, 2**16))
@example(parse_score_ir("min(s + (q - k), s + h, s)"), 0)     # three-way ties on the diagonal
@example(parse_score_ir("max(2 * s + (q - k), s + h, s)"), 1)
@example(parse_score_ir("abs(30.0 * tanh(s / 30.0) / float(q + 1))"), 2)   # sinh via re()
@example(parse_score_ir(                   # abs of a division: no x * (1 / x), NaN at x = 0
    "sqrt(abs((if k - q > -2 then s else float(q % 4)) / float(Lq + 1)) + 0.25)"), 3)
@example(parse_score_ir("s * sign(s) + step(s - 0.5)"), 4)   # no DiracDelta: derivative 0
def test_derivative_matches_autograd(f, seed):
    g = torch.Generator().manual_seed(seed)
    env = score_env(6, 7, num_heads=3, batch=1, q_offset=0)
    s = ((torch.rand(1, 3, 6, 7, generator=g, dtype=torch.float64) - 0.5) * 8)
    s = s.requires_grad_(True)
    v = score_values(f, s, env, {})
    auto = torch.zeros_like(s)
    if v.requires_grad:          # a score without s has no graph: its derivative is 0
        (g_,) = torch.autograd.grad(v.sum(), s, allow_unused=True)
        auto = auto if g_ is None else g_
    d = score_values(derivative(f, Score()), s.detach(), env, {})
    torch.testing.assert_close(d, auto, atol=1e-9, rtol=1e-9, msg=to_source(f))


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([
    "max(1000.0 * tanh(s / 1000.0), s + float(k - q) * 0.5 + 0.5)",
    "min(s + float(q - k) * 0.5 - 0.5, 1000.0 * tanh(s / 1000.0))",
    "max(s * 0.3 + float(k - q) * 0.7 + 0.7, 0.3 * (1000.0 * tanh(s / 1000.0)))",
]), st.integers(0, 2**16))
def test_derivative_of_nearly_tied_branches_weighs_them_once(src, seed):
    """At ``k = q - 1`` both branches are about ``s`` (times the same factor): in float32
    their difference rounds either way, yet the derivative is one branch's slope (the two
    weights of ``max``/``min`` are ``w`` and ``1 - w``, never both 0 or both 1)."""
    f = parse_score_ir(src)
    g = torch.Generator().manual_seed(seed)
    env = score_env(64, 64, num_heads=1, batch=1, q_offset=0)
    s = (torch.rand(1, 1, 64, 64, generator=g) - 0.5) * 0.8
    d = score_values(derivative(f, Score()), s, env, {})
    slope = 0.3 if "0.3" in src else 1.0
    diag = torch.diagonal(d[0, 0], offset=-1)
    torch.testing.assert_close(diag, torch.full_like(diag, slope), atol=1e-4, rtol=0)


@pytest.mark.parametrize("src", ["log(1.5 + tanh(float(Lq)))", "exp(tanh(0.5 * float(H)))",
                                 "2.0"], ids=["lengths", "heads", "literal"])
def test_constant_scores_take_the_device_of_s(src):
    # a score of constants evaluates to a 0-d CPU tensor; the reference combines it with
    # masks on the device of s (a CUDA device; "meta" stands in for it here)
    f = parse_score_ir(src)
    env = score_env(3, 4, num_heads=2, batch=1, q_offset=1, device="meta")
    s = torch.empty(1, 2, 3, 4, dtype=torch.float64, device="meta")
    v = score_values(f, s, env, {})
    assert v.device.type == "meta" and v.shape == s.shape and v.dtype == s.dtype
