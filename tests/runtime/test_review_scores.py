"""Hostile scores on both backends (torch; the Triton kernels under the interpreter) against
the float64 reference: a score of -inf (a pair it excludes) in FULL tiles and on whole rows,
infinite or NaN derivatives at excluded or masked pairs, derivatives sympy would take
through complex parts, random score expressions (outputs, gradients to q, k, v and tables,
canonical source round trip), tables swapped between calls of one plan, the mask's tiles
with and without a score."""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spattn
from spattn.dsl.errors import SpattnError
from spattn.ir.score import grads
from spattn.runtime.reference import pattern_reference

H = 2
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def run(p, B=1, Lq=24, Lk=24, Hk=H, D=16, dtype=torch.float32, seed=0, q_offset=None,
        tables=None, **kw):
    """(output, grads of q, k, v and the tables) of ``p`` and of the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype, requires_grad=True)
            for _ in range(2))
    tabs = {n: torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True)
            for n, shape in (tables or {}).items()}
    o = p(q, k, v, q_offset=q_offset, **tabs, **kw)
    do = torch.randn(o.shape, generator=g, dtype=dtype)
    leaves = [q, k, v, *tabs.values()]
    got = [o] + list(torch.autograd.grad(o, leaves, do, allow_unused=True))
    rl = [x.detach().double().requires_grad_(True) for x in leaves]
    ro, _ = pattern_reference(p, *rl[:3], q_offset=q_offset, scale=kw.get("scale"),
                              **dict(zip(tabs, rl[3:])))
    want = [ro] + list(torch.autograd.grad(ro, rl, do.double(), allow_unused=True))
    got = [torch.zeros_like(w) if a is None else a for a, w in zip(got, [ro] + rl)]
    want = [torch.zeros_like(w) if b is None else b for b, w in zip(want, [ro] + rl)]
    return got, want, (q, k, v, tabs, do)


def assert_matches(got, want, what, atol=2e-4):
    names = ["o", "dq", "dk", "dv"] + [f"d{i}" for i in range(len(got) - 4)]
    for n, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{what}: {n} has non-finite values"
        torch.testing.assert_close(a.double(), b, atol=atol * (1 if n == "o" else 5),
                                   rtol=2e-3, msg=lambda m: f"{what} {n}: {m}")


# ------------------------------------------------------------------ -inf scores

# (mask, score, L, the mask whose pairs the score keeps: the same attention)
MINUS_INF = [
    ("full", "s + log(float(max(k - 35, 0)))", 64, "k >= 36"),
    ("causal", "s + log(float(max(k - 35, 0)))", 64, "causal & k >= 36"),
    ("full", "s + log(float(max(q - 40, 0)))", 64, "q >= 41"),
    ("k >= q - 100", "s + log(float(max(k - q + 40, 0)))", 200, "k >= q - 39"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MINUS_INF, ids=["full-keys", "causal-keys", "full-rows",
                                                 "band-200"])
def test_minus_inf_score_excludes_pairs_in_full_tiles(backend, case):
    """A score of -inf is a pair of weight 0, in FULL tiles too (the first tiles of a row all
    -inf used to give exp2(-inf - -inf) = NaN in the forward kernel); a row whose every pair
    is -inf gives 0; the same attention as the mask of the kept pairs."""
    mask, score, L, same = case
    p = spattn.compile(mask, score=score, backend=backend)
    got, want, (q, k, v, _, do) = run(p, Lq=L, Lk=L)
    assert_matches(got, want, score)
    twin = spattn.compile(same, score=score)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ro, _ = pattern_reference(twin, *leaves)
    rg = torch.autograd.grad(ro, leaves, do.double())
    assert_matches(got, [ro, *rg], f"{score} as {same}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score,tables", [
    ("exp(s) * log(float(max(k - 5, 0)))", {}),                  # d/ds = -inf where -inf
    ("s + log(float(max(k - 5, 0))) * exp(w[h])", {"w": (H,)}),  # d/dw = -inf there
    ("s * sqrt(float(q - k))", {}),                               # NaN at masked pairs
], ids=["ds-inf", "dtable-inf", "ds-nan-masked"])
def test_infinite_derivatives_at_excluded_pairs(backend, score, tables):
    """Pairs the mask or a -inf score excludes contribute no gradient, even where the
    score's derivative is infinite or NaN there (0 * inf): the reference and the torch
    backend used to give NaN gradients."""
    p = spattn.compile("causal", score=score, backend=backend)
    got, want, (q, k, v, tabs, do) = run(p, Lq=40, Lk=40, tables=tables)
    assert_matches(got, want, score)
    twin = spattn.compile("causal & k >= 6" if "k - 5" in score else "causal", score=score)
    rl = [x.detach().double().requires_grad_(True) for x in (q, k, v, *tabs.values())]
    ro, _ = pattern_reference(twin, *rl[:3], **dict(zip(tabs, rl[3:])))
    rg = torch.autograd.grad(ro, rl, do.double())
    assert_matches(got, [ro, *rg], f"{score} against its mask")


def test_derivatives_through_abs_of_sqrt_and_log():
    """sympy took abs(sqrt(..)) and abs(log(..)) as complex (a raw NotImplementedError
    translating cos(atan2(..)) back): sqrt and log are real functions for it."""
    for score, ds in [("abs(sqrt(abs(s) + 0.25))", None),
                      ("abs(log(s * s + 0.5))", None),
                      ("exp(tanh(sqrt(abs(sqrt(abs(s) + 0.25)) + 0.25)))", None)]:
        p = spattn.compile("causal", score=score, backend="torch")
        assert grads(p.score).ds is not None
        got, want, _ = run(p, Lq=16, Lk=16)
        assert_matches(got, want, score)


# ------------------------------------------------------------------ random scores

INTS = ["q", "k", "h", "b", "Lq", "Lk", "H", "(q - k)", "(k // 3)", "(q % 4)",
        "log_bucket(abs(q - k), 2, 20, 6)", "t5_bucket(8, 20)"]
LEAVES = ["s", "s", "0.5", "c", "m[h]", "w[h]", "w[0]", "rel[h, clamp(q - k, 0, 7)]",
          "bias[q % 3, k % 5]"]
TABLES = {"w": (H,), "rel": (H, 8), "bias": (3, 5)}
PARAMS = {"c": 0.75, "m": [0.5, -0.25]}


def scores(depth):
    ints = st.sampled_from(INTS)
    leaf = st.one_of(st.sampled_from(LEAVES), ints.map(lambda i: f"float({i})"))
    if depth == 0:
        return leaf
    sub = scores(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from(["+", "-", "*"]), sub).map(lambda t: f"({' '.join(t)})"),
        st.tuples(sub, ints).map(lambda t: f"({t[0]} / float(abs({t[1]}) + 1))"),
        st.tuples(st.sampled_from(["tanh", "abs"]), sub).map(lambda t: f"{t[0]}({t[1]})"),
        sub.map(lambda a: f"exp(tanh({a}))"),
        sub.map(lambda a: f"log(1.5 + tanh({a}))"),
        sub.map(lambda a: f"sqrt(abs({a}) + 0.25)"),
        st.tuples(st.sampled_from(["min", "max"]), sub, sub).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(sub, sub).map(lambda t: f"clamp({t[0]}, -1.0, {t[1]})"),
        st.tuples(ints, sub, sub).map(lambda t: f"(if {t[0]} > 3 then {t[1]} else {t[2]})"))


MASKS = ["causal", "full", "window(5)", "k < q & q >= 4", "causal & window(7)"]


def compile_random(mask, score, backend):
    params = {n: v for n, v in PARAMS.items() if re.search(rf"\b{n}\b", score)}
    try:
        return spattn.compile(mask, score=score, backend=backend, **params)
    except SpattnError:
        return None             # e.g. a score that folds to an int (a SpattnTypeError)


def check_random(p, seed, backend):
    assert spattn.compile(p.source, backend=backend) == p, p.source
    assert hash(spattn.compile(p.source, backend=backend)) == hash(p)
    tables = {n: s for n, s in TABLES.items() if n in p.score_inputs}
    got, want, _ = run(p, B=2, Lq=12, Lk=20, Hk=1, q_offset=5, tables=tables, seed=seed)
    assert_matches(got, want, p.source, atol=1e-4)


@settings(max_examples=25)
@given(st.sampled_from(MASKS), scores(3), st.integers(0, 10 ** 6))
def test_random_scores_torch_backend(mask, score, seed):
    """Random scores of s, positions, heads, batch, lengths, float params and lists, 1-D and
    2-D tables, the float functions, if-then-else and log_bucket; GQA, q_offset, Lq != Lk."""
    p = compile_random(mask, score, "torch")
    if p is not None:
        check_random(p, seed, "torch")


RANDOM_KERNELS = [
    ("window(5)", "(if (q % 4) > 3 then max(s, bias[q % 3, k % 5]) else (s * m[h]))"),
    ("k < q & q >= 4", "exp(tanh((s - rel[h, clamp(q - k, 0, 7)]) * float(t5_bucket(8, 20))))"),
    ("causal", "sqrt(abs(s * w[h]) + 0.25) + log(1.5 + tanh(s / float(abs(q - k) + 1)))"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("mask,score", RANDOM_KERNELS, ids=["select-max", "t5-exp", "sqrt-log"])
def test_random_scores_triton_kernels(mask, score):
    p = compile_random(mask, score, "triton")
    check_random(p, 7, "triton")


# ------------------------------------------------------------------ plans, tables, tiles

@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_of_each_call_and_deterministic(backend):
    """One plan, new tables each call (no table of an earlier call reused); explicit scale;
    deterministic=True with a learnable table; every gradient against the reference."""
    p = spattn.compile("causal & window(8)", score="s + rel[h, clamp(q - k, 0, 7)]",
                       backend=backend)
    for seed, kw in [(1, {}), (2, {"scale": 0.3}), (3, {"deterministic": True})]:
        got, want, _ = run(p, Lq=40, Lk=40, seed=seed, tables={"rel": (H, 8)}, **kw)
        assert_matches(got, want, f"call {seed} {kw}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_gqa_offset_tables(dtype, backend):
    p = spattn.compile("causal & window(9)", score="softcap(2.0) + rel[h, clamp(q - k, 0, 8)]",
                       backend=backend)
    got, want, _ = run(p, Lq=8, Lk=32, Hk=1, q_offset=20, dtype=dtype, tables={"rel": (H, 9)})
    assert_matches(got, want, str(dtype), atol=2e-2)


def test_mask_analysis_ignores_the_score():
    for mask in ["causal & window(7)", "k < q & q >= 4", "abs(q // 8 - k // 8) <= 1"]:
        plain = spattn.compile(mask)
        scored = spattn.compile(mask, score="softcap(2.0) + rel[h, clamp(q - k, 0, 3)]")
        assert torch.equal(plain.tiles(70, 70, 16, 16), scored.tiles(70, 70, 16, 16))
        assert torch.equal(plain.mask(30, 30), scored.mask(30, 30))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score,tables", [
    ("s + w[0] - w[1] * 2.0", {"w": (2,)}),
    ("s * exp(w[b, h]) + u[Lk - Lq + 1]", {"w": (2, H), "u": (4,)}),
    ("s + rel[h, q % 3] * rel[h, k % 3]", {"rel": (H, 3)}),
], ids=["const-index", "batch-head-lengths", "one-table-twice"])
def test_table_reads_without_positions(backend, score, tables):
    """A table read at an index of no position (w[0], u[Lk - Lq + 1]): the kernels' code
    generation asserted it had nothing to hoist (a raw AssertionError); a table read twice
    gets both reads' gradients."""
    p = spattn.compile("causal & window(9)", score=score, backend=backend)
    got, want, _ = run(p, B=2, Lq=20, Lk=22, Hk=1, tables=tables)
    assert_matches(got, want, score)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_score_makes_its_row_nan_with_min_and_max(backend):
    """A NaN score at an allowed pair makes its row NaN on every backend, as in the
    reference; the kernels' float min/max propagate NaN (tl.minimum does not by default on
    the GPU)."""
    for score in ["max(s, sqrt(float(5 - q)))", "clamp(s, -1.0, sqrt(float(5 - q)))"]:
        p = spattn.compile("causal", score=score, backend=backend)
        assert "propagate_nan=tl.PropagateNan.ALL" in p.kernel_source("fwd")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, 24, 16, generator=g) for _ in range(3))
        o = p(q, k, v)
        ro, _ = pattern_reference(p, q.double(), k.double(), v.double())
        assert torch.equal(o.isnan(), ro.isnan()) and bool(o.isnan().any())
        assert torch.isfinite(o[:, :, :6]).all() and o[:, :, 6:].isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4, 4, 8), (2, 1, 4, 8), (2, 4, 8), (2, 4, 4, 8)],
                         ids=["1-H", "B-1", "B", "B-H"])
def test_table_leading_dims_with_gqa(backend, shape):
    """A learnable table's optional [B] / [B, H] leading dims (1 broadcasts: its gradient
    sums over the batch or heads), four query heads on two key heads."""
    p = spattn.compile("causal & window(8)", score="s * 0.5 + rel[h, clamp(q - k, 0, 7)]",
                       backend=backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 16, generator=g, requires_grad=True) for _ in range(2))
    rel = torch.randn(shape, generator=g, requires_grad=True)
    o = p(q, k, v, rel=rel)
    do = torch.randn(o.shape, generator=g)
    got = [o, *torch.autograd.grad(o, (q, k, v, rel), do)]
    rl = [x.detach().double().requires_grad_(True) for x in (q, k, v, rel)]
    ro, _ = pattern_reference(p, *rl[:3], rel=rl[3])
    assert_matches(got, [ro, *torch.autograd.grad(ro, rl, do.double())], str(shape))
