"""explain(): exact density (closed form and tile paths), counts, FLOPs, strategy, output."""
from __future__ import annotations

import json

import pytest
import torch

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
