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
             "O": "*bf16", "LSE": "*fp32"}
    compile_(mod.KERNEL, types, dict(
        PACK=4, NUM_SPLITS=16, PAGE_SIZE=16, PAGED=paged == "1", HAS_SEQ=True, BLOCK_M=16,
        BLOCK_N=64, BLOCK_D=128, HEAD_DIM=128, DOT_PREC="tf32"))
    compile_(mod.COMBINE, types, dict(PACK=4, NUM_SPLITS=16, BLOCK_M=16, BLOCK_D=128,
                                      HEAD_DIM=128))
    print("compiled", path)
"""


def test_compiles_for_hopper(texts, tmp_path):
    """Both variants (closed form on a contiguous cache, scan on a paged one) and the combine
    compile for sm_90 ahead of time (Triton's own ptxas, no GPU): what the interpreter cannot
    check (types, layouts, the pipeliner). In a subprocess: this one runs the interpreter."""
    import os
    import subprocess
    import sys
    args = []
    for name, paged in (("streaming", "0"), ("documents", "1")):
        fname, text = texts[name]
        (tmp_path / fname).write_text(text)
        args += [str(tmp_path / fname), paged]
    (tmp_path / "aot.py").write_text(_AOT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    r = subprocess.run([sys.executable, str(tmp_path / "aot.py"), *args], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 2
