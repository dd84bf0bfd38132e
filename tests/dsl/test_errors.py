"""Errors: every failure is a located SpattnError subclass with a caret; nothing else escapes."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spattn.dsl.errors import (SpattnError, SpattnNameError, SpattnParamError,
                               SpattnSyntaxError, SpattnTypeError, SpattnValueError)
from spattn.dsl.parser import parse_source
from spattn.ir.lower import compile_source, parse_ir
from tests.helpers.sources import bool_exprs, programs

# (source, keyword params, pattern pick, error class, (line, column), text in message)
LOCATED = [
    ("causal &", {}, None, SpattnSyntaxError, (1, 9), "expected an expression"),
    ("q / k < 1", {}, None, SpattnSyntaxError, (1, 3), "//"),
    ("q = k", {}, None, SpattnSyntaxError, (1, 3), "=="),
    ("(q < k", {}, None, SpattnSyntaxError, (1, 7), "expected ')'"),
    ("if q < k then true", {}, None, SpattnSyntaxError, (1, 19), "expected 'else'"),
    ("pattern p = q < k k", {}, None, SpattnSyntaxError, (1, 19), "unexpected name 'k'"),
    ("param W = x\npattern p = true", {}, None, SpattnSyntaxError, (1, 11), "an integer"),
    ("q ≤ k", {}, None, SpattnSyntaxError, (1, 3), "unexpected character"),
    ("", {}, None, SpattnSyntaxError, (1, 1), "empty"),
    ("windw(8)", {}, None, SpattnNameError, (1, 1), "did you mean 'window'?"),
    ("causal & casual", {}, None, SpattnNameError, (1, 10), "did you mean 'causal'?"),
    ("causal & k < W", {}, None, SpattnNameError, (1, 14), "W="),
    ("pattern p = doc[q] == 1", {}, None, SpattnNameError, (1, 13), "input doc"),
    ("param W = 1\nparam W = 2\npattern p = true", {}, None, SpattnNameError, (2, 7),
     "already defined"),
    ("def q = 1\npattern p = true", {}, None, SpattnNameError, (1, 5), "built-in variable"),
    ("def abs(x) = x\npattern p = true", {}, None, SpattnNameError, (1, 5), "builtin"),
    ("def f = g\ndef g = f\npattern p = f", {}, None, SpattnNameError, (2, 9), "f -> g -> f"),
    ("def f(x) = f(x) & x\npattern p = true", {}, None, SpattnNameError, (1, 12),
     "recursive"),
    ("q - k", {}, None, SpattnTypeError, (1, 1), "a pattern must be a bool, got an int"),
    ("pattern p = q - k", {}, None, SpattnTypeError, (1, 13), "must be a bool"),
    ("window(1, 2)", {}, None, SpattnTypeError, (1, 1), "takes 1 argument"),
    ("window", {}, None, SpattnTypeError, (1, 1), "takes 1 argument"),
    ("min(q) < k", {}, None, SpattnTypeError, (1, 1), "at least 2"),
    ("causal + 1 < k", {}, None, SpattnTypeError, (1, 1), "must be an int"),
    ("causal & ~(q - k)", {}, None, SpattnTypeError, (1, 11), "must be a bool"),
    ("q // k < 2", {}, None, SpattnTypeError, (1, 6), "must not depend on q"),
    ("if causal then q else true", {}, None, SpattnTypeError, (1, 1), "same type"),
    ("doc[q] == doc[q, k]", {}, None, SpattnTypeError, (1, 11), "indexed with 2"),
    ("spans < q", {"spans": [1, 2]}, None, SpattnTypeError, (1, 1), "must be indexed"),
    ("k < W[h]", {"W": 3}, None, SpattnTypeError, (1, 5), "cannot be indexed"),
    ("q[0] < 1", {}, None, SpattnTypeError, (1, 1), "cannot be indexed"),
    ("q // 0 < k", {}, None, SpattnValueError, (1, 6), "by zero"),
    ("k % (3 - 3) < 1", {}, None, SpattnValueError, (1, 5), "by zero"),
    ("chunked(0)", {}, None, SpattnValueError, (1, 9), "by zero"),
    ("chunked(c)", {"c": 0}, None, SpattnValueError, (1, 9), "by zero"),
    ("[1, 2][2] < k", {}, None, SpattnValueError, (1, 8), "out of range"),
    ("param W = 3", {}, None, SpattnValueError, (1, 1), "no pattern"),
    ("param W\npattern p = window(W)", {}, None, SpattnParamError, (1, 7), "no default"),
    (f"q < {2 ** 256 + 1}", {}, None, SpattnValueError, (1, 5), "at most 2**256"),
    ("q - k < 1" + "0" * 90, {}, None, SpattnValueError, (1, 9),
     "integer literal 1000000000...0000000000 (91 digits) is too large"),
    ("param W = -9" + "9" * 90 + "\npattern p = k < W", {}, None, SpattnValueError,
     (1, 12), "too large"),
    ("pattern p = window(W)\nparam W = 000000000000000000" + "9" * 80, {},
     None, SpattnValueError, (2, 11), "too large"),
]


@pytest.mark.parametrize("src,kw,pick,cls,pos,text", LOCATED, ids=[c[0] or "<empty>"
                                                                    for c in LOCATED])
def test_located_error(src, kw, pick, cls, pos, text):
    with pytest.raises(cls) as info:
        compile_source(src, kw, pattern=pick)
    err = info.value
    assert (err.line, err.column) == pos, str(err)
    assert text in err.message, str(err)
    rendered = str(err).splitlines()
    assert rendered[0].startswith(f"line {pos[0]}, column {pos[1]}: ")
    if not src.strip():
        return  # no source line to show
    # the source line, then a caret under the column
    assert rendered[1] == "    " + src.splitlines()[pos[0] - 1]
    assert rendered[2].strip() == "^"
    assert rendered[2].index("^") - 4 == pos[1] - 1


def test_literals_up_to_2_to_the_62_are_accepted():
    assert compile_source("q - k < 4611686018427387904").ir is not None
    assert compile_source("k < -4_611_686_018_427_387_904 + q").ir is not None
    assert compile_source("window(W)", {"W": -2 ** 62}).params == {"W": -2 ** 62}


def test_literal_of_thousands_of_digits_is_located_and_abbreviated():
    """Python refuses to convert strings of over 4300 digits to int: the parser checks the
    length first, and neither the message nor the source line it shows prints them all."""
    src = "causal & (q < " + "9" * 5000 + ")"
    with pytest.raises(SpattnValueError) as info:
        compile_source(src)
    err = info.value
    assert (err.line, err.column) == (1, 15)
    assert "9999999999...9999999999 (5000 digits)" in err.message
    head, line, caret = str(err).splitlines()
    assert len(line) <= 4 + 3 + 120 + 3 and line.endswith("...")
    col = caret.index("^")
    assert line[col - 2:col + 1] == "< 9"


@pytest.mark.parametrize("value", [2 ** 256 + 1, -2 ** 300, 10 ** 5000, [1, 2 ** 257]],
                         ids=["2**256+1", "-2**300", "5000-digits", "in-a-list"])
def test_param_beyond_2_to_the_256(value):
    with pytest.raises(SpattnParamError, match=r"param 'W' is .*at most 2\*\*256") as info:
        compile_source("k < W[h] & causal" if isinstance(value, list) else "window(W)",
                       {"W": value})
    assert len(str(info.value)) < 300


def test_long_source_line_is_shown_around_the_caret():
    src = "causal & " * 40 + "windw(8)"
    with pytest.raises(SpattnNameError) as info:
        compile_source(src)
    _, line, caret = str(info.value).splitlines()
    assert line.startswith("    ...") and "windw(8)" in line and len(line) <= 4 + 3 + 120 + 3
    col = caret.index("^")
    assert line[col:col + 5] == "windw"


def test_filename_in_message():
    with pytest.raises(SpattnSyntaxError) as info:
        compile_source("pattern p = (", filename="x.spattn")
    assert str(info.value).startswith("x.spattn:line 1, column 14:")


PARAM_ERRORS = [
    ("window(W)", {"W": 3, "X": 4}, None, "unknown keyword param 'X'"),
    ("param W = 3\npattern p = window(W)", {"V": 3}, None, "unknown param 'V'"),
    ("param Wide = 3\npattern p = window(Wide)", {"wide": 3}, None, "did you mean 'Wide'"),
    ("window(W)", {"W": True}, None, "got a bool"),
    ("window(W)", {"W": 1.5}, None, "float"),
    ("window(W)", {"W": "8"}, None, "str"),
    ("spans[h] < q", {"spans": []}, None, "empty"),
    ("param W = 3\npattern p = window(W)", {"W": [1, 2]}, None, "declared as an int"),
    ("q < W", {"q": 3}, None, "built-in variable"),
    ("pattern a = true\npattern c = false", {}, None, "'a', 'c'"),
    ("pattern a = true", {}, "b", "no pattern named 'b'"),
    ("causal", {}, "b", "single expression"),
]


@pytest.mark.parametrize("src,kw,pick,text", PARAM_ERRORS, ids=[f"{c[0]}-{sorted(c[1])}-{c[2]}"
                                                               for c in PARAM_ERRORS])
def test_param_errors(src, kw, pick, text):
    with pytest.raises(SpattnParamError) as info:
        compile_source(src, kw, pattern=pick)
    assert text in str(info.value)


def test_syntax_messages_use_readable_token_names():
    for bad in ["causal &", "q // / k", "(q < k", "window(3,", "a[q", "param", "def f(1) = q",
                "q k", ")", "pattern p = if q then k"]:
        with pytest.raises(SpattnSyntaxError) as info:
            parse_source(bad)
        msg = info.value.message
        assert "expected" in msg
        for internal in ("RPAR", "LPAR", "__ANON", "$END", "NAME", "INT", "VBAR", "LSQB"):
            assert internal not in msg, msg


def test_deep_nesting_is_an_error_not_a_crash():
    src = "(" * 3000 + "q < k" + ")" * 3000
    try:
        compile_source(src)
    except SpattnError:
        pass


def test_expansion_blowup_is_an_error():
    src = "def a0 = q < k\n" + "".join(f"def a{i} = a{i-1} & a{i-1}\n" for i in range(1, 40)) \
        + "pattern p = a39"
    with pytest.raises(SpattnValueError):
        compile_source(src)


def test_non_string_source():
    with pytest.raises(SpattnError):
        compile_source(42)


# ---------------------------------------------- random and mutated programs

_ALPHABET = "qkhWdoc0123456789 ()[],+-*/%<>=!&|~#\n_abcdefinoprstuvw"
_SNIPPETS = ["if", "then", "else", "param", "input", "def", "pattern", "true", "false", "and",
             "or", "not", "//", "<=", "==", "!=", "same(", "window(", "doc[", "spans[", "-",
             "0", "[", "]", "4611686018427387904", "99999999999999999999", "9" * 4400]


@st.composite
def mutated(draw, base):
    text = draw(base)
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            text = draw(st.text(_ALPHABET, max_size=5))
            continue
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "snippet", "delete-span"]))
        ch = draw(st.sampled_from(_ALPHABET))
        if op == "insert":
            text = text[:i] + ch + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        elif op == "replace":
            text = text[:i] + ch + text[i + 1:]
        elif op == "snippet":
            text = text[:i] + draw(st.sampled_from(_SNIPPETS)) + text[i:]
        else:
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
    return text


def _only_spattn_errors(src, **kw):
    try:
        compile_source(src, **kw)
    except SpattnError as e:
        assert e.line is None or (e.line >= 1 and e.column >= 1), str(e)
        str(e)


_FAST = settings(deadline=None, max_examples=150,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_FAST
@given(mutated(programs()))
def test_mutated_programs_raise_only_spattn_errors(src):
    for pick in ("main", "other", None):
        _only_spattn_errors(src, pattern=pick)


@_FAST
@given(mutated(bool_exprs()))
def test_mutated_expressions_raise_only_spattn_errors(src):
    _only_spattn_errors(src)
    try:
        parse_ir(src)
    except SpattnError:
        pass


@settings(deadline=None, max_examples=100)
@given(st.text(_ALPHABET, max_size=40))
def test_random_text_raises_only_spattn_errors(src):
    _only_spattn_errors(src)


@settings(deadline=None, max_examples=30)
@given(programs())
def test_generated_programs_compile(src):
    for pick in ("main", "other"):
        assert compile_source(src, pattern=pick).ir.type == "bool"


@pytest.mark.parametrize("name", ["scale", "q_offset", "plan", "layout", "return_lse",
                                  "pattern", "backend", "deterministic"])
def test_input_named_like_a_call_keyword_is_refused(name):
    """Such an input could never be passed: the call takes the keyword itself."""
    with pytest.raises(SpattnNameError, match=rf"input named '{name}' could not be "
                       rf"passed.*rename the input") as e:
        compile_source(f"input {name}\npattern p = {name}[k] != 0", {})
    assert e.value.line == 1 and e.value.column == 7


@pytest.mark.parametrize("src,col", [("order[q] == order[k]", 1), ("causal & same(order)", 15),
                                     ("plan[q] >= 0", 1)], ids=["order", "same-order", "plan"])
def test_a_bare_input_named_like_a_call_keyword_is_refused(src, col):
    """A bare expression's input named ``order`` (or another call keyword) could never be
    passed (``order=`` is the token order): refused where it is written, as a program's
    ``input order`` is."""
    with pytest.raises(SpattnNameError, match="keyword of every call") as e:
        compile_source(src, {})
    assert f"line 1, column {col}:" in str(e.value)


# (program, error class, (line, column) of the call in the pattern, the macro and its body)
IN_MACRO = [
    ("def cap(c) = softcap(c)\npattern p = causal score cap(0.0)", SpattnValueError, (2, 26),
     "inside macro 'cap' at line 1, column 14"),
    ("def g(a) = t5_bucket(a, 128)\npattern p = full score s + bias[h, g(2)]",
     SpattnValueError, (2, 36), "inside macro 'g' at line 1, column 12"),
    ("def nb(n) = neighborhood([4, 4], n)\npattern p = nb(9)", SpattnValueError, (2, 13),
     "inside macro 'nb' at line 1, column 13"),
    ("def nb(n) = neighborhood([4, 4], n)\ndef outer(m) = causal & nb(m)\n"
     "pattern p =   outer(9)", SpattnValueError, (3, 15),
     "inside macro 'nb' at line 1, column 13, called by 'outer' at line 2, column 25"),
    ("def d(x) = s / x\npattern p = causal score d(0.0)", SpattnValueError, (2, 26),
     "inside macro 'd' at line 1, column 14"),
    ("def z = 10 // 0\npattern p = q - k < z", SpattnValueError, (2, 21),
     "inside macro 'z' at line 1, column 15"),
]


@pytest.mark.parametrize("src,cls,where,words", IN_MACRO,
                         ids=["prelude-domain", "t5-domain", "builtin", "nested", "float-div",
                              "constant"])
def test_a_domain_error_in_a_macro_is_located_at_its_call(src, cls, where, words):
    """A value out of an operation's domain reached through a user macro is reported at the
    macro's call in the pattern (whose arguments reach the body), with a caret there, and
    the message names the macro and the place in its body."""
    with pytest.raises(cls) as e:
        compile_source(src, {})
    assert (e.value.line, e.value.column) == where, str(e.value)
    assert words in e.value.message and "^" in str(e.value)
    caret_line = str(e.value).splitlines()[1]
    assert caret_line.strip().startswith("pattern p")


def test_a_type_error_in_a_macro_body_stays_in_the_body():
    """An error about how a macro's body is written (not about its arguments) is located in
    the body, whatever the call."""
    with pytest.raises(SpattnTypeError) as e:
        compile_source("def bad(x) = s > x\npattern p = causal & bad(3)", {})
    assert (e.value.line, e.value.column) == (1, 14) and "inside macro" not in e.value.message
