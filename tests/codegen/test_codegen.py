"""Code generation: the expression emitter, rendered kernel files and the kernel file cache.

Emitter semantics are checked by running emitted code under the Triton
interpreter on a grid of positions (negative query positions included) against
the reference evaluator; structure (CSE, hoisting, floor helpers only where
needed) by reading the emitted code.
"""

import importlib.util
import re
import sys
import warnings

import pytest
import torch

import spattn
from spattn.codegen import config as st
from spattn.codegen.emit import HELPERS, emit, nonneg
from spattn.codegen.kernels import CODEGEN_VERSION
from spattn.ir import build as B
from spattn.ir.evaluate import evaluate
from spattn.runtime import cache
from spattn.runtime import triton_backend as tb

from tests.helpers.kernels import global_local_cf, rand_qkv, window_cf, window_sink_cf

pytestmark = pytest.mark.interpreter

ENV = {"q": "o_q", "k": "o_k", "h": "i_h", "b": "i_b", "Lq": "Lq", "Lk": "Lk", "H": "H"}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "kernels"))
    cache.clear_memory()
    yield tmp_path / "kernels"
    cache.clear_memory()


# ----------------------------------------------------------------- emitter

def test_cse_computes_shared_subexpression_once():
    ir = spattn.compile("causal & window(8) | (q - k) % 3 == 0").ir
    em = emit([ir], ENV, loop_vars=["k"], result_names=["m_pattern"])
    code = "\n".join(em.inner)
    assert code.count("o_q - o_k") == 1, code


def test_hoisting_by_loop_variable():
    ir = spattn.compile("causal & same(doc)").ir
    fwd = emit([ir], ENV, loop_vars=["k"], result_names=["m_pattern"])
    assert any("tl.load" in line and "o_q" in line for line in fwd.outer)   # doc[q] once
    assert any("tl.load" in line and "o_k" in line for line in fwd.inner)   # doc[k] per tile
    assert all("o_k" not in line for line in fwd.outer)
    bwd = emit([ir], ENV, loop_vars=["q"], result_names=["m_pattern"])      # dK/dV orientation
    assert any("tl.load" in line and "o_k" in line for line in bwd.outer)
    assert set(fwd.outer_names) and all(n in "\n".join(fwd.inner + ["m_pattern"]) or True
                                        for n in fwd.outer_names)


def test_loads_are_masked():
    ir = spattn.compile("blocks[q // 16, k // 16]").ir
    em = emit([ir], ENV, loop_vars=["k"])
    text = "\n".join(em.outer + em.inner)
    for line in text.splitlines():
        if "tl.load" in line:
            assert "mask=" in line and "other=0" in line


@pytest.mark.parametrize("src,helper", [
    ("k // 4 == 1", False), ("k % 8 >= 6", False), ("h % 2 == 0", False),
    ("q // 4 == 1", True), ("(q - k) % 3 == 0", True), ("(k - 3) // 4 == 0", True),
    ("(k + 3) // 4 == 1", False),
])
def test_floor_helpers_only_where_needed(src, helper):
    em = emit([spattn.compile(src).ir], ENV, loop_vars=["k"])
    assert em.uses_helpers is helper


def test_sign_analysis():
    k, q, h = B.var("k"), B.var("q"), B.var("h")
    assert nonneg(B.add(k, B.const(3)))
    assert not nonneg(B.sub(k, B.const(3)))
    assert not nonneg(q)
    assert nonneg(B.mod(q, B.const(5)))
    assert nonneg(B.table([1, 2], h))


EXPRS = [
    "(q - k) % 3 == 0 | q // 4 == k // 4",
    "q % 5 == 2 & (q - 2 * k) // 3 != -4",
    "abs(q - k) <= max(2, min(k // 4, 6))",
    "(if q < 0 then k < 3 else k > 10) | is_pow2(q - k)",
    "q - k < [3, 9][h] & ~(k % 4 == 1)",
    "(q - k) // -3 == 2 | (q + 7) % -4 == -1",
]


def _run_predicate(tmp_path, src, qlo, h):
    """Evaluate the emitted predicate of ``src`` under the interpreter on a q x k grid."""
    ir = spattn.compile(src).ir
    em = emit([ir], ENV, loop_vars=["k"], result_names=["m_pattern"])
    body = "\n".join("    " + line for line in em.outer + em.inner)
    text = (f"import triton\nimport triton.language as tl\n{HELPERS}\n\n"
            "@triton.jit\n"
            "def pred_kernel(OUT, QLO, i_h, BQ: tl.constexpr, BK: tl.constexpr):\n"
            "    i_b = 0\n    Lq = BQ\n    Lk = BK\n    H = 2\n"
            "    o_q = (QLO + tl.arange(0, BQ))[:, None]\n"
            "    o_k = tl.arange(0, BK)[None, :]\n"
            f"{body}\n"
            f"    m = ({em.results[0]}) & (o_q == o_q) & (o_k == o_k)\n"
            "    tl.store(OUT + (o_q - QLO) * BK + o_k, m.to(tl.int32))\n")
    path = tmp_path / f"pred_{abs(hash(src))}_{h}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    out = torch.zeros(32, 32, dtype=torch.int32)
    mod.pred_kernel[(1,)](out, qlo, h, BQ=32, BK=32)
    env = {"q": torch.arange(qlo, qlo + 32).view(32, 1), "k": torch.arange(32).view(1, 32),
           "h": h, "b": 0, "Lq": 32, "Lk": 32, "H": 2}
    want = torch.as_tensor(evaluate(ir, env)).expand(32, 32)
    return out.bool(), want


@pytest.mark.parametrize("src", EXPRS, ids=[f"expr{i}" for i in range(len(EXPRS))])
def test_emitted_semantics_match_reference(tmp_path, src):
    for qlo, h in ((-17, 0), (5, 1)):
        got, want = _run_predicate(tmp_path, src, qlo, h)
        assert torch.equal(got, want), f"{src} at q >= {qlo}, h={h}"


# --------------------------------------------------------- rendered files

def test_rendered_forward_file(fresh_cache):
    p = spattn.compile("causal & (window(8) | sink(4))")
    path = cache.kernel_file(p, "fwd", head_dim=64, dtype="bf16", strategy="ranges",
                             closed_form=window_cf(8))
    text = path.read_text()
    assert re.fullmatch(r"attn_fwd_pattern_[0-9a-f]{16}\.py", path.name)
    assert text.startswith("# spattn-kernel key=")
    assert p.source in text and "Strategy: ranges" in text and f"Codegen version: {CODEGEN_VERSION}" in text
    key6 = path.stem.rsplit("_", 1)[1][:6]
    assert f"def attn_fwd_pattern_{key6}(" in text
    for marker in ("# -- scores --", "# -- online softmax --", "# epilogue", "tl.static_assert",
                   "MASKED=False", "MASKED=True"):
        assert marker in text, marker
    compile(text, str(path), "exec")


def test_rendered_backward_file(fresh_cache):
    p = spattn.compile("causal & same(doc)")
    text = cache.kernel_file(p, "bwd", head_dim=128, dtype="fp16", strategy="table",
                             block_m1=32, block_n1=128, block_m2=128, block_n2=32).read_text()
    key6 = re.search(r"def attn_bwd_dq_pattern_([0-9a-f]{6})\(", text).group(1)
    for name in ("attn_bwd_dkdv", "attn_bwd_dq"):
        assert f"def {name}_pattern_{key6}(" in text
    # no pre-pass kernel: the dQ kernel writes delta and the log2-unit lse
    assert "preprocess" not in text and "PREPROCESS" not in text
    assert "tl.store(DELTA" in text and "tl.store(LSE2" in text
    assert "for g in range(0, GROUP)" in text and "atomic" not in text
    # FlashAttention-2 orientation: no transpose of a computed tile (p, ds), only of loads
    assert "tl.trans(b_p" not in text and "tl.trans(b_ds" not in text
    assert "tl.dot(b_k, b_qt" in text and "tl.trans(b_qt)" in text and "tl.trans(b_kt)" in text
    for const in ("BLOCK_M1 = 32", "BLOCK_N1 = 128", "BLOCK_M2 = 128", "BLOCK_N2 = 32"):
        assert const in text, const
    compile(text, "bwd.py", "exec")


def test_kernel_source_and_path(fresh_cache):
    p = spattn.compile("causal & window(8)")
    path = p.kernel_path
    assert path.parent == fresh_cache and path.exists()
    assert p.kernel_source("bwd", head_dim=64, dtype=torch.float16).count("@triton.jit") >= 4


# ------------------------------------------------------------------ cache

def test_lengths_do_not_regenerate(fresh_cache):
    p = spattn.compile("causal & window(9)")
    for L, Hq, Bn in ((40, 2, 1), (23, 4, 2)):
        q, k, v = rand_qkv(Bn, Hq, Hq, L, L, 32, seed=L)
        tb.fwd(p, q, k, v, scale=0.2, q_offset=3, inputs={}, strategy="table", block_m=16,
               block_n=16)
    assert len(list(fresh_cache.glob("attn_fwd_*.py"))) == 1


def test_options_change_the_file(fresh_cache):
    p = spattn.compile("causal")
    a = cache.kernel_file(p, "fwd", head_dim=64, dtype="fp16", strategy="table")
    b = cache.kernel_file(p, "fwd", head_dim=64, dtype="fp16", strategy="table", block_m=64)
    c = cache.kernel_file(p, "fwd", head_dim=256, dtype="fp16", strategy="table")
    d = cache.kernel_file(p, "fwd", head_dim=64, dtype="fp32", strategy="table")
    assert len({a, b, c, d}) == 4
    assert a == cache.kernel_file(p, "fwd", head_dim=64, dtype=torch.float16, strategy="table")


@pytest.mark.parametrize("damage", ["corrupt", "foreign", "truncated", "no-header"])
def test_bad_file_is_regenerated(fresh_cache, damage):
    p = spattn.compile("causal & window(5)")
    path = cache.kernel_file(p, "fwd", head_dim=32, dtype="fp32", strategy="table")
    good = path.read_text()
    first, body = good.split("\n", 1)
    bad = {"corrupt": first + "\n" + body.replace("tl.maximum", "tl.minimum", 1),
           "foreign": first.replace("key=", "key=0") + "\n" + body,
           "truncated": good[: len(good) // 2],
           "no-header": body}[damage]
    path.write_text(bad)
    cache.clear_memory()
    with pytest.warns(RuntimeWarning, match="regenerating"):
        again = cache.kernel_file(p, "fwd", head_dim=32, dtype="fp32", strategy="table")
    assert again == path and path.read_text() == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.kernel_file(p, "fwd", head_dim=32, dtype="fp32", strategy="table")


def test_atomic_write_leaves_no_temporaries(fresh_cache):
    p = spattn.compile("chunked(8)")
    cache.kernel_file(p, "fwd", strategy="table")
    cache.kernel_file(p, "bwd", strategy="table")
    names = sorted(f.name for f in fresh_cache.iterdir())
    assert all(n.endswith(".py") for n in names) and len(names) == 2


def test_module_is_importable_and_kept_in_memory(fresh_cache):
    p = spattn.compile("causal")
    mod, cfg = cache.load(p, "fwd", head_dim=32, dtype="fp32", strategy="table")
    mod2, _ = cache.load(p, "fwd", head_dim=32, dtype="fp32", strategy="table")
    assert mod is mod2 and mod.STRATEGY == "table" and cfg.block_d == 32
    assert mod.__file__ == str(cache.kernel_file(p, "fwd", head_dim=32, dtype="fp32",
                                                 strategy="table"))


# --------------------------------------------------------------- strategy

def test_strategy_override_and_defaults(monkeypatch):
    p = spattn.compile("causal & same(doc)")
    assert st.pick(p, head_dim=64, overrides={"strategy": "table"}).strategy == "table"
    assert st.pick(p, head_dim=64).strategy == "table"   # runtime inputs: no closed form
    cfg = st.pick(p, head_dim=80, dtype="bf16", interpret=False)
    assert (cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_stages) == (64, 64, 128, 3)
    assert st.pick(p, head_dim=256, dtype="fp16", interpret=False).block_m == 64
    with pytest.raises(ValueError):
        st.pick(p, strategy="remap")


def test_backward_tile_defaults_and_overrides(monkeypatch):
    p = spattn.compile("causal")
    for var in ("SPATTN_BWD_BLOCK_M1", "SPATTN_BWD_BLOCK_N1", "SPATTN_BWD_BLOCK_M2",
                "SPATTN_BWD_BLOCK_N2", "SPATTN_BWD_WARPS", "SPATTN_BWD_STAGES",
                "SPATTN_NUM_WARPS", "SPATTN_NUM_STAGES", "SPATTN_BLOCK_M", "SPATTN_BLOCK_N"):
        monkeypatch.delenv(var, raising=False)

    def tiles(c):
        return (c.block_m, c.block_n, c.block_m2, c.block_n2, c.num_warps, c.num_stages)
    gpu = dict(interpret=False, strategy="table")
    assert tiles(st.pick(p, "bwd", head_dim=128, dtype="bf16", **gpu)) == (32, 64, 64, 32, 4, 3)
    assert tiles(st.pick(p, "bwd", head_dim=64, dtype="fp16", **gpu))[:4] == (32, 64, 64, 32)
    assert tiles(st.pick(p, "bwd", head_dim=256, dtype="bf16", **gpu))[:4] == (32, 64, 64, 32)
    assert st.pick(p, "fwd", head_dim=128, **gpu).block_m2 == 0
    monkeypatch.setenv("SPATTN_BWD_BLOCK_M1", "16")
    monkeypatch.setenv("SPATTN_BWD_BLOCK_N2", "16")
    monkeypatch.setenv("SPATTN_BWD_WARPS", "8")
    monkeypatch.setenv("SPATTN_BWD_STAGES", "2")
    monkeypatch.setenv("SPATTN_BLOCK_M", "128")         # forward only
    monkeypatch.setenv("SPATTN_FWD_WARPS", "8")
    from spattn.runtime.settings import current
    env = current()
    bwd, fwd = dict(gpu, overrides=env.overrides("bwd")), dict(gpu, overrides=env.overrides("fwd"))
    assert tiles(st.pick(p, "bwd", head_dim=128, **bwd)) == (16, 64, 64, 16, 8, 2)
    f = st.pick(p, "fwd", head_dim=128, **fwd)
    assert (f.block_m, f.block_n, f.num_warps, f.num_stages) == (128, 64, 8, 3)
    # explicit arguments win: per kernel, then block_m / block_n for both kernels
    assert tiles(st.pick(p, "bwd", head_dim=128, block_m=32, block_n2=32, **bwd))[:4] == \
        (32, 64, 32, 32)
    with pytest.raises(ValueError):
        st.pick(p, "bwd", head_dim=128, block_m1=24, **gpu)


@pytest.mark.parametrize("cf_name,n_pieces", [("window", 0), ("window_sink", 3),
                                              ("global_local", 7), ("four", 0)],
                         ids=["1-interval", "2-intervals", "3-intervals", "4-intervals"])
@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
def test_fused_forward_merges_pieces(fresh_cache, cf_name, n_pieces, tma):
    """The fused forward runs the pieces of a union of up to MERGE_INTERVALS intervals in one
    loop (one pipeline fill; NOTES row 53): one call of the loop function, which picks each
    step's tile and FULL range by piece.  One interval, or more than three, keep one call
    per piece."""
    from spattn.codegen import kernels as K
    cfs = {"window": window_cf(8), "window_sink": window_sink_cf(8, 4),
           "global_local": global_local_cf(4, 8, 8)}
    cfs["four"] = type(cfs["window"])(rows=cfs["global_local"].rows + cfs["window"].rows)
    cf = cfs[cf_name]
    assert K.merged_pieces(cf.rows) == n_pieces
    p = spattn.compile("causal & (window(8) | sink(4))")
    cfg = st.pick(p, "fwd", head_dim=64, dtype="bf16", strategy="ranges", loop="fused",
                  tma=tma, closed_form=cf, interpret=False)
    text = K.render_fwd(p, cfg, "k" * 32, cf)
    calls = text.count("= _fwd_fused_kkkkkk(")
    if n_pieces:
        assert calls == 1 and f"# the {n_pieces} pieces in one loop" in text
        fn = text.split("def _fwd_fused_kkkkkk(")[1].split("@triton.jit")[0]
        assert f"pa{n_pieces - 1}, pz{n_pieces - 1}, pf{n_pieces - 1}, pg{n_pieces - 1}," in fn
        assert f"pa{n_pieces}," not in fn
        assert f"for idx in range(0, n{n_pieces - 1}):" in fn and "range(start, end)" not in fn
        assert fn.count("tl.where(past, ") == 3 * (n_pieces - 1)
        assert f"Forward loop: fused (one loop over all {n_pieces} interval pieces" in text
    else:
        assert calls == 2 ** len(cf.rows) - 1 and "pieces in one loop" not in text
        assert "for i_n in range(start, end):" in text
        assert "Forward loop: fused (one loop per interval piece" in text
    compile(text, "<fused>", "exec")


def test_forward_loop_variants(fresh_cache, monkeypatch):
    """loop="fused": one _fwd_fused call per interval piece, the predicate under a per-tile
    `if partial:`; the split file is a different cache entry; the env var selects it too."""
    p = spattn.compile("causal & (window(8) | sink(4))")
    opts = dict(head_dim=64, dtype="bf16", strategy="ranges", closed_form=window_cf(8))
    split_path = cache.kernel_file(p, "fwd", **opts)
    split = split_path.read_text()
    assert "_fwd_fused" not in split and "Forward loop" not in split
    path = cache.kernel_file(p, "fwd", loop="fused", **opts)
    assert path != split_path
    monkeypatch.setenv("SPATTN_FWD_LOOP", "fused")
    assert cache.kernel_file(p, "fwd", **opts) == path
    fused = path.read_text()
    assert f"Codegen version: {CODEGEN_VERSION}" in fused and "Forward loop: fused" in fused
    key6 = path.stem.rsplit("_", 1)[1][:6]
    n_pieces = fused.count("in one loop, FULL where in")
    assert n_pieces == 1 and fused.count(f"= _fwd_fused_{key6}(") == n_pieces
    assert "_fwd_range_" not in fused and "m0, m1 = _split(" not in fused
    body = fused.split(f"def _fwd_fused_{key6}(")[1].split("@triton.jit")[0]
    assert "partial = (i_n < full_start) | (i_n >= full_end)" in body
    assert body.index("if partial:") < body.index("m_pattern") < body.index("# -- online")
    assert body.index("tl.dot(b_q") < body.index("if partial:")   # loads, dot outside
    # table strategy: the variant applies to its spans; the CSR lists keep their two loops
    tab = cache.kernel_file(p, "fwd", head_dim=64, dtype="bf16", strategy="table").read_text()
    spans, csr = tab.split("    if SPANS:\n")[1].split("\n    else:\n")[:2]
    assert spans.count("= _fwd_fused_") == 1 and "_fwd_range_" not in spans
    assert csr.count("= _fwd_range_") == 3 and "TABLE=True" in csr and "MASKED=False" in csr
    assert "if RUNS:" in csr and "TABLE=2" in csr
    monkeypatch.delenv("SPATTN_FWD_LOOP")
    tab = cache.kernel_file(p, "fwd", head_dim=64, dtype="bf16", strategy="table").read_text()
    spans = tab.split("    if SPANS:\n")[1].split("\n    else:\n")[0]
    assert "_fwd_fused" not in tab and spans.count("TABLE=False") == 3
    monkeypatch.setenv("SPATTN_FWD_LOOP", "fused")
    compile(fused, str(path), "exec")
    monkeypatch.setenv("SPATTN_FWD_LOOP", "bogus")
    with pytest.raises(ValueError, match="SPATTN_FWD_LOOP"):
        cache.kernel_file(p, "fwd", **opts)


@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
@pytest.mark.parametrize("src,strategy", [
    ("causal & (window(8) | sink(4))", "ranges"), ("causal & same(doc)", "table"),
    ("q >= 3", "ranges")], ids=["streaming-ranges", "documents-table", "only-q-ranges"])
def test_every_variant_renders(src, strategy, tma, int64):
    """Each kernel template renders valid Python for every loop variant under these flags,
    with the stage comments and the invariants, and only the int64 files widen."""
    from spattn.codegen.kernels import render
    p = spattn.compile(src)
    cf = st.get_closed_form(p) if strategy == "ranges" else None
    for kind, loops in (("fwd", st.FWD_LOOPS), ("bwd", st.BWD_LOOPS)):
        for loop in loops:
            cfg = st.pick(p, kind, head_dim=64, dtype="bf16", strategy=strategy, loop=loop,
                          tma=tma, int64=int64, interpret=False)
            text = render(p, kind, cfg, "f" * 32, closed_form=cf)
            compile(text, f"<{kind}-{loop}>", "exec")
            assert "{{" not in text and "{%" not in text
            for marker in ("# -- scores", "# -- predicate (PARTIAL tile) --", "# epilogue",
                           "tl.static_assert(BLOCK_D >= HEAD_DIM)"):
                assert marker in text, (kind, loop, marker)
            assert ("tl.cast(Lq, tl.int64)" in text) is int64
            assert (".load([" in text) is cfg.tma


def _depth(node) -> int:
    import ast
    return 1 + max((_depth(c) for c in ast.iter_child_nodes(node)), default=0)


@pytest.mark.parametrize("src,score", [
    ("log_bucket(abs(q - k), 1, 1000000, 400) <= 9", None),
    ("full", "s + float(log_bucket(abs(q - k), 1, 1000000, 400)) * 0.01"),
    ("causal", " + ".join(f"float(q % {i + 2}) * {i + 1}e-3" for i in range(300)) + " + s"),
    ("causal & q - k <= [" + ", ".join(str(i * 7 % 11) for i in range(300)) + "][q % 300]",
     None),
    ("causal", "s + [" + ", ".join(str(i * 7 % 11 / 10) for i in range(300)) + "][k % 300]"),
    ("k <= min(" + ", ".join(f"q + {i}" for i in range(250)) + ")", None),
], ids=["mask-400-terms", "score-400-terms", "score-300-floats", "mask-list-300",
        "score-list-300", "mask-min-250"])
def test_long_chains_are_emitted_shallow(fresh_cache, src, score):
    """A sum (or junction) of many operands is emitted as chunks of at most ``CHAIN``
    operands: a flat chain of hundreds (``log_bucket`` with 400 buckets and more) parsed into an AST
    deeper than Python's recursion limit, which the interpreter's AST rewrite (and Triton's
    code generator) visit recursively: a raw RecursionError at the first call. The kernel
    then matches the reference. A list of 300 entries, or a min of 250 arguments, nested
    one ``tl.where`` (``tl.minimum``) per entry: Python refuses 200 nested parentheses."""
    import ast
    from spattn.runtime.reference import pattern_reference
    p = spattn.compile(src, score=score, backend="triton")
    roots = [p.ir] if score is None else [p.score]
    em = emit(roots, {**ENV, "s": "s"}, loop_vars=["k"], result_names=["r"])
    depth = max(_depth(ast.parse(line.strip())) for line in em.outer + em.inner + em.results
                if line.strip())
    assert depth < 200, depth
    q, k, v = rand_qkv(1, 1, 1, 16, 16, 16, seed=4)
    o = p(q, k, v)
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)
