"""The decode module (``codegen/templates/decode.py.j2``): what it generates for a closed
form and for a scanned pattern, and its cache key."""
import pytest

import spattn
from spattn.runtime import decode as dec


@pytest.fixture(scope="module")
def texts():
    stream = spattn.compile("pattern streaming = causal & (window(1024) | sink(4))")
    docs = spattn.compile("input doc\npattern documents = causal & same(doc)")
    return {n: dec.kernel_text(p, head_dim=128, dtype="bf16") for n, p in
            (("streaming", stream), ("documents", docs))}


@pytest.mark.parametrize("name", ["streaming", "documents"])
def test_module_compiles_and_reads_like_code(texts, name):
    fname, text = texts[name]
    assert fname.startswith(f"attn_decode_{name}_") and text.startswith("# spattn-kernel key=")
    compile(text, fname, "exec")
    for needle in ("tl.static_assert(BLOCK_M % 16 == 0)", "def attn_decode_combine_",
                   "@triton.jit(do_not_specialize=", "# -- this split's chunk",
                   "KERNEL = attn_decode_", "COMBINE = attn_decode_combine_"):
        assert needle in text, needle


def test_closed_form_visits_intervals_and_skips_the_predicate_on_full_tiles(texts):
    text = texts["streaming"][1]
    assert "Strategy: ranges" in text
    assert "s1, e1 = _tile_span(r1_lo, r1_hi, Lk, BLOCK_N)" in text
    assert "# minus the tiles of interval 0: 2 pieces" in text
    assert "partial = (i_n < full_start) | (i_n >= full_end)" in text
    assert "if tl.max(m_s" not in text


def test_scan_evaluates_the_predicate_before_reading_keys(texts):
    text = texts["documents"][1]
    assert "Strategy: scan" in text
    body = text[text.index("for idx in range(i_lo, i_hi):"):]
    assert body.index("if tl.max(m_s.to(tl.int32)) > 0:") < body.index("b_kt = tl.load(")
    assert "b_doc_2 = tl.load(p_doc + o_q * stride_doc_0" in text      # hoisted, once


def test_key_depends_on_config_not_lengths():
    pat = spattn.compile("causal & window(64)")
    a = dec.kernel_text(pat, head_dim=128, dtype="bf16")[0]
    assert a == dec.kernel_text(pat, head_dim=96, dtype="bf16")[0]       # one BLOCK_D
    assert a != dec.kernel_text(pat, head_dim=64, dtype="bf16")[0]
    assert a != dec.kernel_text(pat, head_dim=128, dtype="fp16")[0]
