"""The decode module (``codegen/templates/decode.py.j2``): what it generates for a closed
form and for a scanned pattern, and its cache key."""
import pytest

import spattn
from spattn.runtime import decode as dec


@pytest.fixture(scope="module")
def texts():
    stream = spattn.compile("pattern streaming = causal & (window(1024) | sink(4))")
    docs = spattn.compile("input doc\npattern documents = causal & same(doc)")
    scored = spattn.compile("input rel\ninput slope\n"
                            "pattern alibi_bias = causal & window(1024) score "
                            "rel[h, clamp(q - k, 0, 1023)] + softcap(30) - slope[h] * float(q - k)")
    return {n: dec.kernel_text(p, head_dim=128, dtype="bf16") for n, p in
            (("streaming", stream), ("documents", docs), ("alibi_bias", scored))}


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


def test_score_on_every_pair_and_its_row_terms_on_the_splits_lse(texts):
    """A scored module: the table parameters first, the score after the dot (indices
    clamped, tanh as one instruction on the GPU), the query's own terms added to each
    split's lse (log2 units, as the partial results are)."""
    text = texts["alibi_bias"][1]
    assert "Score tables: rel (2-D index, float), slope (1-D index, float)" in text
    assert "tanh as one tanh.approx.f32" in text and "def _tanh_approx(x):" in text
    head = text[text.index("def attn_decode_alibi_bias"):]
    assert head.index("REL_ptr, stride_rel_b") < head.index("stride_qb")
    assert "sm_scale_log2, sm_scale, H, GROUP" in head
    body = head[head.index("for idx in range(i_lo, i_hi):"):]
    assert body.index("b_s = tl.dot(b_q, b_kt") < body.index("_tanh_approx(") \
        < body.index("# -- predicate (PARTIAL tile) --")
    assert "tl.minimum(tl.maximum(" in body                 # clamped table indices
    tail = head[head.index("# -- this split's partial result --"):]
    assert "lse = tl.where(m_none, float(\"-inf\"), lse + b_rw)" in tail
    plain = texts["streaming"][1]
    assert "sm_scale," not in plain and "b_rw" not in plain and "Score" not in plain


def test_key_depends_on_config_not_lengths():
    pat = spattn.compile("causal & window(64)")
    a = dec.kernel_text(pat, head_dim=128, dtype="bf16")[0]
    assert a == dec.kernel_text(pat, head_dim=96, dtype="bf16")[0]       # one BLOCK_D
    assert a != dec.kernel_text(pat, head_dim=64, dtype="bf16")[0]
    assert a != dec.kernel_text(pat, head_dim=128, dtype="fp16")[0]


_AOT = r"""
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_(fn, types, consts):
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 3})
    assert k.asm.get("cubin"), "no cubin"


for path, paged in zip(sys.argv[1::2], sys.argv[2::2]):
    spec = importlib.util.spec_from_file_location("m", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O_PART": "*fp32", "LSE_PART": "*fp32",
             "PAGES": "*i32", "SEQ": "*i32", "DOC_ptr": "*i64", "sm_scale_log2": "fp32",
             "O": "*bf16", "LSE": "*fp32", "REL_ptr": "*fp32", "SLOPE_ptr": "*fp32",
             "sm_scale": "fp32"}
    for wide in ((False,) if paged == "1" else (False, True)):
        compile_(mod.KERNEL, types, dict(
            PACK=4, NUM_SPLITS=16, PAGE_SIZE=16, PAGED=paged == "1", HAS_SEQ=True, BLOCK_M=16,
            BLOCK_N=64, BLOCK_D=128, HEAD_DIM=128, DOT_PREC="tf32", WIDE=wide))
    compile_(mod.COMBINE, types, dict(PACK=4, NUM_SPLITS=16, BLOCK_M=16, BLOCK_D=128,
                                      HEAD_DIM=128))
    print("compiled", path)
"""


def test_compiles_for_hopper(texts, tmp_path):
    """The variants (closed form on a contiguous cache, scan on a paged one, a score on a
    paged one) and the combine compile for sm_90 ahead of time (Triton's own ptxas, no
    GPU): what the interpreter cannot check (types, layouts, the pipeliner). In a
    subprocess: this one runs the interpreter."""
    import os
    import subprocess
    import sys
    args = []
    for name, paged in (("streaming", "0"), ("documents", "1"), ("alibi_bias", "1")):
        fname, text = texts[name]
        (tmp_path / fname).write_text(text)
        args += [str(tmp_path / fname), paged]
    (tmp_path / "aot.py").write_text(_AOT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    r = subprocess.run([sys.executable, str(tmp_path / "aot.py"), *args], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 3
