"""The score language: parsing, types, canonical forms, located errors, T5 buckets and
the compiler's derivatives (docs/language.md §13)."""
import math

import pytest
import torch

import spattn
from spattn.dsl.errors import (SpattnNameError, SpattnParamError, SpattnSyntaxError,
                               SpattnTypeError)
from spattn.ir.lower import parse_score_ir
from spattn.ir.nodes import Score
from spattn.ir.printer import to_source
from spattn.ir.score import derivative, grads, score_env, score_values

SCORES = [
    ("causal", "30.0 * tanh(s / 30.0)", {}),
    ("causal", "softcap(50.0)", {}),
    ("causal", "alibi(slope[h])", {"slope": [0.5, 0.25]}),
    ("causal", "alibi(alibi_slope)", {}),
    ("window(8)", "s + rel[h, clamp(q - k, 0, 7)]", {}),
    ("full", "s + bias[h, t5_bucket(32, 128)]", {}),
    ("causal", "s + bias[h, t5_bucket_causal(32, 128)]", {}),
    ("causal & same(doc)", "if doc[q] == doc[k] then s * 2.0 else s - 1.0", {}),
    ("causal", "-s * 2.0 + q + 0.5 + k", {}),
    ("causal", "max(s, -5.0) + abs(s) + clamp(s, -1.0, 1.5) + exp(s / 8.0) + "
               "sqrt(abs(s)) + log(1.0 + abs(s))", {}),
    ("causal", "s * 1e-3 - 2.5e10 / (s * s + 1.0)", {}),
    ("causal", "s * [1.5, 0.5][h % 2] - rpb[h, q // 8 - k // 8 + 7, q % 8 - k % 8 + 7]", {}),
]
IDS = [f"{m}|{s}" for m, s, _ in SCORES]


@pytest.mark.parametrize("mask,score,kw", SCORES, ids=IDS)
def test_score_round_trips(mask, score, kw):
    p = spattn.compile(mask, score=score, **kw)
    back = parse_score_ir(to_source(p.score), p.score_inputs)
    assert back == p.score
    again = spattn.compile(p.source)                   # the canonical source compiles back
    assert again == p and hash(again) == hash(p) and again.source == p.source
    assert again.score_inputs == p.score_inputs


def test_equal_scores_hash_equal_and_scores_are_identity():
    a = spattn.compile("causal", score="s / 2.0 + 1.0")
    b = spattn.compile("causal", score="1.0 + s / 2.0")
    c = spattn.compile("causal", score="s / 2.0 + 2.0")
    plain = spattn.compile("causal")
    assert a == b and hash(a) == hash(b) and a.source == b.source and a.key == b.key
    assert a != c and a.key != c.key
    assert a != plain and a.key != plain.key and a.ir == plain.ir


def test_program_score_clause_matches_compile_score():
    prog = spattn.compile("param c = 30.0\nparam W = 16\n"
                          "pattern capped = causal & window(W) score softcap(c)\n"
                          "pattern plain = causal", pattern="capped")
    direct = spattn.compile("causal & window(16)", score="softcap(30.0)")
    assert prog == direct
    assert spattn.compile("pattern plain = causal\npattern x = full score s",
                          pattern="plain").score is None


def test_float_params_and_lists():
    p = spattn.compile("causal", score="s * c - m[h] * (q - k)", c=0.5, m=[1, 0.25])
    assert p.params == {"c": 0.5, "m": (1.0, 0.25)}
    assert "[1.0, 0.25][h]" in p.source


ERRORS = [
    # (mask, score, kw, error class, (line, column), text)
    ("causal", "q - k", {}, SpattnTypeError, (1, 1), "a score must be a float"),
    ("causal", "q < k", {}, SpattnTypeError, (1, 1), "a score must be a float"),
    ("causal & s > 0", None, {}, SpattnTypeError, (1, 10), "score variable s"),
    ("q < 0.5", None, {}, SpattnTypeError, (1, 5), "got a float"),
    ("q / 2 < k", None, {}, SpattnSyntaxError, (1, 3), "//"),
    ("window(W)", None, {"W": 2.5}, SpattnParamError, (1, 8), "float"),
    ("causal", "if s > 0.0 then s else 0.0", {}, SpattnTypeError, (1, 4), "comparisons take ints"),
    ("causal", "s + log_bucket(q - k, W[h], 8, 16) * 1.0", {"W": [1, 2]}, SpattnTypeError, (1, 5),
     "constant int"),
    ("causal", "s + tanh(q < k)", {}, SpattnTypeError, (1, 10), "must be a number"),
    ("causal", "s / 0.0", {}, spattn.SpattnValueError, (1, 3), "division by zero"),
]


@pytest.mark.parametrize("mask,score,kw,cls,pos,text", ERRORS,
                         ids=[f"{e[0]}|{e[1]}" for e in ERRORS])
def test_located_errors(mask, score, kw, cls, pos, text):
    with pytest.raises(cls) as info:
        spattn.compile(mask, score=score, **kw)
    err = info.value
    assert (err.line, err.column) == pos, str(err)     # a score= error: in the score's text
    assert text in err.message, str(err)
    assert err.message.startswith("in the score: ") == (score is not None), str(err)


def test_score_given_twice_or_for_a_program():
    with pytest.raises(SpattnParamError, match="already has a score"):
        spattn.compile("causal score s", score="s")
    with pytest.raises(SpattnParamError, match="beside its pattern"):
        spattn.compile("pattern p = causal", score="s")


def _t5(rel: int, bidirectional: bool, buckets: int, max_distance: int) -> int:
    """T5's bucket as transformers computes it (in float64 here)."""
    ret = 0
    if bidirectional:
        buckets //= 2
        ret += (rel > 0) * buckets
        n = abs(rel)
    else:
        n = -min(rel, 0)
    exact = buckets // 2
    if n < exact:
        return ret + n
    v = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (buckets - exact))
    return ret + min(v, buckets - 1)


@pytest.mark.parametrize("macro,bidirectional,nb,md", [
    ("t5_bucket", True, 32, 128), ("t5_bucket_causal", False, 32, 128),
    ("t5_bucket", True, 16, 40), ("t5_bucket_causal", False, 8, 1000)],
    ids=["bi-32-128", "causal-32-128", "bi-16-40", "causal-8-1000"])
def test_t5_buckets_match_the_t5_formula(macro, bidirectional, nb, md):
    p = spattn.compile("full", score=f"s + bias[{macro}({nb}, {md})]")
    (load,) = [n for n in __import__("spattn.ir.nodes", fromlist=["walk"]).walk(p.score)
               if type(n).__name__ == "FLoad"]
    L = 700
    from spattn.ir.evaluate import evaluate
    got = evaluate(load.index[0], {"q": torch.arange(L).view(-1, 1),
                                   "k": torch.arange(L).view(1, -1)})
    want = torch.tensor([[_t5(j - i, bidirectional, nb, md) for j in range(L)]
                         for i in range(L)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("exact,md,nb", [(8, 10 ** 30, 16), (2, 10 ** 70, 40), (16, 128, 32)],
                         ids=["8-1e30-16", "2-1e70-40", "16-128-32"])
def test_log_bucket_thresholds_of_any_max_distance(exact, md, nb):
    """The thresholds are the least distances of each bucket by T5's float64 formula, found
    by bisection: a max_distance of 10**30 put a threshold's float guess some 10**11
    integers off, which the search stepped through one at a time (compile hung)."""
    from spattn.ir.build import log_bucket_thresholds

    def bucket(n):
        return exact + int(math.log(n / exact) / math.log(md / exact) * (nb - exact))
    ts = log_bucket_thresholds(exact, md, nb)
    assert len(ts) == nb - exact - 1
    for j, t in enumerate(ts, 1):
        assert bucket(t) >= exact + j and (t - 1 == exact or bucket(t - 1) < exact + j)
    p = spattn.compile("full", score=f"s + float(log_bucket(abs(q - k), {exact}, {md}, {nb}))")
    assert spattn.compile(p.source) == p


@pytest.mark.parametrize("mask,score,kw", SCORES, ids=IDS)
def test_derivatives_match_autograd(mask, score, kw):
    """The sympy derivatives (d/ds and d/d load) against torch autograd of the score."""
    p = spattn.compile(mask, score=score, **kw)
    torch.manual_seed(0)
    B, H, Lq, Lk = 2, 2, 12, 12
    env = score_env(Lq, Lk, num_heads=H, batch=B, q_offset=0)
    ins = {"doc": torch.tensor([0] * 5 + [1] * 7)} if "doc" in p.inputs else {}
    for name, nd in p.score_inputs.items():
        shape = {"rel": (H, 8), "bias": (H, 32), "rpb": (H, 15, 15)}[name]
        ins[name] = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    s = (torch.randn(B, H, Lq, Lk, dtype=torch.float64) * 3).requires_grad_(True)
    f = score_values(p.score, s, env, ins)
    w = torch.randn_like(f)
    tables = [ins[n] for n in sorted(p.score_inputs)]
    auto = torch.autograd.grad((f * w).sum(), [s] + tables)
    g = grads(p.score)
    ds = score_values(g.ds, s.detach(), env, ins)
    assert torch.allclose(ds * w, auto[0], atol=1e-9), to_source(g.ds)
    for name, table_grad in zip(sorted(p.score_inputs), auto[1:]):
        mine = torch.zeros_like(table_grad)
        from spattn.runtime.scores import _scatter
        for load, d in g.of(name):
            _scatter(mine, load, env, ins, score_values(d, s.detach(), env, ins) * w)
        assert torch.allclose(mine, table_grad, atol=1e-9)


def test_derivative_of_softcap_reuses_the_forward_division():
    p = spattn.compile("causal", score="softcap(30.0)")
    assert to_source(derivative(p.score, Score())) == \
        "-(tanh(s / 30.0) * tanh(s / 30.0)) + 1.0"


def test_user_macros_may_use_s():
    p = spattn.compile("def mycap(c) = c * tanh(s / c)\npattern p = causal score mycap(30.0)")
    assert p == spattn.compile("causal", score="softcap(30.0)")
    with pytest.raises(SpattnTypeError, match="score variable s") as info:
        spattn.compile("def bad = s > 0\npattern p = causal & bad")
    assert (info.value.line, info.value.column) == (1, 11)


HIDING_S = [
    # (source, compile keywords, (line, column) of the name s, what it is)
    ("param s = 3\npattern p = causal score s * 0.5", {}, (1, 7), "a param"),
    ("input s\npattern p = causal & s[k] > 0 score s * 0.5", {}, (1, 7), "an input"),
    ("def s = 2\npattern p = causal score s * 0.5", {}, (1, 5), "a macro"),
    ("grid (s: 4, x: 4)\npattern p = causal score s * 0.5", {}, (1, 7), "a grid axis"),
    ("param s = 3\npattern p1 = causal & q - k < s\npattern p2 = causal score softcap(2.0)",
     {"pattern": "p1"}, (1, 7), "a param"),
    ("causal & q - k < s", {"score": "s * 0.5", "s": 3}, (1, 18), "the keyword param"),
    ("causal & s[k] > 0", {"score": "s * 0.5"}, (1, 10), "a runtime input"),
    ("grid (s: 4, x: 4) causal", {"score": "s * 0.5"}, (1, 7), "a grid axis"),
    ("grid (4, 4) after 1 before s causal score s * 0.5", {"s": 2}, (1, 28),
     "the keyword param"),
]


@pytest.mark.parametrize("src,kw,pos,what", HIDING_S,
                         ids=["param", "input", "def", "axis", "other-pattern", "keyword",
                              "bare-input", "bare-axis", "bare-grid-count"])
def test_a_name_s_beside_a_score_is_refused(src, kw, pos, what):
    """With a score, ``s`` is the score variable: a name ``s`` declared beside it would be
    read instead (a constant score, silently) and is refused where it is written."""
    with pytest.raises(SpattnNameError, match="would hide the score variable s") as info:
        spattn.compile(src, **kw)
    assert (info.value.line, info.value.column) == pos, str(info.value)
    assert info.value.message.startswith(what) and "^" in str(info.value)


def test_s_stays_a_name_without_a_score_and_a_macro_argument_with_one():
    """Without a score a param ``s`` is an ordinary name; a macro's argument ``s`` is the
    argument inside that macro (the prelude's ``strided(s)``), as the score variable is
    outside it."""
    p = spattn.compile("param s = 3\npattern p = causal & q - k < s")
    assert p == spattn.compile("causal & q - k < 3")
    assert spattn.compile("causal & q - k < s", s=3) == p
    p = spattn.compile("def twice(s) = s * 2.0\npattern p = causal & strided(4) "
                       "score twice(s) + softcap(3.0)")
    assert p.score == spattn.compile("causal", score="s * 2.0 + softcap(3.0)").score


@pytest.mark.parametrize("src", ["causal score s * 1e400", "causal score s * -1e400",
                                 "param c = 1e999\npattern p = causal score s * c"],
                         ids=["literal", "negative", "param"])
def test_float_literal_overflow_is_named_a_float(src):
    """An overflowing float literal is a float error (it was called an integer literal)."""
    from spattn.dsl.errors import SpattnValueError
    with pytest.raises(SpattnValueError, match=r"float literal 1e\d+ is too large") as info:
        spattn.compile(src)
    assert "integer" not in str(info.value) and info.value.column > 1


@pytest.mark.parametrize("src,params,value", [
    ("causal score s - 1e39", {}, "-1e+39"),
    ("causal score s - 3e38", {}, "-3e+38"),            # float32 holds it, not times log2(e)
    ("causal score s - 1e30 * 1e30", {}, "-1.0000000000000001e+60"),
    ("causal score s * m[h]", {"m": [0.5, -2e38 * 2]}, "-4e+38"),
    ("param c = 5e38\npattern p = causal score s + c", {}, "5e+38"),
    ("causal score s / 1e-50", {}, "1e-50"),            # 0 in float32: s / 0
    ("causal score s * 1e-50", {}, "1e-50"),
], ids=["literal", "log2-units", "folded", "list-param", "param", "tiny-divisor", "tiny"])
def test_score_constant_beyond_float32_is_refused(src, params, value):
    """A finite constant that the kernels' float32 cannot hold (in log2 units: times
    log2(e)) would be infinite or 0 there and not in the float64 reference (a silent
    disagreement): refused at compile time, located at the score, naming the constant;
    the largest and smallest ones float32 holds still compile."""
    from spattn.dsl.errors import SpattnValueError
    with pytest.raises(SpattnValueError, match="what float32 holds") as info:
        spattn.compile(src, **params)
    assert value in str(info.value) and info.value.line and "^" in str(info.value)
    assert spattn.compile("causal score s - 2.3e38 + m[h] + 2e-38 * s",
                          m=[1.0, -2.3e38]).score is not None


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_score_constant_at_the_float32_edge_matches_the_reference(backend):
    """The largest constant accepted stays finite in the kernels (times 0 here: an
    infinite one would make every row NaN): rows against float64."""
    from spattn.runtime.reference import pattern_reference
    p = spattn.compile("k < 40", score="s + 2.3e38 * float(max(k - 100, 0))", backend=backend)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    o = p(q, k, v)
    ref, _ = pattern_reference(p, q.double(), k.double(), v.double())
    assert torch.isfinite(o).all() and float((o.double() - ref).abs().max()) < 1e-4


def test_a_param_that_requires_grad_is_refused():
    """A float list param given as a tensor that requires grad (a learnable slope) would be
    baked into the pattern as constants and get no gradient: a SpattnParamError says to
    pass it at each call, where the score reads it as a learnable table (whose gradient
    arrives); a plain tensor is a constant."""
    m = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(SpattnParamError, match=r"'m'.*requires grad.*\(m=\.\.\.\)"):
        spattn.compile("causal", score="s * m[h]", m=m)
    assert "[1.0, 2.0][h]" in spattn.compile("causal", score="s * m[h]", m=m.detach()).source
    x = torch.randn(1, 2, 8, 16)
    spattn.compile("causal", score="s * m[h]", backend="torch")(x, x, x, m=m).sum().backward()
    assert m.grad is not None and m.grad.abs().sum() > 0
