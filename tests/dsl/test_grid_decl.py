"""The ``grid`` declaration: named axes are coordinate functions (the same IR as
``coord``), the grid is the pattern's (``Pattern.grid``) and a call of another length is a
SpattnInputError naming q and k; the builtin ``neighborhood(...)`` carries its shape the
same way; bad declarations are located errors; the canonical form is the mask's."""
import math

import pytest
import torch

import spattn
from spattn.runtime.reference import attention_reference, pattern_reference
from tests.runtime.test_torch_backend import _close

PROGRAM = """param r = 1
param COLS = 6
grid (y: 4, x: COLS)
pattern square = abs(y(q) - y(k)) <= r & abs(x(q) - x(k)) <= r
pattern axial = y(q) == y(k) | x(q) == x(k)
"""


def test_axes_are_coordinate_functions():
    sq = spattn.compile(PROGRAM, pattern="square")
    assert sq.grid == (4, 6)
    assert sq == spattn.compile("abs(q // 6 - k // 6) <= 1 & abs(q % 6 - k % 6) <= 1")
    assert sq == spattn.compile("abs(coord(q, [4, 6], 0) - coord(k, [4, 6], 0)) <= 1 & "
                                "abs(coord(q, [4, 6], 1) - coord(k, [4, 6], 1)) <= 1")
    assert spattn.compile(PROGRAM, pattern="axial", COLS=5).grid == (4, 5)


def test_three_axes_and_a_bare_expression_with_params():
    pat = spattn.compile("grid (t: T, y: 3, x: 2 * X) t(k) <= t(q) & abs(x(q) - x(k)) <= 1",
                         T=2, X=2)
    assert pat.grid == (2, 3, 4)
    assert pat == spattn.compile("k // 12 <= q // 12 & abs(q % 4 - k % 4) <= 1")
    assert spattn.compile("grid (3, 5) q >= k").grid == (3, 5)


def test_canonical_form_is_the_mask():
    pat = spattn.compile(PROGRAM, pattern="square")
    again = spattn.compile(pat.source)
    assert again == pat and hash(again) == hash(pat) and again.key == pat.key
    assert again.grid is None and "grid=(4, 6)" in repr(pat)


@pytest.mark.parametrize("L", [20, 30], ids=["L20", "L30"])
def test_call_of_another_length_names_q_and_k(L):
    pat = spattn.compile(PROGRAM, pattern="square", backend="torch")
    q = torch.randn(1, 1, L, 16)
    with pytest.raises(spattn.SpattnInputError, match=r"grid \(4, 6\) of 24 tokens.*q \(shape "
                       rf"\(1, 1, {L}, 16\)\) and k"):
        pat(q, q, q)
    with pytest.raises(spattn.SpattnInputError, match="grid"):
        pat.mask(L, L)


def test_call_on_the_grid_matches_the_reference():
    pat = spattn.compile(PROGRAM, pattern="axial", backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 16, generator=g, requires_grad=True) for _ in range(3))
    o = pat(q, k, v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, _ = attention_reference(q64, k64, v64, pat.mask(24, 24))
    _close("o", o, ro)
    do = torch.randn(o.shape, generator=g)
    (o * do).sum().backward()
    (ro * do.double()).sum().backward()
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        _close(name, a.grad, b.grad)


def test_the_builtin_neighborhood_carries_its_grid():
    pat = spattn.compile("neighborhood([4, 4], 3) & k <= q", backend="torch")
    assert pat.grid == (4, 4)
    assert pat == spattn.compile(f"({spattn.neighborhood((4, 4), 3).source}) & k <= q")
    q = torch.randn(1, 1, 20, 16)
    with pytest.raises(spattn.SpattnInputError, match=r"grid \(4, 4\) of 16 tokens"):
        pat(q, q, q)
    # two neighbourhoods of one cell count: the pattern's grid is that many tokens
    both = spattn.compile("neighborhood([4, 4], 3) | neighborhood([16], 5)")
    assert both.grid == (16,)
    assert spattn.compile("grid (2, 8) neighborhood([4, 4], 3)").grid == (2, 8)


def test_a_param_may_still_be_named_grid():
    pat = spattn.compile("param grid = [3, 4]\npattern p = neighborhood(grid, 3)")
    assert pat.grid == (3, 4)


@pytest.mark.parametrize("src,cls,where,words", [
    ("grid (y: 0) q >= k", spattn.SpattnValueError, (1, 7), "positive int, got 0"),
    ("grid (y: q) q >= k", spattn.SpattnTypeError, (1, 10), "must be a constant"),
    ("grid (q: 3) q >= k", spattn.SpattnNameError, (1, 7), "hide the variable"),
    ("grid (abs: 3) q >= k", spattn.SpattnNameError, (1, 7), "hide the builtin"),
    ("grid (a: 2, a: 3) q >= k", spattn.SpattnNameError, (1, 13), "two axes named 'a'"),
    ("grid (1, 2, 3, 4, 5) q >= k", spattn.SpattnValueError, (1, 1), "1 to 4 axes"),
    ("grid (4, 4) neighborhood([3, 3], 3)", spattn.SpattnValueError, (1, 13),
     "program's grid has 16"),
    ("neighborhood([4, 4], 3) | neighborhood([3, 3], 3)", spattn.SpattnValueError, (1, 27),
     "line 1, column 1 has 16"),
    ("grid (y: 4) y(q, k) == 1", spattn.SpattnTypeError, (1, 13), "y takes 1 argument"),
    ("grid (y: 4, x: Z) q >= k", spattn.SpattnNameError, (1, 16), "unknown name 'Z'"),
    ("param y = 2\ngrid (y: 4)\npattern p = q >= k", spattn.SpattnNameError, (2, 7),
     "already defined at line 1"),
    ("grid (4)\ngrid (5)\npattern p = q >= k", spattn.SpattnNameError, (2, 1),
     "second grid"),
    ("grid (y: 4 q >= k", spattn.SpattnSyntaxError, (1, 12), "expected"),
    ("grid () q >= k", spattn.SpattnSyntaxError, (1, 7), "expected"),
], ids=["zero", "not-constant", "variable", "builtin", "twice", "five-axes",
        "neighborhood-vs-grid", "two-neighborhoods", "arity", "unknown-size", "clash",
        "second-grid", "unclosed", "empty"])
def test_bad_declarations_are_located(src, cls, where, words):
    with pytest.raises(cls, match=words) as e:
        spattn.compile(src)
    assert (e.value.line, e.value.column) == where
    assert "^" in str(e.value)


def test_example_file_checks_and_runs_on_its_grid():
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "examples" / "patterns" / "image_grid.spattn"
    for name in spattn.pattern_names(path):
        pat = spattn.load(path, pattern=name, backend="torch")
        assert pat.grid == (16, 16)
        assert math.prod(pat.grid) == 256


TEXT_IMAGE = """param T = 5
grid (row: 6, col: 8) after T
pattern p = k < T | (q >= T & k >= T & abs(row(q) - row(k)) <= 1 & abs(col(q) - col(k)) <= 1)
"""


def test_extra_tokens_before_the_grid():
    pat = spattn.compile(TEXT_IMAGE, backend="torch")
    assert (pat.grid, pat.grid_offset) == ((6, 8), 5) and "after 5" in repr(pat)
    assert pat == spattn.compile("k < 5 | (q >= 5 & k >= 5 & abs((q - 5) // 8 - (k - 5) // 8) "
                                 "<= 1 & abs((q - 5) % 8 - (k - 5) % 8) <= 1)")
    q = torch.randn(1, 1, 48, 16)
    with pytest.raises(spattn.SpattnInputError, match=r"\(6, 8\) after 5 extra tokens, 53 "
                       r"tokens in all.*q \(shape \(1, 1, 48, 16\)\)"):
        pat(q, q, q)
    assert spattn.compile("grid (4) after 0 q >= k").grid_offset == 0


def test_extra_tokens_run_in_an_offset_layout(monkeypatch):
    from spattn.runtime.plan import RemappedPlan
    from tests.runtime.test_layouts import _run
    monkeypatch.setenv("SPATTN_LAYOUT", "on")
    plan = _run(spattn.compile(TEXT_IMAGE, backend="torch"), N=53, grads=False)
    assert isinstance(plan, RemappedPlan) and plan.remap.layout.grid.offset == 5


@pytest.mark.parametrize("src,cls,where,words", [
    ("grid (8) after q q >= k", spattn.SpattnTypeError, (1, 16), "must be a constant"),
    ("grid (8) after (0 - 2) q >= k", spattn.SpattnValueError, (1, 16), "int >= 0, got -2"),
    ("grid (8, 8) after 5 neighborhood([8, 8], 3)", spattn.SpattnValueError, (1, 21),
     "under a grid with 5 extra tokens \\(69 tokens\\): the builtin's positions are "
     "the cells alone"),
], ids=["not-constant", "negative", "neighborhood-without-the-text"])
def test_bad_extra_tokens_are_located(src, cls, where, words):
    with pytest.raises(cls, match=words) as e:
        spattn.compile(src)
    assert (e.value.line, e.value.column) == where


@pytest.mark.parametrize("after,offset", [("max(2, 3)", 3), ("2 * T + 1", 5),
                                          ("clamp(T - 9, 0, 4)", 0), ("[1, 4][1]", 4)],
                         ids=["call", "arithmetic", "clamp", "list-index"])
def test_a_programs_after_takes_any_constant_int_expression(after, offset):
    """In a program the next statement starts with a keyword, so ``after`` takes any
    constant int expression of params."""
    pat = spattn.compile(f"param T = 2\ngrid (r: 4, c: 4) after {after}\n"
                         "pattern p = k < 1 | r(q) == r(k)")
    assert (pat.grid, pat.grid_offset) == ((4, 4), offset)


@pytest.mark.parametrize("src,where", [
    ("grid (r: 4, c: 4) after max(2, 3) r(q) == r(k)", (1, 30)),
    ("grid (r: 4, c: 4) after 2 + 1 r(q) == r(k)", (1, 27)),
], ids=["call", "sum"])
def test_a_bare_patterns_after_takes_an_atom_and_says_so(src, where):
    """A bare pattern's mask follows ``after T`` directly, so T is a number, a param or a
    parenthesised expression; anything else is a located syntax error that says how to
    write it, and the parenthesised form compiles."""
    with pytest.raises(spattn.SpattnSyntaxError, match=r"parenthesised expression: "
                       r"after \(max\(A, B\)\)") as e:
        spattn.compile(src)
    assert (e.value.line, e.value.column) == where and "^" in str(e.value)
    fixed = src.replace("after max(2, 3)", "after (max(2, 3))").replace("after 2 + 1",
                                                                        "after (2 + 1)")
    assert spattn.compile(fixed).grid_offset == 3
    with pytest.raises(spattn.SpattnSyntaxError) as e:
        spattn.compile("causal & q - k < 3 +")
    assert "after" not in e.value.message


BIG = 2 ** 32


@pytest.mark.parametrize("src,cls,where,words", [
    (f"grid (r: {10 ** 23}) q >= k", spattn.SpattnValueError, (1, 7),
     f"grid \\({10 ** 23},\\): {10 ** 23} tokens"),
    (f"grid (r: {BIG}, c: {BIG // 2}) q >= k", spattn.SpattnValueError, (1, 7 + len(str(BIG)) + 5),
     f"{2 ** 63} tokens"),
    (f"param N = {BIG}\ngrid (r: N, c: N, x: 1)\npattern p = r(q) == r(k)",
     spattn.SpattnValueError, (2, 13), "grid's first 2 axes"),
    ("grid (r: 8) after 9223372036854775800 q >= k", spattn.SpattnValueError, (1, 19),
     "after 9223372036854775800: 9223372036854775808 tokens"),
    (f"causal & neighborhood([{BIG}, {BIG}], 3)", spattn.SpattnParamError, (1, 10),
     f"{2 ** 64} cells"),
], ids=["one-axis", "product", "partial-product", "after", "neighborhood"])
def test_grids_past_64_bit_positions_are_refused_where_written(src, cls, where, words):
    """A grid of more than 2**63 - 1 tokens could never be called (lengths and positions
    are int64): refused at compile time, at the axis (or ``after T``, or the builtin) that
    takes the count past the cap."""
    with pytest.raises(cls, match=words) as e:
        spattn.compile(src)
    assert (e.value.line, e.value.column) == where and "2**63 - 1" in e.value.message
    with pytest.raises(spattn.SpattnParamError, match="more than a call can have"):
        spattn.neighborhood((BIG, BIG), 3)


def test_grids_up_to_the_cap_compile():
    pat = spattn.compile(f"grid (r: {BIG}, c: {BIG // 2 - 1}) after {BIG // 2} q >= k")
    assert pat.grid == (BIG, BIG // 2 - 1) and pat.grid_offset == BIG // 2
    assert BIG * (BIG // 2 - 1) + BIG // 2 <= 2 ** 63 - 1


def test_compiled_calls_tell_a_grid_from_none():
    """Under ``torch.compile`` the custom op finds each pattern by a key that carries its
    grid: a mask declared on a grid and the same mask without one are two patterns (the one
    without runs at any length, the one with is refused at another)."""
    torch._dynamo.reset()
    with_grid = spattn.compile("grid (4, 6) q >= k", backend="torch")
    plain = spattn.compile("q >= k", backend="torch")

    def compiled(p):
        return torch.compile(lambda q, k, v: p(q, k, v), fullgraph=True)
    from spattn.runtime import autograd
    assert autograd.register(with_grid) == "grid (4, 6) q >= k"
    assert autograd.register(plain) == "q >= k"
    short = torch.randn(1, 1, 20, 16)
    torch.testing.assert_close(compiled(plain)(short, short, short), plain(short, short, short))
    with pytest.raises(spattn.SpattnInputError, match="grid"):
        compiled(with_grid)(short, short, short)


@pytest.mark.parametrize("src,grid,offset,same_as", [
    ("param position = 3\ngrid (r: 4, c: 4) after position\npattern p = r(q) == r(k)",
     (4, 4), 3, "(q - 3) // 4 == (k - 3) // 4"),
    ("param position = 6\ngrid (r: 4, c: position)\npattern p = c(q) == c(k)",
     (4, 6), 0, "q % 6 == k % 6"),
    ("def position(x) = x + 1\ngrid (r: 4, c: position(3)) after 2\npattern p = c(q) == c(k)",
     (4, 4), 2, "(q - 2) % 4 == (k - 2) % 4"),
], ids=["after-param", "size-param", "size-def"])
def test_a_name_used_by_the_sizes_is_not_captured_by_the_axis_functions(src, grid, offset,
                                                                         same_as):
    """An axis function's parameter is named apart from every name its sizes and ``after T``
    use: a param called like it still means the param (it once made the pattern ``true``)."""
    pat = spattn.compile(src)
    assert (pat.grid, pat.grid_offset) == (grid, offset)
    assert pat == spattn.compile(same_as)


def test_receptive_field_of_a_grid_pattern_at_its_length():
    """``receptive_field(L, ...)`` checks ``L`` against the grid (it checked a length of 1,
    so every grid pattern was refused); another length is the grid's SpattnInputError."""
    pat = spattn.compile("grid (r: 4, c: 4) after 3 abs(r(q) - r(k)) <= 1 & k <= q | k < 3")
    rf = pat.receptive_field(19, 2)
    assert rf is not None
    with pytest.raises(spattn.SpattnInputError, match="Lk=16"):
        pat.receptive_field(16, 2)
    with pytest.raises(spattn.SpattnValueError, match="L must be a positive integer"):
        pat.receptive_field(0, 2)


@pytest.mark.parametrize("src,words", [
    ("grid[q] == grid[k]", "parenthesise: (grid[q] == grid[k])"),
    ("param x = 1\ngrid x\npattern p = causal", "declares the grid: grid (y: 8, x: 8) ...)"),
], ids=["bare", "program"])
def test_a_leading_name_grid_says_it_is_the_declaration(src, words):
    """``grid`` where a statement or a bare pattern starts is the declaration: the syntax
    error says so (and, in a bare expression, how to use a name ``grid`` there)."""
    with pytest.raises(spattn.SpattnSyntaxError) as e:
        spattn.compile(src)
    assert words in str(e.value)


@pytest.mark.parametrize("src,where,words", [
    ("grid (4, 4) neighborhood([4, 4], 3, 1, 1, false, 1)", (1, 13),
     "neighborhood takes 2 to 5 arguments, got 6"),
    ("coord(q, [4, 4], 0.5) == coord(k, [4, 4], 0)", (1, 18),
     "the axis of coord must be an int .*got the float 0.5"),
    ("neighborhood([4, 4], 3, [1, 1.5])", (1, 29),
     "stride of neighborhood must be an int .*got the float 1.5"),
], ids=["too-many-arguments", "float-axis", "float-in-a-list"])
def test_grid_builtin_arguments_say_what_is_wrong(src, where, words):
    """The argument count says the range a builtin takes (it said "at least 2" for six),
    and a float where an int constant belongs is named as a float (it was called "an
    expression of q, k, h or inputs")."""
    with pytest.raises(spattn.SpattnTypeError, match=words) as e:
        spattn.compile(src)
    assert (e.value.line, e.value.column) == where


def test_a_plan_of_an_equal_pattern_keeps_the_grid_length_check():
    """A grid is not part of a pattern's identity, so a pattern without one may lend its plan
    to an equal pattern on a grid; the call is still refused at a length the grid does not
    have (it ran), and runs at the grid's length."""
    on_grid = spattn.compile("grid (y: 8, x: 8) abs(y(q) - y(k)) <= 1", backend="torch")
    plain = spattn.compile("abs(q // 8 - k // 8) <= 1", backend="torch")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 72, 16, generator=g)
    with pytest.raises(spattn.SpattnInputError, match="grid \\(8, 8\\) of 64 tokens"):
        on_grid(x, x, x, plan=plain.plan(x, x, x))
    x = x[:, :, :64]
    o = on_grid(x, x, x, plan=plain.plan(x, x, x))
    ro, _ = pattern_reference(on_grid, x.double(), x.double(), x.double())
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)
