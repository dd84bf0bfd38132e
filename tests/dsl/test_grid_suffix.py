"""``grid (...) after T before U``: extra tokens after the grid (an image then text; text,
an image, then text): parsed, lowered to ``Pattern.grid_suffix``, checked at calls, shown,
and carried through every copy of a pattern; bad counts are located errors."""
import pytest
import torch

import spattn
from spattn.ir.pattern import CompiledPattern
from spattn.nn import SparseAttention
from spattn.runtime import autograd

AROUND = """param T = 5
param U = 4
grid (row: 6, col: 8) after T before U
pattern p = k < T | (q >= T + 48 & k <= q)
    | (q >= T & k >= T & k < T + 48 & abs(row(q) - row(k)) <= 1 & abs(col(q) - col(k)) <= 1)
"""


def test_extra_tokens_after_the_grid():
    pat = spattn.compile(AROUND, backend="torch")
    assert (pat.grid, pat.grid_offset, pat.grid_suffix) == ((6, 8), 5, 4)
    assert "grid=(6, 8) after 5 before 4" in repr(pat)
    # the declaration is not the mask's: the same expression without it is equal
    assert pat == spattn.compile(
        "k < 5 | (q >= 53 & k <= q) | (q >= 5 & k >= 5 & k < 53 & abs((q - 5) // 8 - (k - 5) "
        "// 8) <= 1 & abs((q - 5) % 8 - (k - 5) % 8) <= 1)")
    image_then_text = spattn.compile("grid (y: 4, x: 4) before 3 y(q) == y(k) | q >= 16")
    assert (image_then_text.grid_offset, image_then_text.grid_suffix) == (0, 3)
    assert image_then_text == spattn.compile("q // 4 == k // 4 | q >= 16")
    assert spattn.compile("grid (4) before 0 q >= k").grid_suffix == 0
    either = spattn.compile("grid (4) before 2 after 3 q >= k")
    assert (either.grid_offset, either.grid_suffix) == (3, 2)
    assert spattn.compile("q >= k").grid_suffix == 0


@pytest.mark.parametrize("L", [53, 48, 58], ids=["L53-no-suffix", "L48-cells-only", "L58"])
def test_other_lengths_name_q_and_k(L):
    pat = spattn.compile(AROUND, backend="torch")
    q = torch.randn(1, 2, L, 16)
    k = torch.randn(1, 1, L, 16)
    want = (r"\(6, 8\) after 5 and before 4 extra tokens, 57 tokens in all.*"
            rf"q \(shape \(1, 2, {L}, 16\)\) and k \(shape \(1, 1, {L}, 16\)\)")
    with pytest.raises(spattn.SpattnInputError, match=want):
        pat(q, k, k)
    with pytest.raises(spattn.SpattnInputError, match=want):
        pat.plan(q, k, k)
    with pytest.raises(spattn.SpattnInputError, match=f"Lk={L}"):
        pat.mask(L, L)
    with pytest.raises(spattn.SpattnInputError, match="before 4"):
        pat.explain(L)
    assert pat.mask(57, 57).shape[-1] == 57


@pytest.mark.parametrize("src,cls,where,words", [
    ("grid (8) before q q >= k", spattn.SpattnTypeError, (1, 17), "must be a constant"),
    ("grid (8) after 2 before (0 - 2) q >= k", spattn.SpattnValueError, (1, 25),
     "after a grid \\(before U\\) must be an int >= 0, got -2"),
    ("grid (8, 8) before 5 neighborhood([8, 8], 3)", spattn.SpattnValueError, (1, 22),
     "under a grid with 5 extra tokens \\(69 tokens\\): the builtin's positions are "
     "the cells alone"),
    ("grid (8) before 2 before 3 q >= k", spattn.SpattnSyntaxError, (1, 19),
     "'before' count is given twice"),
], ids=["not-constant", "negative", "neighborhood-without-the-text", "twice"])
def test_bad_counts_after_the_grid_are_located(src, cls, where, words):
    with pytest.raises(cls, match=words) as e:
        spattn.compile(src)
    assert (e.value.line, e.value.column) == where


@pytest.mark.parametrize("ends,where,words", [
    ("after 9223372036854775790 before 2", (1, 46),
     "grid \\(4, 4\\) after 9223372036854775790 before 2: 9223372036854775808 tokens"),
    ("before 2 after 9223372036854775790", (1, 20),
     "grid \\(4, 4\\) after 9223372036854775790 before 2: 9223372036854775808 tokens"),
    ("before 9223372036854775792", (1, 20),
     "grid \\(4, 4\\) before 9223372036854775792: 9223372036854775808 tokens"),
], ids=["after-then-before", "before-then-after", "before-only"])
def test_the_token_cap_names_both_counts(ends, where, words):
    """Past 2**63 - 1 tokens, the message shows the grid as written, with both counts."""
    with pytest.raises(spattn.SpattnValueError, match=words) as e:
        spattn.compile(f"grid (4, 4) {ends} q >= k")
    assert (e.value.line, e.value.column) == where
    assert spattn.compile("grid (4, 4) after 9223372036854775790 before 1 q >= k").grid_suffix == 1


@pytest.mark.parametrize("src,hint", [
    ("grid (4, 4) before 2 * 3 q >= k", True),
    ("grid (4, 4) after 1 before max(2, 3) q >= k", True),
    ("grid (4, 4) after 3 q - k < 2 3", False),
    ("grid (4, 4) after 3 before 1 causal & & q >= k", False),
], ids=["before-sum", "before-call", "mask-after-after", "mask-after-before"])
def test_the_bare_count_hint_is_given_at_a_count_only(src, hint):
    """A bare pattern's ``before U`` takes an atom like ``after T`` and says so; a syntax
    error further on in the mask is not about the counts."""
    with pytest.raises(spattn.SpattnSyntaxError) as e:
        spattn.compile(src)
    assert ("parenthesised expression" in e.value.message) == hint


def test_the_bare_count_hint_is_linear_in_the_source():
    """The hint's look at the source is one pass: a run of words that could each be split
    into keywords and counts (``afterafter...``) does not make the error slow."""
    import time
    src = "grid (1) " + "after" * 36 + " + 3 3"
    start = time.perf_counter()
    with pytest.raises(spattn.SpattnSyntaxError, match="unexpected integer 3"):
        spattn.compile(src)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("src,word", [
    ("param T = 1\ngrid (4, 4) after T before\npattern p = causal", "pattern"),
    ("grid (4, 4) after\ndef f = causal\npattern p = f", "def"),
    ("pattern a = causal &\npattern b = causal", "pattern"),
], ids=["before-missing", "after-missing", "mask-unfinished"])
def test_a_statement_keyword_read_as_a_name_says_so(src, word):
    """A count (or an expression) left out before the next statement makes its keyword a
    name there: the error at the token after it says what happened."""
    with pytest.raises(spattn.SpattnSyntaxError,
                       match=f"'{word}' starts a statement, but here it was read as a name"):
        spattn.compile(src)


def test_before_is_still_a_name():
    """``before`` is a keyword only after a grid's ``)``: a param may be named so."""
    pat = spattn.compile("param before = 3\npattern p = q - k < before")
    assert pat == spattn.compile("q - k < 3")
    pat = spattn.compile("param before = 3\ngrid (r: 4, c: 4) after 1 before before\n"
                         "pattern p = r(q) == r(k)")
    assert (pat.grid_offset, pat.grid_suffix) == (1, 3)


def test_the_grid_survives_every_copy_of_a_pattern():
    """The custom op's key, the functional form and the module keep the extra tokens
    after the grid: each refuses another length."""
    pat = spattn.compile(AROUND, backend="torch")
    key = autograd.register(pat)
    assert key.startswith("grid (6, 8) after 5 before 4 ")
    again = CompiledPattern.from_source(key)
    assert (again.grid, again.grid_offset, again.grid_suffix) == ((6, 8), 5, 4)
    q = torch.randn(1, 1, 53, 16)
    with pytest.raises(spattn.SpattnInputError, match="before 4"):
        spattn.attention(q, q, q, pattern=pat, backend="torch")
    with pytest.raises(spattn.SpattnInputError, match="before 4"):
        SparseAttention(pat, backend="torch")(q, q, q)


def test_check_shows_the_extra_tokens(capsys):
    from spattn.cli import main
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "around.spattn")
        with open(path, "w") as f:
            f.write(AROUND)
        main(["check", path])
    out = capsys.readouterr().out
    assert "grid: 6 x 8 after 5 tokens before 4 tokens (57 tokens" in out
