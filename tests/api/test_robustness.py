"""What a user can get wrong through the public API and the CLI: each gives a SpattnError
that says what is wrong and what to do (issue #19: huge q_offset, files that are not
UTF-8, meta tensors, unsigned inputs, bad kernel kinds, bad SPATTN_* overrides), and
what non-finite inputs do."""
import io
import os
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import spattn
from spattn.cli import main
from spattn.dsl.errors import (MAX_INT, SpattnConfigError, SpattnError, SpattnInputError,
                               SpattnParamError, SpattnSyntaxError, SpattnValueError)
from spattn.runtime.reference import attention_reference

ROOT = Path(__file__).resolve().parents[2]
interpreter = pytest.mark.interpreter


def qkv(L=40, D=16, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, L, D, generator=g) for _ in range(3)]


def check_against_reference(pattern, q, k, v, **kw):
    o = pattern(q, k, v, **kw)
    inputs = {n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}
    m = pattern.mask(q.shape[2], k.shape[2], num_heads=q.shape[1], q_offset=kw.get("q_offset"),
                     **inputs)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), m)
    torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)
    return m


# --------------------------------------------------------------------- q_offset

@pytest.mark.parametrize("q_offset", [2 ** 64, -2 ** 64, MAX_INT + 1, -MAX_INT - 1, 10 ** 5000,
                                      np.uint64(2 ** 63)],
                         ids=["2**64", "-2**64", "2**62+1", "-2**62-1", "5000-digits",
                              "numpy-uint64"])
def test_q_offset_out_of_range_is_a_value_error(q_offset):
    q, k, v = qkv()
    for call in (lambda: spattn.compile("causal", backend="torch")(q, k, v, q_offset=q_offset),
                 lambda: spattn.compile("causal").mask(4, 4, q_offset=q_offset),
                 lambda: spattn.compile("causal").tiles(64, 64, 16, 16, q_offset=q_offset)):
        with pytest.raises(SpattnValueError, match=r"q_offset .*\|q_offset\| <= 2\*\*62"):
            call()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
@pytest.mark.parametrize("q_offset", [MAX_INT, MAX_INT - 5, -MAX_INT, 2 ** 40 + 1])
def test_q_offset_at_the_limit_is_exact(backend, q_offset):
    """Positions near 2**62 (modulo and floor division of them included) match the
    reference, so the limit is a real one and not a guess."""
    pat = spattn.compile("causal & (q - k) % 3 == 0 | q % 7 == k % 7", backend=backend)
    m = check_against_reference(pat, *qkv(L=48), q_offset=q_offset)
    assert m.any()


# ------------------------------------------------------------------------ scale

@pytest.mark.parametrize("scale", [1e39, 10 ** 5000, torch.tensor([1.0, 2.0]), 1 + 1j],
                         ids=["1e39", "5000-digits", "tensor-of-two", "complex"])
def test_scale_out_of_range_is_a_value_error(scale):
    with pytest.raises(SpattnValueError, match="scale must be a positive finite number"):
        spattn.compile("causal", backend="torch")(*qkv(), scale=scale)


@pytest.mark.parametrize("scale", [np.float32(0.25), np.int64(1), torch.tensor(0.25), 1e-30],
                         ids=["numpy-float32", "numpy-int64", "tensor", "tiny"])
def test_scale_of_any_real_type(scale):
    pat = spattn.compile("causal & window(9)", backend="torch")
    q, k, v = qkv()
    o = pat(q, k, v, scale=scale)
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(40, 40, num_heads=2), scale=float(scale))
    torch.testing.assert_close(o.double(), ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------- pattern files

def test_file_that_is_not_utf8_is_a_located_syntax_error(tmp_path):
    path = tmp_path / "latin1.spattn"
    path.write_bytes("# fenêtre\npattern p = causal\n".encode("latin-1"))
    with pytest.raises(SpattnSyntaxError) as e:
        spattn.load(path)
    assert (e.value.line, e.value.column) == (1, 6)            # the "ê" of "fenêtre"
    assert "not UTF-8" in str(e.value) and str(path) in str(e.value)
    err = io.StringIO()
    code = _cli(["check", str(path)], err)
    assert code == 1 and "not UTF-8" in err.getvalue()


@pytest.mark.parametrize("path", [None, 3, b"x".decode, ["a.spattn"]],
                         ids=["None", "int", "function", "list"])
def test_load_takes_a_path(path):
    with pytest.raises(SpattnParamError, match="path"):
        spattn.load(path)


def test_load_never_reads_a_fifo_or_a_directory(tmp_path):
    fifo = tmp_path / "pipe.spattn"
    os.mkfifo(fifo)
    for p in (fifo, tmp_path):
        with pytest.raises(SpattnError, match="not a regular file"):
            spattn.load(p)


# ------------------------------------------------------------------- meta tensors

def test_meta_tensors_are_input_errors():
    pat = spattn.compile("same(doc)", backend="torch")
    q, k, v = qkv()
    meta = [t.to("meta") for t in (q, k, v)]
    doc = torch.zeros(40, dtype=torch.long)
    with pytest.raises(SpattnInputError, match=r"\bq\b.*meta tensor.*'cpu' or 'cuda'"):
        pat(*meta, doc=doc)
    with pytest.raises(SpattnInputError, match=r"'doc'.*meta tensor"):
        pat(q, k, v, doc=doc.to("meta"))
    for method in (lambda d: pat.mask(40, 40, doc=d), lambda d: pat.tiles(40, 40, 8, 8, doc=d),
                   lambda d: pat.explain(40, doc=d)):
        with pytest.raises(SpattnInputError, match=r"'doc'.*meta tensor"):
            method(doc.to("meta"))


@pytest.mark.parametrize("device", ["bogus", "cuda:99", 3.5])
def test_unusable_device_of_an_analysis(device):
    if device == "cuda:99" and torch.cuda.device_count() > 99:  # pragma: no cover
        pytest.skip("has a 100th GPU")
    with pytest.raises(SpattnValueError, match="device="):
        spattn.compile("causal").mask(4, 4, device=device)


# ---------------------------------------------------------------- runtime inputs

@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_unsigned_runtime_inputs_say_how_to_convert(dtype):
    pat = spattn.compile("same(doc)", backend="torch")
    doc = torch.zeros(40, dtype=dtype)
    for call in (lambda: pat(*qkv(), doc=doc), lambda: pat.mask(40, 40, doc=doc)):
        with pytest.raises(SpattnInputError, match=rf"'doc'.*{dtype}.*unsigned.*"
                                                   r"doc\.to\(torch\.int64\)"):
            call()


def test_uint8_runtime_inputs_still_work():
    pat = spattn.compile("causal & same(doc)", backend="torch")
    doc = (torch.arange(40) // 9).to(torch.uint8)
    check_against_reference(pat, *qkv(), doc=doc)


# --------------------------------------------------------------- kernel source

@pytest.mark.parametrize("kwargs,cls,text", [
    (dict(kind="xyz"), SpattnValueError, "unknown kernel kind 'xyz'"),
    (dict(head_dim=8), SpattnValueError, "head_dim must be an integer in 16..256"),
    (dict(dtype="float64"), SpattnValueError, "float16, bfloat16 or float32"),
    (dict(block_m=17), SpattnConfigError, "block_m must be a power of two in 16..256"),
    (dict(num_warps=3), SpattnConfigError, "num_warps must be 1, 2, 4"),
    (dict(num_stages=0), SpattnConfigError, "num_stages must be an integer in 1..8"),
    (dict(strategy="remap"), SpattnConfigError, "'ranges', 'table'"),
    (dict(loop="twisted"), SpattnConfigError, "loop='twisted'.*'split', 'fused', 'persistent'"),
    (dict(blockm=32), SpattnParamError, "unknown kernel option 'blockm'"),
    (dict(block_m=0), SpattnConfigError, "block_m must be a power of two in 16..256.*got 0"),
    (dict(kind="bwd", block_n1=0), SpattnConfigError, "block_n1 must be a power of two"),
    (dict(tma="x"), SpattnParamError, "kernel option tma must be True or False, got 'x'"),
    (dict(fast_tanh=1), SpattnParamError, "fast_tanh must be True or False, got 1"),
], ids=["kind", "head-dim", "dtype", "block", "warps", "stages", "strategy", "loop", "typo",
        "block-0", "bwd-block-0", "tma", "fast-tanh"])
def test_kernel_source_arguments(kwargs, cls, text):
    with pytest.raises(cls, match=text):
        spattn.compile("causal & window(8)").kernel_source(**kwargs)


# ------------------------------------------------------------ SPATTN_* overrides

ENV = [
    ("SPATTN_STRATEGY", "ranges", "same(doc)", "no closed form.*SPATTN_STRATEGY=ranges.*'table'"),
    ("SPATTN_STRATEGY", "remap", "causal", "SPATTN_STRATEGY.*'ranges', 'table'"),
    ("SPATTN_FWD_LOOP", "bogus", "causal", "SPATTN_FWD_LOOP='bogus'.*'split', 'fused', 'persistent'"),
    ("SPATTN_BLOCK_M", "17", "causal", "SPATTN_BLOCK_M='17': expected a power of two in 16..256"),
    ("SPATTN_BLOCK_N", "abc", "causal", "SPATTN_BLOCK_N='abc': expected a power of two"),
    ("SPATTN_BLOCK_N", "0", "causal", "SPATTN_BLOCK_N='0': expected a power of two"),
    ("SPATTN_FWD_WARPS", "3", "causal", "SPATTN_FWD_WARPS='3': expected 1, 2, 4, 8, 16 or 32"),
    ("SPATTN_NUM_WARPS", "many", "causal", "SPATTN_NUM_WARPS='many'"),
    ("SPATTN_FWD_STAGES", "-1", "causal", "SPATTN_FWD_STAGES='-1': expected an integer in 1..8"),
    ("SPATTN_TMA", "bogus", "causal", "SPATTN_TMA='bogus': expected one of 1, .*0, .*auto"),
    ("SPATTN_TABLES", "dense", "same(doc)", "SPATTN_TABLES='dense'.*'auto', 'csr', 'spans', 'runs'"),
]


@interpreter
@pytest.mark.parametrize("var,value,src,text", ENV, ids=[f"{e[0]}={e[1]}" for e in ENV])
def test_bad_environment_override_is_a_config_error(monkeypatch, var, value, src, text):
    monkeypatch.setenv(var, value)
    pat = spattn.compile(src, backend="triton")
    kw = {"doc": torch.arange(40) // 10} if "doc" in src else {}
    with pytest.raises(SpattnConfigError, match=text) as e:
        pat(*qkv(), **kw)
    assert isinstance(e.value, ValueError)


@interpreter
@pytest.mark.parametrize("var,value,text", [
    ("SPATTN_BWD_LOOP", "bogus", "SPATTN_BWD_LOOP='bogus'.*'split', 'fused'"),
    ("SPATTN_BWD_BLOCK_M1", "24", "SPATTN_BWD_BLOCK_M1='24': expected a power of two"),
    ("SPATTN_BWD_STAGES", "nine", "SPATTN_BWD_STAGES='nine'"),
])
def test_bad_backward_override_is_a_config_error(monkeypatch, var, value, text):
    """Every setting is checked when the environment is read, at the call: a bad backward
    override fails before a forward whose backward would fail."""
    monkeypatch.setenv(var, value)
    q, k, v = (t.requires_grad_() for t in qkv(L=24))
    with pytest.raises(SpattnConfigError, match=text):
        spattn.compile("causal & window(7)", backend="triton")(q, k, v)


# -------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_nan_in_a_query_row_stays_in_that_row(backend):
    """As documented in runtime/api.py: inputs are not inspected; a non-finite query row
    gives a non-finite output row, and every other row is still exact."""
    pat = spattn.compile("causal & window(9)", backend=backend)
    q, k, v = qkv(L=64)
    bad = q.clone()
    bad[0, 1, 20, 3] = float("nan")
    o = pat(bad, k, v)
    rows = (~torch.isfinite(o)).any(-1)
    assert rows.nonzero().tolist() == [[0, 1, 20]]
    ref, _ = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(64, 64, num_heads=2))
    keep = ~rows
    torch.testing.assert_close(o.double()[keep], ref[keep], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_nan_in_a_value_reaches_rows_that_read_its_tile(backend):
    """A NaN value of key 5 reaches the rows allowed to see it (5..13), possibly rows that
    compute key 5 masked (0 * NaN: on Triton rows whose tiles hold it, on the torch backend
    rows of the same band), and never another head."""
    pat = spattn.compile("causal & window(9)", backend=backend)
    q, k, v = qkv(L=160)
    v[0, 0, 5, 3] = float("nan")
    o = pat(q, k, v)
    rows = (~torch.isfinite(o)).any(-1)[0, 0]
    assert rows[5:14].all()
    if backend == "triton":
        assert not rows[128:].any()                        # tiles of up to 64 keys
    assert torch.isfinite(o[0, 1]).all()                   # the other head


# --------------------------------------------------------------------------- CLI

def _cli(argv, err):
    import contextlib
    with contextlib.redirect_stderr(err):
        return main(argv, out=io.StringIO())


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert spattn.__version__ == pyproject["project"]["version"]
    assert re.fullmatch(rf"spattn {re.escape(spattn.__version__)} \(codegen \d+, torch \S+, "
                        r"triton [^)]+\)\n", out), out


def test_cli_output_that_cannot_be_written(tmp_path):
    err = io.StringIO()
    code = _cli(["codegen", "-e", "causal", "-o", str(tmp_path / "missing" / "k.py")], err)
    assert code == 1 and "cannot write" in err.getvalue() and "No such file" in err.getvalue()


@pytest.mark.parametrize("argv,text", [
    (["check", "-e", "q < " + "9" * 5000], "integer literal 9999999999...9999999999"),
    (["check", "-e", "window(W)", "-p", f"W={2 ** 300}"], "param 'W' is"),
    (["explain", "-e", "causal", "--lq", str(2 ** 62)], "does not fit in memory"),
    (["run", "-e", "causal", "--lq", "16", "--q-offset", str(2 ** 64)], "q_offset"),
    (["run", "-e", "causal", "--lq", "16", "--dim", "8", "--backend", "triton"], "head dim"),
], ids=["huge-literal", "huge-param", "huge-length", "huge-q-offset", "small-dim-triton"])
def test_cli_errors_exit_1(argv, text):
    err = io.StringIO()
    assert _cli(argv, err) == 1
    assert any(line.startswith("spattn: ") and text in line
               for line in err.getvalue().splitlines()), err.getvalue()


# ------------------------------------------------------- 64-bit values in the kernels

@interpreter
def test_literal_beyond_int32_in_the_triton_kernel():
    pat = spattn.compile("q - k < 1099511627776 & causal", backend="triton")
    check_against_reference(pat, *qkv(L=24))


@interpreter
def test_runtime_input_values_beyond_int32_on_triton():
    pat = spattn.compile("same(doc)", backend="triton")
    doc = torch.zeros(48, dtype=torch.long)
    doc[24:] = 2 ** 32                    # int32 would make it document 0 again
    check_against_reference(pat, *qkv(L=48), doc=doc)
    assert pat.plan(*qkv(L=48), doc=doc).call.int64


# ------------------------------------------------------------------- torch.func transforms

def _funcs(win=None):
    """Calls under torch.func transforms that spattn does not take (a pattern's call does:
    tests/runtime/test_transforms.py): ``(id, argument named, call)``; ``win``: the
    ``causal & window(5)`` pattern to use (the test warms its decode steps' fast entries
    at these shapes)."""
    win = win or spattn.compile("causal & window(5)", backend="torch")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 1, 2, 40, 16, generator=g) for _ in range(3))
    qd, kc = torch.randn(3, 1, 2, 1, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    pool, table = torch.randn(8, 64, 2, 16, generator=g), torch.arange(4).view(1, 4)
    vm = torch.vmap
    return [
        ("vmap-order", "order", lambda: vm(lambda o: win(q[0], k[0], v[0], order=o))(
            torch.stack([torch.randperm(40, generator=g) for _ in range(3)]))),
        ("vmap-plan", "q", lambda: vm(lambda a: (win.plan(a, k[0], v[0]), a)[1])(q)),
        ("vmap-decode", "q", lambda: vm(lambda a: win.decode(a, kc, kc))(qd)),
        ("vmap-seq-lens", "seq_lens", lambda: vm(
            lambda s: win.decode(qd[0], kc, kc, seq_lens=s))(torch.tensor([[100], [200]]))),
        ("vmap-page-table", "page_table", lambda: vm(
            lambda p: win.decode(qd[0], pool, pool, seq_lens=torch.tensor([200]),
                                 page_table=p))(torch.stack([table, table]))),
        ("vmap-empty", "q", lambda: vm(lambda a: win(a, k[0], v[0]))(q[:, :, :, :0])),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _funcs()])
def test_torch_func_transforms_are_input_errors_where_not_taken(case):
    """A torch.func transform's tensors (vmap's batched tensors, grad's tracking tensors)
    where spattn does not take them (``pat.decode``, ``pat.plan``, ``order=``, an empty
    call) are a SpattnInputError naming the argument and the way out (fold the extra
    dimension into B), on the first call and on a call that a fast entry would serve,
    rather than a ``data_ptr`` RuntimeError from inside a plan."""
    win = spattn.compile("causal & window(5)", backend="torch")
    kc = torch.randn(1, 2, 300, 16)
    for _ in range(2):                  # the decode fast entries of plain calls of that shape
        assert torch.isfinite(win(torch.randn(1, 2, 1, 16), kc, kc)).all()
        assert torch.isfinite(win.decode(torch.randn(1, 2, 1, 16), kc, kc)).all()
    name, arg, run = _funcs(win)[case]
    with pytest.raises(SpattnInputError, match=rf"{re.escape(arg)} \(shape .*torch\.func "
                                               r"transform.*into B"):
        run()
