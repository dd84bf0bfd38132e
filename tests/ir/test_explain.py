"""explain(): exact density (closed form and tile paths), counts, FLOPs, strategy, output."""
from __future__ import annotations

import json

import pytest
import torch

from spattn.dsl.errors import SpattnValueError
from spattn.ir import build as B
from spattn.ir.evaluate import mask
from spattn.ir.explain import Report, explain
from spattn.pattern import Pattern

from tests.ir.test_tiles import AFFINE, causal, q, k, c


@pytest.mark.parametrize("name", list(AFFINE))
@pytest.mark.parametrize("shape", [(70, 90, 16, 8, None), (33, 20, 7, 5, -4)])
def test_density_exact(name, shape):
    Lq, Lk, bm, bn, off = shape
    ir = AFFINE[name]
    r = explain(ir, Lq, Lk, num_heads=3, block_m=bm, block_n=bn, q_offset=off)
    want = int(mask(ir, Lq, Lk, num_heads=3, q_offset=off).sum())
    assert r.allowed_pairs == want
    assert r.density == pytest.approx(want / (3 * Lq * Lk))
    t = Pattern(ir).tiles(Lq, Lk, bm, bn, num_heads=3, q_offset=off)
    assert r.tiles["full"] == int((t == 2).sum()) and r.tiles["empty"] == int((t == 0).sum())


def test_inputs_density_and_report():
    doc = torch.sort(torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(3))).values
    ir = B.and_(causal, B.cmp("==", B.load("doc", [q]), B.load("doc", [k])))
    p = Pattern(ir, inputs={"doc": 1})
    r = p.explain(200, num_heads=2, block_m=32, block_n=16, doc=doc)
    assert r.allowed_pairs == int(p.mask(200, 200, num_heads=2, doc=doc).sum())
    assert r.strategy == "table" and "partial tiles evaluated" in r.density_method
    d = r.to_dict()
    json.dumps(d)
    assert d["strategy"] == "table"
    assert 0 < r.efficiency <= 1


@pytest.mark.parametrize("lead", [(), (2,), (2, 1), (1, 3)], ids=["L", "B-L", "B-1-L", "1-H-L"])
def test_inputs_with_batch_and_head_dims(lead):
    """Runtime inputs ``[L]``, ``[B, L]``, ``[B, 1, L]``, ``[1, H, L]`` at ``batch=2``,
    ``num_heads=3`` and a query offset: the exact pair count is the dense mask's, and the
    head order a head-reading pattern reports is computed over every batch element."""
    g = torch.Generator().manual_seed(11)
    Lq, Lk, off = 90, 130, 25
    doc = torch.sort(torch.randint(0, 6, (*lead, Lk), generator=g), dim=-1).values
    p = Pattern(B.and_(causal, B.or_(B.cmp("==", B.load("doc", [q]), B.load("doc", [k])),
                                       B.cmp("==", B.mod(k, B.var("H")), B.var("h")))),
                inputs={"doc": 1})
    r = p.explain(Lq, Lk, num_heads=3, batch=2, q_offset=off, block_m=32, block_n=16,
                  doc=doc)
    want = p.mask(Lq, Lk, num_heads=3, batch=2, q_offset=off, doc=doc)
    assert r.batch == 2 and r.allowed_pairs == int(want.sum())
    assert r.total_pairs == 2 * 3 * Lq * Lk


def test_inputs_checked_against_batch_and_heads():
    """An input whose batch or head dim is not the explained call's, a missing or short
    one: the located SpattnInputError a call gives, never a raw exception."""
    from spattn.dsl.errors import SpattnInputError
    ir = B.and_(causal, B.cmp("==", B.load("doc", [q]), B.load("doc", [k])))
    p = Pattern(ir, inputs={"doc": 1})
    doc = torch.zeros(2, 64, dtype=torch.long)
    with pytest.raises(SpattnInputError, match=r"batch dimension \(0\) is 2, expected 1 "):
        p.explain(64, doc=doc)
    with pytest.raises(SpattnInputError, match=r"heads dimension \(1\) is 2, expected 3 or 1"):
        p.explain(64, num_heads=3, batch=2, doc=doc.view(1, 2, 64))
    with pytest.raises(SpattnInputError, match="missing runtime input 'doc'"):
        p.explain(64)
    with pytest.raises(SpattnInputError, match="too short"):
        p.explain(64, doc=doc[0, :10])
    with pytest.raises(SpattnValueError, match="batch must be a positive integer"):
        p.explain(64, batch=0, doc=doc[0])


def test_window_report_large():
    ir = B.and_(causal, B.cmp("<", B.sub(q, k), c(1024)))
    r = explain(Pattern(ir), 65536, 65536, num_heads=16, block_m=128, block_n=64)
    L, W = 65536, 1024
    per_head = W * (W + 1) // 2 + (L - W) * W
    assert r.allowed_pairs == 16 * per_head
    assert r.strategy == "ranges"
    assert r.flops_computed == (r.tiles["full"] + r.tiles["partial"]) * 128 * 64 * 4 * 128
    assert r.flops_useful == r.allowed_pairs * 4 * 128
    assert r.predicted_speedup > 10
    s = str(r)
    assert "density" in s and "ranges" in s and "partial" in s
    assert isinstance(r, Report)


def test_head_dim_and_defaults():
    r = explain(causal, 100, head_dim=64)
    assert r.Lk == 100 and r.block_m == 128 and r.block_n == 64
    assert r.flops_dense == 100 * 100 * 4 * 64
    assert r.allowed_pairs == 100 * 101 // 2


def test_cost_model_targets():
    """The prediction is the target's model on the target's tiles, whatever tiles the report
    counts; a dense pattern predicts 1x on the GPU (the baseline is the same kernel), and a
    sparser pattern predicts more on both targets."""
    from spattn.dsl.errors import SpattnValueError
    from spattn.ir.cost import COSTS, TILES
    full = B.cmp(">=", q, c(0))
    window = B.and_(causal, B.cmp("<", B.sub(q, k), c(256)))
    assert explain(full, 4096, num_heads=8).predicted_speedup == pytest.approx(1.0)
    for target in ("cuda", "cpu"):
        r = explain(causal, 4096, num_heads=8, target=target)
        assert (r.block_m, r.block_n) == TILES[target] and r.cost_model == COSTS[target]
        other = explain(causal, 4096, num_heads=8, target=target, block_m=32, block_n=32)
        assert other.predicted_speedup == r.predicted_speedup
        assert explain(window, 4096, num_heads=8, target=target).predicted_speedup \
            > r.predicted_speedup > 1
        assert target in str(r).replace("GPU", "cuda").replace("CPU", "cpu")
    with pytest.raises(SpattnValueError, match="target"):
        explain(causal, 64, target="tpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("src, q_offset, env", [
    ("causal & window(16)", None, None),
    ("causal", 2 ** 40, None),                      # positions past the closed forms' range
    ("causal & window(16)", None, "table"),         # SPATTN_STRATEGY
], ids=["ranges", "q-offset-2p40-table", "setting-table"])
def test_strategy_is_the_one_the_call_runs(src, q_offset, env, monkeypatch):
    """The report's strategy is the forward's of a call at that size (the plan's rule:
    the setting, the closed forms' reach), not the analysis's choice alone; for the CPU
    it names the torch backend's plans."""
    import spattn
    if env:
        monkeypatch.setenv("SPATTN_STRATEGY", env)
    pat = spattn.compile(src, backend="triton")
    x = torch.randn(1, 1, 200, 16)
    want = pat.plan(x, x, x, q_offset=q_offset).forward_stage.config.strategy
    r = pat.explain(200, q_offset=q_offset)
    assert r.strategy == want and f"strategy  {want} (" in str(r)
    r = pat.explain(200, q_offset=q_offset, target="cpu")
    assert r.strategy == "torch" and "strategy  torch backend" in str(r)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 50, 70), (1, 4, 129, 3)])
def test_tile_counts_count_every_class(shape):
    from spattn.ir.cost import tile_counts
    g = torch.Generator().manual_seed(sum(shape))
    t = torch.randint(0, 3, shape, generator=g, dtype=torch.int8)
    c = tile_counts(t)
    want = [int((t == v).sum()) for v in range(3)]
    assert [c["empty"], c["partial"], c["full"]] == want
    assert c["rows"] == shape[0] * shape[1] * shape[2]


@pytest.mark.parametrize("slab", [1, 7, 1 << 21], ids=["slab-1", "slab-7", "slab-default"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 50, 70), (1, 4, 129, 3)])
def test_tile_counts_by_slabs(shape, slab, monkeypatch):
    """Counted by slabs of rows (a slab smaller than one row, several rows, the whole grid):
    every class's count as a dense count gives it."""
    import spattn.ir.cost as cost
    monkeypatch.setattr(cost, "COUNT_SLAB", slab)
    t = torch.randint(0, 3, shape, dtype=torch.int8)
    c = cost.tile_counts(t)
    assert [c["empty"], c["partial"], c["full"]] == [int((t == v).sum()) for v in range(3)]


@pytest.mark.parametrize("slab", [1, 40, 1 << 21], ids=["slab-1", "slab-40", "slab-default"])
@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 3)], ids=["B1-H1", "B2-H3"])
def test_partial_tiles_counted_by_slabs(slab, batch, heads):
    """Allowed pairs through tiles (no closed form: a runtime input), slab by slab of query
    tiles, against the dense mask."""
    from spattn.ir.explain import _count_tiles
    from spattn.ir.inputs import validate_inputs
    from spattn.ir.tiles import classify
    doc = torch.sort(torch.randint(0, 6, (batch, 170)), dim=-1).values
    ir = B.and_(causal, B.cmp("==", B.load("doc", [q]), B.load("doc", [k])))
    p = Pattern(ir, inputs={"doc": 1})
    t = classify(p, 150, 170, 16, 8, num_heads=heads, batch=batch, q_offset=20,
                 inputs={"doc": doc})
    ins = validate_inputs(p.inputs, {"doc": doc}, batch=batch, num_heads=heads,
                          device=t.device)
    got, method = _count_tiles(ir, t, 150, 170, 16, 8, q_offset=20, inputs=ins,
                               device=t.device, slab_tiles=slab)
    assert method.startswith("exact")
    want = int(p.mask(150, 170, num_heads=heads, batch=batch, q_offset=20, doc=doc).sum())
    assert got == want


def test_explain_allocates_no_grid_sized_int64():
    """explain's counts take no int64 copy of the tile grid (8 bytes a tile): with 4096 x
    8192 tiles, no single allocation during the report reaches 4 bytes a tile."""
    from torch.profiler import ProfilerActivity, profile
    pat = Pattern(B.and_(causal, B.cmp("==", B.load("doc", [q]), B.load("doc", [k]))),
                  inputs={"doc": 1})
    L = 1 << 18
    doc = torch.arange(L) // 4096
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        r = pat.explain(L, block_m=64, block_n=32, doc=doc)
    assert r.tiles["total"] == (L // 64) * (L // 32)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < 4 * r.tiles["total"], biggest


def test_classify_refuses_a_grid_larger_than_the_memory(monkeypatch):
    """The tile grid's room is checked before any of it is made: on Linux a large
    allocation is granted and the process killed while the grid is written."""
    import spattn.ir.memory as memory
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 30)
    with pytest.raises(SpattnValueError, match=r"the tile grid \[1, 1, 32768, 65536\] does "
                       r"not fit in memory: it needs 2\.0 GiB and cpu has 1\.0 GiB available"):
        Pattern(causal).tiles(1 << 22, 1 << 22, 128, 64)
    with pytest.raises(SpattnValueError, match="the tile grid"):
        Pattern(causal).explain(1 << 22)
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)
    t = Pattern(causal).tiles(1 << 20, 1 << 20, 128, 64)      # 128 MiB: under the check
    assert t.shape == (1, 1, 8192, 16384)


def test_available_memory_reads_the_device(monkeypatch):
    """A CUDA grid's room is the device's free memory (CUDA's count, read for the device
    named), a CPU grid's the kernel's MemAvailable."""
    import spattn.ir.memory as memory
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (asked.append(d), (123, 456))[1])
    assert memory.available_memory("cuda:1") == 123
    assert memory.available_memory(torch.device("cuda")) == 123
    assert asked == [torch.device("cuda:1"), torch.device("cuda")]
    assert memory.available_memory("cpu") > 0


@pytest.mark.parametrize("src", ["(q + k) % 3 == 0", "k % H == h | q - k < 20"],
                         ids=["diagonals", "per-head-or-window"])
def test_partial_tiles_sampled_beyond_the_budget(src):
    """Past ``exact_pairs`` pairs in PARTIAL tiles, a seeded sample of them: the same
    estimate every time, within 3% of the dense count here, and said to be an estimate in
    the report's wording."""
    from spattn.ir.explain import _count_tiles
    from spattn.ir.tiles import classify
    import spattn
    p = spattn.compile(src)
    t = classify(p, 1000, 1200, 16, 16, num_heads=3)
    kw = dict(q_offset=None, inputs={}, device=t.device, exact_pairs=60000)
    got, method = _count_tiles(p.ir, t, 1000, 1200, 16, 16, **kw)
    again, _ = _count_tiles(p.ir, t, 1000, 1200, 16, 16, **kw)
    want = int(p.mask(1000, 1200, num_heads=3).sum())
    assert got == again and method.startswith("estimated") and "partial tiles" in method
    assert got != want and abs(got - want) < 0.03 * want, (got, want)
    exact, method = _count_tiles(p.ir, t, 1000, 1200, 16, 16, **dict(kw, exact_pairs=1 << 28))
    assert exact == want and method.startswith("exact")


@pytest.mark.parametrize("src,how", [("(q - k) % 8 == 0", "tiles"), ("causal & window(37)",
                                                                     "closed form")],
                         ids=["modulo", "window"])
def test_allowed_pairs_without_a_dense_mask(src, how):
    """The count the layout choice prices each grid axis with (``allowed_pairs``: the
    closed form per row, else the tiles), against the dense mask."""
    import spattn
    from spattn.ir.explain import allowed_pairs
    ir = spattn.compile(src).ir
    got, method = allowed_pairs(ir, None, 300, 300, 64, 64, num_heads=1, batch=1, q_offset=0,
                                inputs={})
    assert got == int(mask(ir, 300, 300).sum())
    assert method == ("exact, per-row closed form" if how == "closed form"
                      else "exact, full tiles + partial tiles evaluated")


def test_dense_mask_refused_before_it_is_evaluated(monkeypatch):
    """``Pattern.mask`` checks the room its evaluation takes (9 bytes a pair at least)
    before making anything: a larger allocation would be granted on Linux and the process
    killed while it is written."""
    import spattn.ir.memory as memory
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 30)
    with pytest.raises(SpattnValueError, match=r"the dense mask \[1, 2, 8192, 8192\] \(9 bytes "
                       r"a pair or more while it is evaluated\) does not fit in memory: it "
                       r"needs 1\.1 GiB and cpu has 1\.0 GiB available"):
        Pattern(causal).mask(8192, 8192, num_heads=2)
    m = Pattern(causal).mask(4096, 4096, num_heads=2)              # 288 MiB: fits
    assert m.shape == (1, 2, 4096, 4096) and bool(m[0, 0, 5, 5]) and not bool(m[0, 0, 5, 6])
