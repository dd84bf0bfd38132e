"""Scores in a token layout (``runtime.scores.LayoutRun``, ``ir.layout.remap_score``): a
scored call whose mask runs in a layout gathers q, k, v into slot order and runs the
remapped mask and score there. Output, lse and every gradient (q, k, v, the score's
tables, a loss on the lse) against the float64 reference, on both backends, with padding
slots, residue classes, GQA and batches, called directly and through a plan; the calls
that stay in sequence order."""
import warnings

import pytest
import torch

import spattn
from spattn.runtime.reference import pattern_reference
from spattn.runtime.scores import LayoutRun


def _layout_runs(pat):
    return list(pat._layouts.values())


def _check(pat, L, *, Hq=2, Hk=2, B=1, D=16, tables=None, seed=0, plan=False):
    """Two calls (the second through the last-call memo; with ``plan``, both through one
    plan built before them) against float64: o, lse and the gradients of ``sum(o * do) +
    sum(lse * dl)``. Returns the plan (or None)."""
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(B, Hq, L, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hk, L, D, generator=g) for _ in range(2))
    dl = torch.randn(B, Hq, L, generator=g)
    tabs = {n: torch.randn(*shape, generator=g) for n, shape in (tables or {}).items()}
    ref = [t.double().requires_grad_() for t in (q, k, v, *tabs.values())]
    ro, rl = pattern_reference(pat, *ref[:3], **dict(zip(tabs, ref[3:])))
    fin = torch.isfinite(rl)
    rgrads = torch.autograd.grad((ro * do.double()).sum()
                                 + (rl.masked_fill(~fin, 0) * dl.double()).sum(), ref)
    made = pat.plan(q, k, v, **tabs) if plan else None
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *tabs.values())]
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="spattn")
            o, lse = pat(*leaves[:3], return_lse=True, plan=made,
                         **dict(zip(tabs, leaves[3:])))
            grads = torch.autograd.grad((o * do).sum()
                                        + (lse.masked_fill(~fin, 0) * dl).sum(), leaves)
        torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=2e-5)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse.double()[fin], rl[fin], atol=2e-5, rtol=2e-5)
        for name, a, b in zip(("dq", "dk", "dv", *tabs), grads, rgrads):
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=name)
    return made


CASES = [
    # a 2-D neighbourhood with NATTEN's relative position bias, tables sized exactly for the
    # grid's offsets (the padding slots read clamped coordinates)
    pytest.param(lambda b: spattn.neighborhood((6, 10), 3) & spattn.compile(
        "true", score="s + rpb[h, q // 10 - k // 10 + 5, q % 10 - k % 10 + 9]", backend=b),
        60, dict(tables={"rpb": (2, 11, 19)}), id="nb2d-rpb-L60"),
    # residue classes (dilation), causal, a position term and a select
    pytest.param(lambda b: spattn.neighborhood((6, 10), 3, dilation=(1, 2)) & spattn.compile(
        "causal", score="s + rpb[h, q % 10 - k % 10 + 9] + 0.1 * float(q - k)"
                        " + (if q // 10 == k // 10 then 0.5 else 0.0)", backend=b),
        60, dict(tables={"rpb": (2, 19)}), id="dilated-rpb-causal-L60"),
    # 3-D, softcap, GQA 4/2, two batch elements
    pytest.param(lambda b: spattn.neighborhood((3, 4, 5), (1, 3, 3)) & spattn.compile(
        "true", score="softcap(2.0)", backend=b), 60, dict(Hq=4, Hk=2, B=2), id="nb3d-softcap-gqa"),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("make, L, kw", CASES)
def test_scored_calls_in_a_layout(make, L, kw, backend, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = make(backend)
    _check(pat, L, **kw)
    (run,) = _layout_runs(pat)
    assert isinstance(run, LayoutRun) and run.remap.layout.padded_size >= L
    assert run.run.score is not None and run.run.score_inputs == pat.score_inputs


def test_padding_is_exercised():
    """The first case's layout pads the grid (its boxes do not divide 6 x 10), so the
    clamped coordinates of padding slots are read."""
    from spattn.ir.layout import Grid, choose
    r = choose(spattn.neighborhood((6, 10), 3).ir, 60, 60, 0, force=True)
    assert r.layout.grid == Grid((6, 10)) and r.layout.padded_size > 60


@pytest.mark.parametrize("layout, extra, why", [
    ("off", 0, "SPATTN_LAYOUT=off"),
    ("on", 3, "extra tokens before the grid"),
])
def test_scored_calls_that_stay_in_sequence_order(layout, extra, why, monkeypatch):
    monkeypatch.setenv("SPATTN_LAYOUT", layout)
    pat = spattn.neighborhood((6, 10), 3, extra_before=extra) & spattn.compile(
        "true", score="softcap(3.0)", backend="torch")
    _check(pat, 60 + extra)
    assert not any(_layout_runs(pat)), why


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("make, L, kw", CASES)
def test_a_plan_runs_in_the_layout(make, L, kw, backend, monkeypatch):
    """``pat.plan`` of a scored pattern whose calls run in a layout is the slot pattern's
    plan, built on q, k, v in slot order, holding the gathers: outputs and gradients
    through it against float64, as the call's; another pattern or a q_offset with it is
    refused."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = make(backend)
    plan = _check(pat, L, plan=True, **kw)
    assert isinstance(plan.layout_run, LayoutRun) and plan.layout_origin is pat
    assert plan.pattern is plan.layout_run.run and "in the token layout of" in repr(plan)
    q = torch.randn(kw.get("B", 1), kw.get("Hq", 2), L, 16)
    k = torch.randn(kw.get("B", 1), kw.get("Hk", 2), L, 16)
    tabs = {n: torch.randn(*shape) for n, shape in kw.get("tables", {}).items()}
    other = spattn.compile("causal", score="softcap(9.0)", backend=backend)
    with pytest.raises(spattn.SpattnParamError, match="the plan is for the pattern"):
        other(q, k, k, plan=plan)
    with pytest.raises(spattn.SpattnParamError, match="q_offset"):
        pat(q, k, k, plan=plan, q_offset=3, **tabs)


def test_a_plan_without_a_layout_stays_in_sequence_order(monkeypatch):
    """Where the call stays in sequence order (``SPATTN_LAYOUT=off``), so does the plan."""
    monkeypatch.setenv("SPATTN_LAYOUT", "off")
    pat = spattn.neighborhood((6, 10), 3) & spattn.compile(
        "true", score="s + rpb[h, q % 10 - k % 10 + 9]", backend="torch")
    plan = _check(pat, 60, plan=True, tables={"rpb": (2, 19)})
    assert getattr(plan, "layout_run", None) is None and plan.pattern is pat


def test_explain_prices_a_scored_layout_with_its_copies():
    """explain() of a scored pattern prices its layout with the copies a scored call
    makes, whatever SPATTN_LAYOUT_GATHER says for the mask alone."""
    nb = spattn.neighborhood((64, 64), 9)
    scored = nb & spattn.compile("true", score="softcap(5.0)")
    rep = scored.explain(4096, num_heads=2)
    assert rep.layout["gather"] == "copy" and "with its gathers" in str(rep)
    assert rep.layout["box"] == nb.explain(4096, num_heads=2).layout["box"]


@pytest.mark.interpreter
def test_kernel_source_shows_the_kernel_a_scored_layout_runs(monkeypatch):
    """kernel_source(q, k, v) of a scored call in a layout is the module of the pattern
    over slots that the call runs, not the sequence order's."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    pat = spattn.neighborhood((6, 10), 3) & spattn.compile(
        "true", score="s + rpb[h, q // 10 - k // 10 + 5, q % 10 - k % 10 + 9]",
        backend="triton")
    q = torch.randn(1, 2, 60, 16)
    rpb = torch.randn(2, 11, 19)
    src = pat.kernel_source(q, q, q, rpb=rpb)
    (run,) = _layout_runs(pat)
    assert run.run.source in src and pat.source not in src
    assert run.run.source in pat.kernel_source(q, q, q, kind="bwd", rpb=rpb)
