"""Patterns combined with ``&``, ``|`` and ``~`` (``spattn.pattern.combine``): the masks,
what the result carries (inputs, score, grid, backend, params), the refusals, and calls
of combined patterns through the kernels against the float64 reference."""
import warnings

import pytest
import torch

import spattn
from spattn.runtime.reference import pattern_reference
from tests.helpers.kernels import doc_ids


def _docs(L, n, seed):
    return doc_ids(L, n, torch.Generator().manual_seed(seed))


# (a, b, the inputs a call passes): operands of every kind a user holds
OPERANDS = [
    pytest.param(lambda: spattn.neighborhood((6, 8), 3), lambda: spattn.compile("causal"),
                 lambda L: {}, id="nb2d-causal"),
    pytest.param(lambda: spattn.neighborhood((4, 4, 3), (3, 1, 3), dilation=(1, 2, 1)),
                 lambda: "sink(3)", lambda L: {}, id="nb3d-str"),
    pytest.param(lambda: spattn.compile("causal & same(doc)"),
                 lambda: spattn.compile("window(W) | global_tokens(G)", W=5, G=2),
                 lambda L: {"doc": _docs(L, 4, L)}, id="docs-window"),
    pytest.param(lambda: spattn.compile("causal & same(doc)"),
                 lambda: spattn.compile("keep[k] != 0 & same(doc)"),
                 lambda L: {"doc": _docs(L, 3, L), "keep": torch.arange(L) % 5 != 3},
                 id="shared-input"),
]


@pytest.mark.parametrize("a_fn, b_fn, inputs_fn", OPERANDS)
def test_combined_masks_are_the_masks_combined(a_fn, b_fn, inputs_fn):
    a, b = a_fn(), b_fn()
    pa, pb = (x if isinstance(x, spattn.Pattern) else spattn.compile(x) for x in (a, b))
    L = 48
    ins = inputs_fn(L)
    ma = pa.mask(L, L, **{n: t for n, t in ins.items() if n in pa.inputs})
    mb = pb.mask(L, L, **{n: t for n, t in ins.items() if n in pb.inputs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # ~ of a pattern may allow nothing
        cases = [(a & b, ma & mb), (a | b, ma | mb), (~pa, ~ma), (~pa & b, ~ma & mb)]
    for combined, want in cases:
        got = combined.mask(L, L, **{n: t for n, t in ins.items() if n in combined.inputs})
        assert torch.equal(got, want), combined.source
    assert (a & b).inputs == (a | b).inputs == {**pa.inputs, **pb.inputs}
    assert (~pa).inputs == pa.inputs


def test_a_combination_equals_its_source_compiled():
    a = spattn.compile("causal & window(W)", W=64)
    b = spattn.compile("sink(4) | global_tokens(g)", g=2)
    both = a & b
    assert both == spattn.compile(f"({a.source}) & ({b.source})")
    assert hash(both) == hash(spattn.compile("(sink(4) | global_tokens(2)) & window(64) & causal"))
    assert (a | b) == (b | a) and (a & b).name == "pattern_and_pattern"
    assert both.params == {"W": 64, "g": 2}
    assert (spattn.compile("window(W)", W=8) & spattn.compile("sink(W)", W=2)).params == {}


def test_the_result_carries_grid_score_and_backend():
    nb = spattn.neighborhood((8, 8), 3, extra_before=5)
    scored = spattn.compile("true", score="s + rpb[h, q % 3]", backend="torch")
    both = nb & scored
    assert (both.grid, both.grid_offset, both.grid_suffix) == ((8, 8), 5, 0)
    assert both.score == scored.score and both.score_inputs == {"rpb": 2}
    assert both.backend == "torch" and both.name == "neighborhood_and_pattern"
    assert (~nb).grid == (8, 8) and (nb | "sink(1)").grid == (8, 8)
    assert (nb & spattn.neighborhood((8, 8), 5, extra_before=5)).grid_offset == 5
    # the grid is checked at calls, as for the neighbourhood itself
    q = torch.randn(1, 1, 60, 16)
    with pytest.raises(spattn.SpattnInputError, match="69"):
        both(q, q, q, rpb=torch.randn(1, 3))


def test_grids_of_one_token_count_combine_as_the_language_does():
    """Two neighbourhoods on different grids of one token count mask the same flat tokens:
    the combination is on the 1-D grid of that count, as the language's
    ``neighborhood(...) & neighborhood(...)`` is, and equals it."""
    a, b = spattn.neighborhood((8, 8), 3), spattn.neighborhood((4, 16), 3)
    both = a & b
    assert (both.grid, both.grid_offset, both.grid_suffix) == ((64,), 0, 0)
    src = spattn.compile("neighborhood([8, 8], 3) & neighborhood([4, 16], 3)")
    assert both == src and src.grid == both.grid
    assert torch.equal(both.mask(64, 64), a.mask(64, 64) & b.mask(64, 64))
    extra = spattn.neighborhood((8, 8), 3, extra_after=2) | spattn.neighborhood((2, 33), 1)
    assert (extra.grid, extra.grid_offset, extra.grid_suffix) == ((66,), 0, 0)
    q = torch.randn(1, 1, 60, 16)
    with pytest.raises(spattn.SpattnInputError, match="64"):     # the grid's length holds
        (both & spattn.compile("true", backend="torch"))(q, q, q)


@pytest.mark.parametrize("make, match", [
    (lambda: spattn.neighborhood((8, 8), 3) & spattn.neighborhood((4, 8), 3),
     r"grids of different token counts, grid \(8, 8\) of 'neighborhood' \(64 tokens\) and "
     r"grid \(4, 8\) of 'neighborhood' \(32 tokens\)"),
    (lambda: spattn.neighborhood((8, 8), 3) | spattn.neighborhood((8, 8), 3, extra_after=2),
     "before 2"),
    (lambda: spattn.compile("true", score="softcap(5.0)") & spattn.compile(
        "causal", score="s * 2.0"), "both patterns have a score"),
    (lambda: spattn.compile("same(doc)") & spattn.compile("doc[q, k] != 0"),
     "'doc' is indexed by 1 index in one pattern and by 2"),
    (lambda: spattn.compile("same(doc)") | spattn.compile("true", score="s + doc[h, q]"),
     "'doc' is an int input of one pattern's mask and a float table"),
    (lambda: spattn.compile("causal", backend="torch") & spattn.compile(
        "sink(2)", backend="triton"), "backend 'torch' and backend 'triton'"),
    (lambda: spattn.compile("causal") & 3, "got int 3"),
    (lambda: None | spattn.compile("causal"), "got NoneType"),
    (lambda: spattn.compile("causal") & "causal &", "line 1, column 9"),
], ids=["grids", "extra-tokens", "two-scores", "input-dims", "input-kinds", "backends",
        "int", "none", "bad-source"])
def test_refusals_name_what_is_wrong(make, match):
    with pytest.raises(spattn.SpattnError, match=match):
        make()


def test_a_combination_that_allows_nothing_warns():
    c = spattn.compile("causal")
    with pytest.warns(spattn.SpattnEmptyPatternWarning, match="pattern_and_not_pattern"):
        c & ~c


def _run_against_reference(pat, L, tables, seed):
    """Output, lse and every gradient (q, k, v and the score's tables) of a Triton call of
    ``pat`` against the float64 reference, on fresh random inputs."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, 2, L, 16, generator=g) for _ in range(4))
    tabs = {n: torch.randn(*shape, generator=g) for n, shape in tables.items()}
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *tabs.values())]
    named = dict(zip(tabs, leaves[3:]))
    o, lse = pat(*leaves[:3], return_lse=True, **named)
    grads = torch.autograd.grad(o, leaves, do)
    ref = [x.double().detach().requires_grad_() for x in (q, k, v, *tabs.values())]
    ro, rlse = pattern_reference(pat, *ref[:3], **dict(zip(tabs, ref[3:])))
    rgrads = torch.autograd.grad(ro, ref, do.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-4)
    finite = rlse != float("-inf")
    assert torch.equal(lse == float("-inf"), ~finite)
    torch.testing.assert_close(lse.double()[finite], rlse[finite], atol=2e-4, rtol=2e-4)
    for name, got, want in zip(("dq", "dk", "dv", *tabs), grads, rgrads):
        torch.testing.assert_close(got.double(), want, atol=5e-4, rtol=5e-4, msg=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(8, 8), (5, 9)], ids=["grid8x8", "grid5x9"])
def test_combined_neighbourhood_with_a_score_runs_like_the_reference(shape):
    """A neighbourhood & causal with a relative bias given by a third pattern, on the
    Triton backend: output, lse and the gradients of q, k, v and the table."""
    W = shape[1]
    pat = (spattn.neighborhood(shape, 3, stride=(1, 2)) & "causal"
           & spattn.compile("true", score=f"s + rpb[h, q // {W} - k // {W} + {shape[0] - 1}]",
                            backend="triton"))
    assert pat.grid == shape and pat.backend == "triton" and set(pat.score_inputs) == {"rpb"}
    L = shape[0] * shape[1]
    _run_against_reference(pat, L, {"rpb": (2, 2 * shape[0] - 1)}, seed=L)


@pytest.mark.interpreter
def test_combined_neighbourhood_runs_in_the_layout_of_its_grid(monkeypatch):
    """The grid a combination carries is found by the layout discovery: the call runs in a
    layout (a permuted plan) and matches the reference."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.compile("sink(2)", backend="triton") | (
        spattn.neighborhood((8, 8), (3, 5), dilation=(2, 1)) & "causal")
    q = torch.randn(1, 2, 64, 16)
    assert type(pat.plan(q, q, q)).__name__ == "RemappedPlan"
    _run_against_reference(pat, 64, {}, seed=7)
