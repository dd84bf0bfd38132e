"""Scores through the public face: compile(score=...), explain(), the command line."""
import io

import pytest
import torch

import spattn
from spattn.cli import main


def run(*argv):
    out = io.StringIO()
    code = main(list(map(str, argv)), out=out)
    return code, out.getvalue()


def test_cli_check_shows_the_score():
    code, text = run("check", "-e", "causal & window(W)", "--score",
                     "softcap(c) + rel[h, clamp(q - k, 0, W - 1)]", "-p", "W=16", "-p", "c=30.0")
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].endswith("score rel[h, min(max(q - k, 0), 15)] + tanh(s / 30.0) * 30.0")
    assert "params: W=16, c=30.0" in lines
    assert "score inputs: rel (2-D float)" in lines


def test_cli_run_with_a_score_checks_against_the_reference():
    code, text = run("run", "-e", "causal & window(16)", "--score",
                     "alibi(0.25) + rel[h, clamp(q - k, 0, 15)]", "--lq", 64, "--heads", 2,
                     "--dim", 16, "--backend", "torch", "--repeat", 1)
    assert code == 0, text
    assert "synthetic random float table, shape (2, 16)" in text and "(ok)" in text


def test_cli_score_needs_an_expression(tmp_path):
    f = tmp_path / "p.spattn"
    f.write_text("pattern p = causal score softcap(5.0)\n")
    code, text = run("check", f)
    assert code == 0 and "score: tanh(s / 5.0) * 5.0" in text
    code, _ = run("check", f, "--score", "s")
    assert code == 2


def test_explain_reports_the_score_and_the_same_tiles():
    plain = spattn.compile("causal & window(64)")
    scored = spattn.compile("causal & window(64)", score="softcap(30.0)")
    a, b = plain.explain(512), scored.explain(512)
    assert a.tiles == b.tiles and a.density == b.density and a.strategy == b.strategy
    assert b.score == "tanh(s / 30.0) * 30.0" and a.score is None
    assert "score     tanh(s / 30.0) * 30.0" in str(b)
    assert torch.equal(plain.tiles(256, 256, 64, 64), scored.tiles(256, 256, 64, 64))


def test_module_and_functional_keep_the_score():
    p = spattn.compile("causal", score="softcap(1.0)")
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    o1 = spattn.attention(q, k, v, pattern=p, backend="torch")
    o2 = p(q, k, v)
    o3 = spattn.attention(q, k, v, pattern="causal", score="softcap(1.0)")
    from spattn.nn import SparseAttention
    o4 = SparseAttention(p, backend="torch")(q, k, v)
    for o in (o1, o3, o4):
        torch.testing.assert_close(o, o2, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(o1, spattn.compile("causal")(q, k, v))


def test_plan_with_a_score_must_be_a_plan():
    p = spattn.compile("causal", score="softcap(1.0)")
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(spattn.SpattnError, match="plan= takes a plan made by pat.plan"):
        p(q, q, q, plan=object())


def test_plans_and_analyses_of_a_scored_pattern():
    p = spattn.compile("causal & window(8)", score="s + rel[h, clamp(q - k, 0, 7)]")
    q = torch.randn(1, 2, 16, 16)
    rel = torch.randn(2, 8)
    plan = p.plan(q, q, q, rel=rel)
    torch.testing.assert_close(p(q, q, q, plan=plan, rel=rel), p(q, q, q, rel=rel))
    plain = spattn.compile("causal & window(8)")
    assert torch.equal(p.mask(16, 16, rel=rel), plain.mask(16, 16))
    assert torch.equal(p.tiles(16, 16, 4, 4, rel=rel), plain.tiles(16, 16, 4, 4))
    assert p.explain(16, rel=rel).tiles == plain.explain(16).tiles


def test_benchmark_dry_run(capsys):
    """benchmarks/scores.py's CPU mode: every score agrees with FlexAttention's score_mod."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import scores as bench_scores
    code = bench_scores.main(["--dry", "--n", "256", "--cases", "causal+alibi,nbhd2d+rpb"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith("| case |") and "nbhd2d+rpb" in out


def test_the_custom_op_refuses_a_score():
    """The mask's torch.library op carries no tables: a scored pattern is refused there,
    never a mask-only answer (its traced calls use spattn::score_attention)."""
    from spattn.runtime import autograd as ag
    p = spattn.compile("causal", score="softcap(1.0)")
    q = torch.randn(1, 2, 16, 16)
    with pytest.raises(spattn.SpattnError, match="score_attention"):
        ag.attention_op(q, q, q, [], ag.register(p), 0.25, 0, "torch", [])


def test_functional_takes_deterministic_as_a_call_does():
    """``spattn.attention(..., deterministic=True)`` runs like ``pat(..., deterministic=True)``
    (it was read as a param to bind): output and the table's gradient against float64."""
    from spattn.runtime.reference import pattern_reference
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g) for _ in range(3))
    rel = torch.randn(2, 4, generator=g, requires_grad=True)
    kw = dict(pattern="causal", score="s + rel[h, clamp(q - k, 0, 3)]", backend="torch")
    o = spattn.attention(q, k, v, deterministic=True, rel=rel, **kw)
    (got,) = torch.autograd.grad(o.sum(), rel)
    r = rel.detach().double().requires_grad_()
    ro, _ = pattern_reference(spattn.compile("causal", score=kw["score"]), q.double(),
                              k.double(), v.double(), rel=r)
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), torch.autograd.grad(ro.sum(), r)[0], atol=1e-4,
                               rtol=1e-3)


@pytest.mark.slow
@pytest.mark.interpreter
def test_score_variants_benchmark_dry_run(capsys):
    """benchmarks/score_variants.py's CPU mode: each variant's plan has its flags and agrees
    with the float64 reference (output and gradients)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import score_variants
    code = score_variants.main(["--dry", "--n", "40", "--cases", "causal+softcap(30),nbhd2d+rpb"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[0].startswith("| case |")
    assert "| nbhd2d+rpb | auto-early | early/free/sigmoid, " in out   # then its ops/pair
    assert "| nbhd2d+rpb | mask-pair | pair/mask/sigmoid, " in out
    assert "/sigmoid, 3 |" in out           # softcap: the sigmoid form, 3 operations per pair
