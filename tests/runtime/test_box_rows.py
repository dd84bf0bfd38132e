"""A token layout's forward through 5-D TMA boxes (``SPATTN_LAYOUT_GATHER=box``,
``KernelConfig.rows == "box"``): the generated forward reads q, k, v and writes o and the
lse on the caller's tensors, each tile a sub-box of one of the layout's boxes; the backward
runs on gathered copies or through row tables. Outputs, lse and gradients against the
float64 reference on fresh
random inputs (every element), under the interpreter (which emulates the descriptors):
2-D and 3-D grids, boxes cut along either axis, grids the boxes do not divide, GQA, two
batch elements, transposed ``[B, N, H, D]`` views; the fallbacks where the boxes cannot be
read (residue classes, tiles larger than a box, 3-D views whose batch and heads do not
fold) and the setting's rule; a property of the generated ``_box_at`` (a tile's sub-box
origin) against the layout's own slot coordinates."""
import dataclasses
import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

import spattn
from spattn.ir import layout as LY
from spattn.runtime import settings as S
from spattn.runtime.plan import PermutedPlan, RemappedPlan, _box_test
from spattn.runtime.triton_backend import BoxRows
from tests.runtime.test_torch_backend import check_with_reference


def _tensors(B, Hq, Hk, N, D, g, bshd=False):
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hk, Hk))
    if bshd:        # [B, N, H, D] memory: the rows' stride is H * D
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return tuple(t.requires_grad_() for t in (q, k, v))


def _count_gathers(monkeypatch):
    calls = []
    real = PermutedPlan._gather

    def counting(self, t, index):
        calls.append(None if t is None else tuple(t.shape))
        return real(self, t, index)
    monkeypatch.setattr(PermutedPlan, "_gather", counting)
    return calls


def _box_plan(shape, box, kernel, q, k, v, tiles, backward="copy"):
    """A RemappedPlan of the neighbourhood in the given boxes, its forward through them,
    its backward ``backward`` ("copy" or "kernel")."""
    pat = spattn.neighborhood(shape, kernel, backend="triton")
    layout = LY.Layout(LY.Grid(shape), box)
    remap = LY.Remap(layout, LY.remap(pat.ir, layout), None, 0, 0)
    plan = RemappedPlan(pat, "triton", remap, q, k, v, scale=q.shape[-1] ** -0.5,
                        settings=S.current(), gather="box", backward=backward,
                        options={"block_m": tiles[0], "block_n": tiles[1]})
    return pat, plan


CASES = [  # shape, box, kernel, tiles (BLOCK_M x BLOCK_N), B, Hq, Hk, [B, N, H, D] memory
    ((8, 16), (4, 8), 3, (16, 32), 2, 2, 1, False),       # GQA, two batch elements
    ((8, 16), (8, 4), (5, 3), (32, 16), 1, 2, 2, False),
    ((9, 14), (4, 8), 3, (16, 32), 1, 2, 1, True),       # 12 x 16 slots: 66 padding
    ((2, 4, 8), (2, 2, 8), (1, 3, 3), (16, 16), 2, 2, 1, False),  # 3-D, GQA, batch and heads folded
    ((3, 5, 8), (2, 2, 8), (3, 3, 5), (32, 16), 1, 2, 2, False),   # 3-D padded
    ((40,), (16,), 5, (16, 16), 2, 2, 1, False),          # 1-D, padded
]
IDS = [f"B{c[4]}-Hq{c[5]}-Hk{c[6]}-L{math.prod(c[0])}-D16-fp32-"
       f"{'x'.join(map(str, c[0]))}-in-{'x'.join(map(str, c[1]))}-t{c[3][0]}x{c[3][1]}"
       + ("-bshd" if c[7] else "") for c in CASES]


@pytest.mark.interpreter
@pytest.mark.parametrize("shape,box,kernel,tiles,B,Hq,Hk,bshd", CASES, ids=IDS)
def test_box_forward(shape, box, kernel, tiles, B, Hq, Hk, bshd, monkeypatch):
    N = math.prod(shape)
    g = torch.Generator().manual_seed(N + B)
    q, k, v = _tensors(B, Hq, Hk, N, 16, g, bshd)
    pat, plan = _box_plan(shape, box, kernel, q, k, v, tiles)
    assert plan.gather == "box" and plan.forward_stage.config.rows == "box"
    assert plan.forward_stage.box.fold == (len(shape) == 3)
    assert "5-D TMA" in repr(plan)
    calls = _count_gathers(monkeypatch)
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    assert calls == [] and o.shape == q.shape and lse.shape == q.shape[:3]
    check_with_reference(o, lse, q, k, v, pat.mask(N, N, num_heads=Hq, batch=B), g)
    assert len(calls) >= 6        # the backward's copies: q, k, v, o, lse, dO and back


@pytest.mark.interpreter
@pytest.mark.parametrize("shape,box,kernel,tiles,B,Hq,Hk,bshd",
                         [CASES[0], CASES[2], CASES[3]], ids=[IDS[0], IDS[2], IDS[3]])
def test_box_forward_row_table_backward(shape, box, kernel, tiles, B, Hq, Hk, bshd,
                                        monkeypatch):
    """The box forward with the backward through row tables (``backward_gather``
    "kernel"): no copy in either direction; o, lse and every gradient against the float64
    reference."""
    N = math.prod(shape)
    g = torch.Generator().manual_seed(3 * N + B)
    q, k, v = _tensors(B, Hq, Hk, N, 16, g, bshd)
    pat, plan = _box_plan(shape, box, kernel, q, k, v, tiles, backward="kernel")
    assert (plan.gather, plan.backward_gather) == ("box", "kernel")
    assert plan.forward_stage.config.rows == "box" and "row tables" in repr(plan)
    calls = _count_gathers(monkeypatch)
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(N, N, num_heads=Hq, batch=B), g)
    assert calls == []


@pytest.mark.interpreter
def test_box_forward_bf16():
    """16-bit inputs (the interpreter runs them in fp32 copies, descriptors over those):
    o and lse against the float64 reference of the bf16 values."""
    from spattn.runtime.reference import attention_reference
    from tests.runtime.test_torch_backend import _close
    g = torch.Generator().manual_seed(11)
    q, k, v = (t.detach().to(torch.bfloat16) for t in _tensors(1, 2, 1, 128, 16, g))
    pat, plan = _box_plan((8, 16), (4, 8), 3, q, k, v, (32, 16))
    assert plan.gather == "box"
    o, lse = plan.forward(q, k, v)
    assert o.dtype == torch.bfloat16
    ro, rl = attention_reference(q.double(), k.double(), v.double(),
                                 pat.mask(128, 128, num_heads=2))
    _close("o", o, ro, rtol=2e-2)
    _close("lse", lse, rl, rtol=2e-2)


@pytest.mark.interpreter
def test_setting_box(monkeypatch):
    """``SPATTN_LAYOUT_GATHER=box`` on a layout the compiler chose."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "box")
    pat = spattn.neighborhood((8, 8), 3, backend="triton")
    g = torch.Generator().manual_seed(5)
    q, k, v = _tensors(1, 2, 1, 64, 16, g)
    plan = pat.plan(q, k, v)
    assert isinstance(plan, RemappedPlan) and plan.gather == "box"
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(64, 64, num_heads=2), g)


@pytest.mark.interpreter
def test_extra_tokens_fall_back(monkeypatch):
    """Extra tokens before the grid keep their sequence order in slots of their own: no
    boxes of the caller's tensors, so the rule of ``auto`` applies (copies or row tables),
    still right."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "box")
    pat = spattn.neighborhood((8, 8), 3, extra_before=5, backend="triton")
    g = torch.Generator().manual_seed(6)
    q, k, v = _tensors(1, 2, 1, 69, 16, g)
    plan = pat.plan(q, k, v)
    assert isinstance(plan, RemappedPlan) and plan.gather in ("copy", "kernel")
    assert plan.remap.layout.grid.offset == 5 and BoxRows.of(plan.remap.layout, q, k, v) is None
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(69, 69, num_heads=2), g, grads=False)


@pytest.mark.interpreter
def test_residue_classes_fall_back(monkeypatch):
    """A dilation that does not divide its axis: residue classes (a split grid), whose
    boxes hold every third token, no block of the caller's; the rule of ``auto`` applies."""
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "box")
    pat = spattn.neighborhood((100,), 5, dilation=3, backend="triton")
    g = torch.Generator().manual_seed(9)
    q, k, v = _tensors(1, 2, 1, 100, 16, g)
    plan = pat.plan(q, k, v)
    assert isinstance(plan, RemappedPlan) and plan.remap.layout.grid.splits == (3,)
    assert plan.gather in ("copy", "kernel")
    o, lse = pat(q, k, v, plan=plan, return_lse=True)
    check_with_reference(o, lse, q, k, v, pat.mask(100, 100, num_heads=2), g, grads=False)


def test_fallbacks_without_box():
    """Tiles larger than the box, and a 3-D grid over ``[B, N, H, D]`` memory (batch and
    heads do not fold into one descriptor axis), run the copies."""
    g = torch.Generator().manual_seed(7)
    q, k, v = _tensors(1, 2, 1, 128, 16, g)
    _, plan = _box_plan((8, 16), (4, 8), 3, q, k, v, (64, 32))
    assert plan.gather == "copy" and plan.forward_stage.config.rows == "seq"
    _, plan = _box_plan((8, 16), (4, 8), 3, q, k, v, (64, 32), backward="kernel")
    assert (plan.gather, plan.backward_gather) == ("kernel", "kernel")
    assert plan.forward_stage.config.rows == "table"
    q, k, v = _tensors(2, 2, 1, 96, 16, g, bshd=True)
    layout = LY.Layout(LY.Grid((4, 6, 4)), (2, 2, 4))
    assert BoxRows.of(layout, q, k, v) is None
    assert BoxRows.of(layout, *_tensors(2, 2, 1, 96, 16, g)) is not None
    assert BoxRows.of(LY.Layout(LY.Grid((4, 6, 4), offset=0, suffix=3), (2, 2, 4)),
                      *_tensors(1, 1, 1, 99, 16, g)) is None


from spattn.ir.cost import COSTS as LY_COSTS  # noqa: E402


def test_rule(monkeypatch):
    """``auto`` takes the boxes only on CUDA with TMA (``_box_test``), and an explicit
    ``box`` where the interpreter or TMA exists. With a layout the boxes can serve, ``auto``
    keeps exactly the layouts it keeps without them, priced by the cheaper of copies and
    row tables, and runs their forward through the boxes and their backward the way it
    priced; ``box`` prices the layout as its kernel alone; a layout the boxes cannot serve
    keeps the rule of ``auto``."""
    g = torch.Generator().manual_seed(8)
    q, k, v = _tensors(1, 2, 1, 128, 16, g)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    st = S.current()
    assert _box_test(q, k, st, "auto") is None and _box_test(q, k, st, "copy") is None
    test = _box_test(q, k, st, "box")
    good = LY.Layout(LY.Grid((8, 16)), (4, 8))
    bad = LY.Layout(LY.Grid((8, 16), (1, 2)), (2, 4, 4))      # residue classes
    assert test(good) and not test(bad)
    gathers = 128 * LY_COSTS["cuda"]["gather_token"]
    rows = 1.0 + LY_COSTS["cuda"]["rows_factor"]
    for cost in (50.0, 70.0, 80.0, 88.0, 95.0, 200.0):
        r = LY.Remap(good, None, None, 100, 50, cost_sequence=100.0, cost_layout=cost)
        way = "kernel" if cost * rows < cost + gathers else "copy"
        plain = LY.resolve_gathers(r, "auto", "cuda")
        assert plain.mode == plain.backward == way
        got = LY.resolve_gathers(r, "auto", "cuda", box=test)
        assert got.remap == plain.remap and got.backward == way
        assert got.mode == ("box" if plain.remap is not None else way)
        forced = LY.resolve_gathers(r, "auto", "cuda", force=True, box=test)
        assert forced.remap is not None and (forced.mode, forced.backward) == ("box", way)
        assert forced.remap.cost_layout == pytest.approx(
            cost * rows if way == "kernel" else cost + gathers)
        assert LY.resolve_gathers(r, "box", "cuda", box=test) == \
            ((r if r.pays else None), "box", way)
    assert any(LY.resolve_gathers(LY.Remap(good, None, None, 100, 50, cost_sequence=100.0,
                                           cost_layout=c), "auto", "cuda", box=test).remap
               is None for c in (88.0, 95.0, 200.0))          # some are not kept
    # each way of the backward where its price is the lower
    r = LY.Remap(good, None, None, 100, 50, cost_sequence=100.0, cost_layout=50.0)
    for rows_factor, gather_token, want in ((0.0, 1.0, "kernel"), (10.0, 0.0, "copy")):
        monkeypatch.setitem(LY_COSTS["cuda"], "rows_factor", rows_factor)
        monkeypatch.setitem(LY_COSTS["cuda"], "gather_token", gather_token)
        assert LY.resolve_gathers(r, "box", "cuda", box=test) == (r, "box", want)
        assert LY.resolve_gathers(r, "auto", "cuda", box=test)[1:] == ("box", want)
    rb = LY.Remap(bad, None, None, 100, 50, cost_sequence=100.0, cost_layout=50.0)
    assert LY.resolve_gathers(rb, "box", "cuda", box=test) == \
        LY.resolve_gathers(rb, "auto", "cuda")


def test_explain(monkeypatch):
    """explain() prices and names the box forward: ``box`` asked (no gather term: the
    layout's kernel alone), and ``auto`` on the GPU for a layout whose boxes TMA can read;
    whether ``auto`` uses the layout is what a plan's own (unforced) resolution decides,
    including layouts that pay through row tables only; extra tokens keep the rule of
    ``auto``."""
    pat = spattn.neighborhood((64, 64), 13)
    copy = LY.choose(pat.ir, 4096, 4096, 0, force=True, target="cuda", gathers=False)
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "box")
    rep = pat.explain(4096)
    assert rep.layout["gather"] == "box" and "through TMA" in str(rep)
    assert rep.layout["cost_layout"] == pytest.approx(copy.cost_layout)
    # auto: no boxes without ir.layout.AUTO_BOX ...
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "auto")
    big = spattn.neighborhood((128, 128), 13)
    monkeypatch.setattr(LY, "AUTO_BOX", False)
    assert big.explain(16384).layout["gather"] in ("copy", "kernel")
    # ... with it (the default): "used" as a plan decides, unforced
    monkeypatch.setattr(LY, "AUTO_BOX", True)
    rows_only = 0
    for shape, kernel in (((64, 64), 13), ((128, 128), 13), ((128, 128), 11),
                          ((128, 128), 9), ((96, 96), 11), ((64, 64), 17)):
        p = spattn.neighborhood(shape, kernel)
        N = shape[0] * shape[1]
        r = LY.choose(p.ir, N, N, 0, force=True, target="cuda", gathers=False)
        plan = LY.resolve_gathers(r, "auto", "cuda", box=lambda layout: True)
        lay = p.explain(N).layout
        assert lay["used"] == (plan.remap is not None), (shape, kernel)
        assert (lay["gather"], lay["gather_backward"]) == ("box", plan.backward)
        copies = dataclasses.replace(r, cost_layout=r.cost_layout + r.layout.padded_size
                                     * LY_COSTS["cuda"]["gather_token"])
        rows_only += plan.remap is not None and not copies.pays
    assert rows_only, "no case where only the row tables pay"
    lay = big.explain(16384).layout
    words = {"copy": "on gathered copies", "kernel": "through row tables"}
    assert words[lay["gather_backward"]] in str(big.explain(16384))
    assert pat.explain(4096, target="cpu").layout["gather"] == "copy"
    text = spattn.neighborhood((64, 64), 13, extra_before=7)
    monkeypatch.setenv("SPATTN_LAYOUT_GATHER", "box")
    assert text.explain(4103).layout["gather"] in ("copy", "kernel")


#: The generated ``_box_at`` a probe kernel calls (set by the test that launches it).
_BOX_AT = None


@triton.jit
def _probe(OUT, x1, BLOCK: tl.constexpr, NT1: tl.constexpr, NT2: tl.constexpr,
           BOX0: tl.constexpr, BOX1: tl.constexpr, BOX2: tl.constexpr, S0: tl.constexpr,
           S1: tl.constexpr, S2: tl.constexpr, FOLD: tl.constexpr):
    """Per program i, ``_box_at``'s four offsets of the tile of slots from i * BLOCK."""
    i = tl.program_id(0)
    x0, y, c1, c2 = _BOX_AT(7, x1, i * BLOCK, NT1, NT2, BOX0, BOX1, BOX2, S0, S1, S2, FOLD)
    tl.store(OUT + 4 * i, x0)
    tl.store(OUT + 4 * i + 1, y)
    tl.store(OUT + 4 * i + 2, c1)
    tl.store(OUT + 4 * i + 3, c2)


def _box_at_fn():
    """The generated ``_box_at`` of a box kernel's module (the code the kernels run)."""
    import importlib.util
    from spattn.runtime import cache
    pat = spattn.compile("pattern win = causal & window(8)")
    path = cache.kernel_file(pat, "fwd", head_dim=16, dtype="fp32", strategy="table",
                             rows="box", tma=True)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._box_at


@pytest.mark.interpreter
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=3),
       st.lists(st.integers(0, 3), min_size=3, max_size=3), st.integers(0, 4))
def test_box_at_is_the_layout_order(shape, logs, cut):
    """For every tile of a tile size dividing the box, the generated ``_box_at`` gives the
    origin of the sub-box whose cells, row-major (the kernels' reshape), are the tile's
    slots in order, as ``Layout.coords`` defines them (the IR the remapped pattern reads):
    random 1-3 axis grids, power-of-two boxes, padded or not, batch and heads folded for
    3-D grids."""
    from spattn.ir.evaluate import evaluate
    from spattn.ir.nodes import Var
    global _BOX_AT
    _BOX_AT = _box_at_fn()
    box = tuple(1 << x for x in logs[:len(shape)])
    layout = LY.Layout(LY.Grid(tuple(shape)), box)
    T, pad = layout.tokens, (1,) * (3 - len(shape))
    block = T >> min(cut, T.bit_length() - 1)
    rows = BoxRows(pad + tuple(shape), pad + box, len(shape) == 3)
    sub, meta = rows.sub(block), rows.meta(block, block)
    n = layout.padded_size // block
    out = torch.zeros(4 * n, dtype=torch.int32)
    _probe[(n,)](out, 5, BLOCK=block, NT1=meta["NT1"], NT2=meta["NT2"], BOX0=rows.box[0],
                 BOX1=rows.box[1], BOX2=rows.box[2], S0=sub[0], S1=sub[1], S2=sub[2],
                 FOLD=rows.fold)
    got = out.view(n, 4).long()
    assert (got[:, 0] == 7).all() and (rows.fold or (got[:, 1] == 5).all())
    slots = torch.arange(layout.padded_size)
    want = [torch.as_tensor(evaluate(c, {"x": slots})).expand_as(slots)
            for c in layout.coords(Var("x"))]
    want = torch.stack([torch.zeros_like(slots)] * (3 - len(shape)) + want, 1)
    j = torch.arange(block)
    inner = torch.stack([j // (sub[1] * sub[2]), (j // sub[2]) % sub[1], j % sub[2]], 1)
    for i in range(n):
        origin = torch.stack([got[i, 1] if rows.fold else torch.tensor(0), got[i, 2],
                              got[i, 3]])
        assert torch.equal(origin + inner, want[i * block:(i + 1) * block]), (i, origin)
