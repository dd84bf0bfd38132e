"""Nesting depth: a pattern as deep as :data:`ir.lower.MAX_DEPTH` (a score as deep as
``MAX_SCORE_DEPTH``) runs every stage on both backends, forward and backward, from a caller
already 150 frames (a score: 250) deep; one level more is a ``SpattnValueError`` at compile time,
never a ``RecursionError`` from a pass (the printer, the analysis, the code generator,
sympy's derivative)."""
import random
import subprocess
import sys

import pytest
import torch

import spattn
from spattn.dsl.errors import SpattnValueError
from spattn.ir.lower import MAX_DEPTH, MAX_SCORE_DEPTH
from spattn.ir.nodes import depth
from spattn.runtime.reference import pattern_reference

MASKS = {
    "mod-add": lambda e, i: f"({e}) % {97 + i} + 1",
    "if-chain": lambda e, i: f"(if h == {i % 3} & k % {i + 2} != 0 then window({i + 2}) else {e})",
    "abs-min": lambda e, i: f"abs(min({e}, q + {i}) - k)",
}
MASK_ROOT = {"mod-add": ("q - k", "({e}) % 3 == 0"), "if-chain": ("causal", "{e}"),
             "abs-min": ("q", "{e} <= 40")}
SCORES = {
    "softplus": lambda e, i: f"log(1.0 + exp({e}))",
    "softcap": lambda e, i: f"tanh(({e}) / {20 + i}.0) * {20 + i}.0",
    "select": lambda e, i: f"(if k % {i + 2} == 0 then ({e}) * 0.5 else s - 0.25)",
}


def _deepest(step, root, wrap, limit, score=False):
    """The source of ``step`` applied as often as compiles within ``limit``, and its depth."""
    e, best = root, None
    for i in range(limit):
        e = step(e, i)
        src = wrap.format(e=e)
        try:
            p = spattn.compile("causal", score=src) if score else spattn.compile(src)
        except SpattnValueError as err:
            assert "nested too deeply" in str(err), err
            break
        best = (src, depth(p.score if score else p.ir))
    return best


def _in_deep_stack(frames, fn):
    """``fn()`` called ``frames`` Python frames below here (a caller's own deep stack)."""
    return fn() if frames == 0 else _in_deep_stack(frames - 1, fn)


def _run(p, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 3, 40, 16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, 3, 40, 16, generator=g)
    o = p(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, _ = pattern_reference(p, qd, kd, vd)
    want = torch.autograd.grad(ro, (qd, kd, vd), do.double())
    for got, ref in zip((o, dq, dk, dv), (ro, *want)):
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=2e-3)


@pytest.fixture
def interpret(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("kind", list(MASKS))
def test_deepest_mask_runs_everywhere(interpret, kind):
    root, wrap = MASK_ROOT[kind]
    src, d = _deepest(MASKS[kind], root, wrap, MAX_DEPTH)
    assert MAX_DEPTH - 8 < d <= MAX_DEPTH, d
    for backend in ("torch", "triton"):
        p = spattn.compile(src, backend=backend)
        _in_deep_stack(150, lambda: (p.explain(40), _run(p, seed=d)))


@pytest.mark.parametrize("kind", list(SCORES))
def test_deepest_score_runs_everywhere(interpret, kind):
    src, d = _deepest(SCORES[kind], "s", "{e}", MAX_SCORE_DEPTH, score=True)
    assert MAX_SCORE_DEPTH - 8 < d <= MAX_SCORE_DEPTH, d
    for backend in ("torch", "triton"):
        p = spattn.compile("causal & window(20)", score=src, backend=backend)
        _in_deep_stack(250, lambda: _run(p, seed=d))


@pytest.mark.parametrize("levels", [66, 80, 120, 150, 199, 260])
def test_too_deep_is_located_error(levels):
    e = "q - k"
    for i in range(levels):
        e = f"({e}) % 97 + 1"
    with pytest.raises(SpattnValueError, match="nested too deeply") as info:
        spattn.compile(f"({e}) % 3 == 0")
    assert info.value.line == 1


def test_too_deep_score_and_composition():
    e = "s"
    for _ in range(MAX_SCORE_DEPTH):
        e = f"log(1.0 + exp({e}))"
    with pytest.raises(SpattnValueError, match="score nested too deeply") as info:
        spattn.compile("causal", score=e)
    assert (info.value.line, info.value.column) == (1, 1)       # in the score's own text
    assert info.value.message.startswith("in the score: ")
    with pytest.raises(SpattnValueError, match="score nested too deeply") as info:
        spattn.compile(f"pattern p = causal & window(4) score {e}\n")
    assert (info.value.line, info.value.column) == (1, 38)
    src, d = _deepest(MASKS["abs-min"], "q", "{e} <= 40", MAX_DEPTH)
    p = spattn.compile(src)
    deeper = p
    with pytest.raises(SpattnValueError, match="pattern nested too deeply"):
        for _ in range(MAX_DEPTH - d + 1):
            deeper = ~(deeper & spattn.compile("k % 3 != 0"))


@pytest.mark.parametrize("op", ["|", "&"])
def test_long_chains_of_one_operator(op):
    """A chain of 1,500 terms of one of ``| &`` written out in source compiles (the parser
    regroups it as a balanced tree; the IR is flat), masks what its terms say, and the
    canonical source of a union composed in Python compiles back to an equal pattern."""
    n = 1500
    if op == "|":
        terms = [f"(q - k == {3 * i})" for i in range(n)]
        want = lambda d: (d >= 0) & (d % 3 == 0) & (d < 3 * n)      # noqa: E731
    else:
        terms = [f"(q - k != {3 * i})" for i in range(n)]
        want = lambda d: ~((d >= 0) & (d % 3 == 0) & (d < 3 * n))   # noqa: E731
    p = spattn.compile(f" {op} ".join(terms), backend="torch")
    assert depth(p.ir) <= 6                                       # flat, not 1,500 deep
    d = torch.arange(4600)[:, None] - torch.arange(8)[None, :]      # every q - k, and past
    assert torch.equal(p.mask(4600, 8, q_offset=0).reshape(4600, 8), want(d))
    assert spattn.compile(p.source, backend="torch") == p
    composed = spattn.compile("q - k == 1")
    for i in range(2, 800):
        composed = composed | spattn.compile(f"q - k == {i}")
    assert spattn.compile(composed.source) == composed


def test_product_of_many_sums_is_refused_not_expanded():
    """A product of n binomials has 2**n terms: past ``MAX_PRODUCT_TERMS`` it is a located
    error at compile time, where it used to expand for minutes (14 factors)."""
    from spattn.ir.build import MAX_PRODUCT_TERMS
    factors = [f"(q // {i + 2} - k // {i + 3})" for i in range(14)]
    src = " * ".join(factors) + " >= 0"
    with pytest.raises(SpattnValueError, match=rf"expands to up to \d+ terms .*more than "
                                                rf"{MAX_PRODUCT_TERMS}") as info:
        spattn.compile(src, backend="torch")
    # located at the `*` that takes the product past the limit
    assert info.value.line == 1 and src[info.value.column - 1] == "*"
    # within the limit, the expanded product masks as the product does
    src = " * ".join(factors[:4]) + " >= 0"
    m = spattn.compile(src, backend="torch").mask(90, 90).reshape(90, 90)
    qq, kk = torch.arange(90)[:, None], torch.arange(90)[None, :]
    want = torch.ones(90, 90, dtype=torch.int64)
    for i in range(4):
        want = want * (qq // (i + 2) - kk // (i + 3))
    assert torch.equal(m, want >= 0)


@pytest.mark.parametrize("seed", range(4))
def test_chains_of_plus_minus_and_times_mean_what_they_say(seed):
    """``+``/``-`` and ``*`` chains of 32 terms or more are regrouped as balanced trees (the
    signs of a half that follows a ``-`` flip): random chains, short and up to 1,200 terms
    long, mask as Python evaluates them left to right."""
    rng = random.Random(seed)
    qq, kk = torch.arange(40)[:, None], torch.arange(40)[None, :]
    for n in (2, 3, 5, 12, 31, 32, 33, 47, 1200):
        atoms = [rng.choice([f"(q // {rng.randint(1, 9)})", f"(k % {rng.randint(2, 9)})",
                             str(rng.randint(-9, 9)), "q", "k"]) for _ in range(n)]
        ops = [rng.choice("+-") for _ in range(n - 1)]
        src = atoms[0] + "".join(f" {o} {a}" for o, a in zip(ops, atoms[1:]))
        value = torch.as_tensor(eval(src, {"q": qq, "k": kk})).expand(40, 40)
        cut = int(value.float().median())
        got = spattn.compile(f"{src} >= {cut}", backend="torch").mask(40, 40).reshape(40, 40)
        assert torch.equal(got, value >= cut), src[:200]
        factors = [rng.choice(["(q - k)", "(q % 5 - 2)", "(k // 7 + 1)"])
                   for _ in range(min(n, 5))]
        factors += [rng.choice(["3", "-2", "1", "-1"]) for _ in range(min(n, 40) - len(factors))]
        rng.shuffle(factors)
        src = " * ".join(factors)
        value = torch.as_tensor(eval(src, {"q": qq, "k": kk})).expand(40, 40)
        cut = int(value.float().median())
        got = spattn.compile(f"{src} <= {cut}", backend="torch").mask(40, 40).reshape(40, 40)
        assert torch.equal(got, value <= cut), src
    long = " * ".join(["(k % 2 + 1)"] * 60 + ["2"] * 1200)
    with pytest.raises(SpattnValueError, match="more than"):
        spattn.compile(f"{long} > q")      # 60 non-constant factors: 2**60 terms, refused


def test_error_inside_a_long_chain_is_located():
    terms = ["causal"] * 700 + ["q - k"] + ["window(4)"] * 700
    with pytest.raises(spattn.SpattnError, match=r"an operand of \| must be a bool") as info:
        spattn.compile(" | ".join(terms))
    assert (info.value.line, info.value.column) == (1, 700 * len("causal | ") + 1)
    src = "def u(w) = " + " & ".join(f"k % {i + 2} != w" for i in range(600)) + \
          "\npattern p = causal & u(1)\n"
    p = spattn.compile(src, backend="torch")
    m = p.mask(50, 50).reshape(50, 50)
    kk = torch.arange(50)
    keep = torch.ones(50, dtype=torch.bool)
    for i in range(600):
        keep &= kk % (i + 2) != 1
    assert torch.equal(m, torch.tril(torch.ones(50, 50, dtype=torch.bool)) & keep[None, :])


def test_dense_mask_of_a_long_chain_holds_one_term_at_a_time():
    """The dense evaluation keeps only the values of sub-expressions read twice: the 1,500
    terms of ``q - k != c & ...`` at 1000 x 1000 pairs would otherwise hold 1.5 GB of
    bool tensors (each ``q - k == c`` under its ``~``) until the end."""
    code = (
        "import resource, spattn\n"
        "p = spattn.compile(' & '.join(f'(q - k != {3 * i})' for i in range(1500)),\n"
        "                   backend='torch')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m = p.mask(1000, 1000)\n"
        "print(int(m.sum()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    d = torch.arange(1000)[:, None] - torch.arange(1000)[None, :]
    assert int(out[0]) == int((~((d >= 0) & (d % 3 == 0))).sum())
    assert int(out[1]) < 400_000, f"peak grew by {int(out[1]) // 1000} MB"      # KiB
