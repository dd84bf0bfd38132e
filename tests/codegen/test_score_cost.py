"""The per-pair cost of a score: the ``[BM, BN]`` operations its forward code adds to the
mask alone (codegen/opcount.py), pinned per score so that a regression shows; and the
counter itself on lines whose count is known."""
from types import SimpleNamespace

import pytest

import spattn
from spattn.codegen.kernels import _score_code
from spattn.codegen.opcount import score_cost, tile_ops

GPU = SimpleNamespace(fast_tanh=True, score_load="pair", score_index="clamp")

# (id, score, params, most operations per pair it may add, units)
COSTS = [
    # the term of the query alone goes to the row's lse: one FMA with a column vector
    ("alibi-slope", "alibi(alibi_slope)", {}, 1, "log2"),
    ("alibi-list", "alibi(m[h])", {"m": [0.5, 0.25]}, 1, "log2"),
    # the constant factor 30 * log2(e) joins the softmax's multiply-add
    ("softcap", "softcap(30.0)", {}, 2, "log2"),
    ("q-and-k-terms", "s + w[q] + u[k]", {}, 1, "log2"),
    ("per-head-temperature", "s * t[h]", {}, 1, "log2"),
    ("int-distance", "s - 0.5 * (q - k)", {}, 1, "log2"),
    # several key terms are summed on the column before they meet the tile
    ("rows-and-columns", "s - 0.25 * (q - k) + w[k % 8] + v[k]", {}, 1, "log2"),
    # a row term inside a function is no term of the sum: it stays on the pairs
    ("row-beside-softcap", "softcap(30.0) + 0.5 * float(q)", {}, 2, "log2"),
    ("row-inside-tanh", "30.0 * tanh(s / 30.0 + 0.5 * float(q))", {}, 3, "log2"),
    ("product-of-vectors", "s * w[q] * u[k] * t[h]", {}, 2, "log2"),
    # a pairwise table read pays its index and load; natural units save the multiply
    # of the loaded value by log2(e)
    ("pairwise-table", "s + rel[h, clamp(q - k, 0, 63)]", {}, 9, "natural"),
]


@pytest.mark.parametrize("score,params,most,units", [c[1:] for c in COSTS],
                         ids=[c[0] for c in COSTS])
def test_score_adds_at_most(score, params, most, units):
    p = spattn.compile("causal", score=score, **params)
    assert score_cost(p, GPU) <= most
    assert _score_code(p, "fwd", False, GPU).log2 == (units == "log2")


def test_the_cost_is_the_forward_kernels():
    """The counted lines are the generated forward's: ALiBi's score is one FMA of the q·k
    tile and a column vector; its term of the query alone shifts the row's lse in the
    epilogue; the softmax takes the score without a scale."""
    p = spattn.compile("causal", score="alibi(alibi_slope)")
    text = p.kernel_source("fwd")
    flat = "".join(text.split())                # long lines are wrapped in the file
    sc = _score_code(p, "fwd", False, GPU)
    for line in sc.lines + sc.row_lines:
        assert "".join(line.split()) in flat
    assert "b_f=b_s*(sm_scale*1.4426950408889634)+" in flat
    assert "tl.cast(o_k-o_r,tl.float32)" in flat
    assert not any("o_q" in line for line in sc.lines if not line.startswith("o_r ="))
    assert "".join(sc.row_value.split()) == "b_rw" and "lse=tl.where(m_none" in flat
    assert "b_p = tl.math.exp2(b_s - m_use[:, None])" in text
    assert "b_x" not in text


def test_row_terms_of_the_score():
    """The terms constant along a row are split from a sum only: from ALiBi's split
    difference, a bias of the head; never a term inside a function of the whole score."""
    from spattn.ir.score import emitted_form, row_terms
    for score, rows in [("alibi(alibi_slope)", 1), ("s + w[q] + u[k] + t[h]", 2),
                        ("softcap(30.0)", 0), ("s * t[h]", 0), ("s + 0.5 * float(k)", 0)]:
        p = spattn.compile("causal", score=score)
        rest, row = row_terms(emitted_form(p.score, True))
        assert (row is not None) == bool(rows), score
        if row is not None:
            assert len(getattr(row, "args", (row,))) == rows or rows == 1, score


@pytest.mark.parametrize("lines,value,ops", [
    # the mask alone's softmax: one FMA (exp2 counted apart)
    ((), "b_s * sm_scale_log2 - m_use[:, None]", 1),
    # ALiBi as emitted before the folding: scale, int difference, conversion, FMA
    (("b_x = b_s * sm_scale",),
     "slope * tl.cast(-o_q + o_k, tl.float32) + b_x", 4),
    # vectors: only the final add of a row and a column is on the tile
    (("t_r = 2.0 * tl.cast(o_q, tl.float32)", "t_c = 3.0 * tl.cast(o_k, tl.float32)"),
     "b_s * c + (t_r + t_c)", 2),
    # a pairwise load: its index arithmetic, the load, the conversion
    (("i = o_q - o_k + 255",), "tl.load(p + i * st).to(tl.float32)", 5),
    (("o_r = tl.min(o_q)",), "_tanh_approx(b_s * c) * d", 3),
], ids=["mask-softmax", "alibi-unfolded", "vectors", "pairwise-load", "reduction-and-call"])
def test_tile_ops_counts(lines, value, ops):
    assert tile_ops(lines, value) == ops


def test_softcap_without_the_fast_tanh():
    """tanh as 2 sigmoid(2x) - 1 (fp32 inputs, the interpreter): the 2 joins the folded
    constant of s / c, as the scale does."""
    p = spattn.compile("causal", score="softcap(30.0)")
    cfg = SimpleNamespace(**dict(vars(GPU), fast_tanh=False))
    assert score_cost(p, cfg) <= 3
    assert "tl.sigmoid(b_s * (sm_scale * 0.06666666666666667))" in _score_code(
        p, "fwd", False, cfg).lines[-1]


def test_a_pattern_without_a_score_costs_nothing():
    assert score_cost(spattn.compile("causal"), GPU) == 0


@pytest.mark.parametrize("src,score,pair", [
    ("causal & window(64)", "s + rel[h, clamp(q - k, 0, 63)]", True),
    ("causal", "s + rel[h, t5_bucket_causal(32, 128)]", True),
    ("abs(q // 16 - k // 16) <= 2 & abs(q % 16 - k % 16) <= 2",
     "s + rpb[h, clamp(q // 16 - k // 16, -2, 2) + 2, clamp(q % 16 - k % 16, -2, 2) + 2]", True),
    ("causal", "s * temp[h] + w[b, h] * float(q - k)", False),
    ("causal", "alibi(m[h])", False),
    ("causal", "softcap(30.0)", False),
    ("causal", None, False),
], ids=["rel-1d", "t5", "rpb-2d", "per-head-tables", "alibi-list-param", "softcap", "no-score"])
def test_forward_default_tiles_of_per_pair_table_loads(src, score, pair):
    """A score that gathers a table entry per pair gets the forward's 64 x 32, 2-stage
    default (gathers measured faster there); per-program tables and scores without tables
    keep the 64 x 64, 3-stage one, in the plain default and as the tuner's first
    candidate."""
    from spattn.codegen.config import default_tiles, pick, score_pair_loads
    from spattn.runtime.tune import candidates
    pat = spattn.compile(src, score=score, m=[0.5, 0.25]) if score and "m[h]" in score \
        else spattn.compile(src, score=score)
    assert score_pair_loads(pat) is pair
    want = default_tiles(128, "bf16", interpret=False, pair_loads=pair)
    assert want == ((64, 32, 4, 2) if pair else (64, 64, 4, 3))
    cfg = pick(pat, "fwd", head_dim=128, dtype="bf16")
    assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == want
    first = candidates("fwd", 128, "bf16", pair_loads=pair)[0]
    assert (first["block_m"], first["block_n"], first["num_warps"],
            first["num_stages"]) == want


@pytest.mark.parametrize("score,tables", [
    ("s * temp[h] + w[b, h] * float(q - k) * 0.1", True),
    ("s + rel[h, clamp(q - k, 0, 63)]", True),
    ("softcap(30.0)", False),
    (None, False),
], ids=["per-head-tables", "rel-table", "no-table", "no-score"])
def test_fp32_forward_tiles_of_table_scores_match_the_dq_kernel(score, tables):
    """In fp32, a score with float tables (whose gradients the dQ kernel sums) runs its
    forward at the dQ kernel's tile shape, so the two round each q·k product alike, and
    the tuner keeps that shape for both; other fp32 forwards keep 64 x 32."""
    from spattn.codegen.config import default_bwd_tiles, pick
    pat = spattn.compile("causal", score=score)
    cfg = pick(pat, "fwd", head_dim=64, dtype="fp32")
    dq = default_bwd_tiles(64, "fp32")[2:4]
    assert (cfg.block_m, cfg.block_n) == (dq if tables else (64, 32))
    from spattn.runtime.tune import candidates
    fwd = {(c["block_m"], c["block_n"]) for c in candidates("fwd", 64, "fp32", tables=tables)}
    bwd = {(c["block_m2"], c["block_n2"]) for c in candidates("bwd", 64, "fp32", tables=tables)}
    assert (fwd == bwd == {dq}) is tables
