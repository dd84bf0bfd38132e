"""``benchmarks/layouts.py`` on the CPU (``--cpu``: tiny grids, layouts forced): it runs its
problems through the remapped plans, checks them against the reference and writes its
JSON and table."""
import json

import pytest

from tests.helpers.bench_scripts import load


@pytest.fixture(scope="module")
def layouts():
    return load("layouts")


@pytest.mark.slow
def test_cpu_run_writes_rows(layouts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPATTN_LAYOUT", "auto")     # restored after the run sets it
    rc = layouts.main(["--out", str(tmp_path), "--cpu", "--only", "flux-window-80x80",
                       "hunyuan-stride-16x8x8", "flux-window-80x80-flat"])
    assert rc == 0
    data = json.loads((tmp_path / "layouts.json").read_text())
    rows = data["rows"]
    assert [r["problem"] for r in rows] == ["flux-window-80x80", "hunyuan-stride-16x8x8",
                                            "flux-window-80x80-flat"]
    for r in rows:
        assert r["layout"] is not None and r["rel_err_sampled"] < 1e-4
        assert r["fwd_ms"] > 0 and r["dense_fwd_ms"] > 0
    table = capsys.readouterr().out
    assert "| flux-window-80x80 | grid 16 x 16" in table


def test_problems_are_the_briefs(layouts):
    assert layouts.PROBLEMS["flux-stride-16x16"][1] == ((256, 256), (80, 80), (16, 16))
    pat, N = layouts.make_pattern("flat", (16, 5))
    nb, _ = layouts.make_pattern("natten", ((16, 16), (5, 5)))
    assert N == 256 and pat.mask(N, N).equal(nb.mask(N, N))    # the flat form is NATTEN's


@pytest.mark.parametrize("name", ["flux-stride-16x16-flat", "hunyuan-stride-16x8x8-flat"])
def test_flattened_strides_are_the_builtins_and_find_its_boxes(layouts, name):
    """The strided problems written over flattened positions (no grid declared, no
    ``neighborhood``) are NATTEN's masks on the CPU's small grids, and at the GPU run's
    sizes the layout analysis finds the same boxes as for ``spattn.neighborhood``, every
    computed pair allowed."""
    from spattn.ir import layout as LY
    kind, args, target = layouts.CPU_PROBLEMS[name]
    pat, N = layouts.make_pattern(kind, args)
    nb, _ = layouts.make_pattern("natten", layouts.CPU_PROBLEMS[name[:-5]][1])
    assert pat.mask(N, N).equal(nb.mask(N, N))
    kind, args, target = layouts.PROBLEMS[name]
    assert target == layouts.PROBLEMS[name[:-5]][2]
    pat, N = layouts.make_pattern(kind, args)
    nb, _ = layouts.make_pattern("natten", layouts.PROBLEMS[name[:-5]][1])
    got, want = (LY.choose(p.ir, N, N, 0, force=True) for p in (pat, nb))
    assert str(got.layout) == str(want.layout)
    assert got.computed_layout == want.computed_layout == got.useful


@pytest.mark.slow
def test_cpu_run_of_a_callers_order_and_text_before_an_image(layouts, tmp_path, monkeypatch):
    """The rows of ``order=`` (an OrderedPlan from a box permutation) and of a declared grid
    after text tokens (a layout whose grid has an offset) run and match the reference."""
    monkeypatch.setenv("SPATTN_LAYOUT", "auto")
    rc = layouts.main(["--out", str(tmp_path), "--cpu", "--only", "flux-window-80x80-order",
                       "text77-flux-window-81x81"])
    assert rc == 0
    rows = json.loads((tmp_path / "layouts.json").read_text())["rows"]
    assert rows[0]["layout"] == "caller's order, boxes 4x4"
    assert "after 5 tokens" in rows[1]["layout"]
    assert all(r["rel_err_sampled"] < 1e-4 for r in rows)
    order = layouts.box_order((8, 8), (4, 2), "cpu")
    assert sorted(order.tolist()) == list(range(64)) and order[:8].tolist() == [
        0, 1, 8, 9, 16, 17, 24, 25]


@pytest.mark.parametrize("shape, kernel, stride", [
    ((16, 16), (5, 5), None), ((16, 16), (8, 6), (4, 3)), ((4, 6, 8), (3, 4, 4), (2, 2, 2)),
    ((9, 7), (4, 7), (3, 7))], ids=["2d-5x5", "2d-even-stride", "3d-stride", "2d-full-axis"])
def test_flex_mask_mod_is_nattens(layouts, shape, kernel, stride):
    """The FlexAttention mask_mod the GPU run compares against is NATTEN's neighbourhood
    (evaluated here on index grids, as Flex's vmap does)."""
    import math

    import torch
    from tests.helpers.natten_ref import neighborhood_mask
    N = math.prod(shape)
    idx = torch.arange(N)
    got = layouts.natten_mask_mod(shape, kernel, stride)(0, 0, idx[:, None], idx[None, :])
    want = neighborhood_mask(shape, kernel, stride or 1)
    assert got.numpy().tolist() == want.tolist()


@pytest.mark.slow
def test_cpu_run_of_text_around_an_image(layouts, tmp_path, monkeypatch):
    """The row of a declared grid with text before and after it runs in a layout with both
    runs of text around the boxes and matches the reference."""
    monkeypatch.setenv("SPATTN_LAYOUT", "auto")
    rc = layouts.main(["--out", str(tmp_path), "--cpu", "--only",
                       "text77-flux-window-81x81-text20"])
    assert rc == 0
    rows = json.loads((tmp_path / "layouts.json").read_text())["rows"]
    assert "after 5 tokens before 7 tokens" in rows[0]["layout"]
    assert rows[0]["rel_err_sampled"] < 1e-4
    assert layouts.PROBLEMS["text77-flux-window-81x81-text20"][1] == (77, 256, 40, 20)
