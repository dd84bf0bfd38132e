"""Grammar: precedence (DESIGN.md §3), chained comparisons, statements, literals."""
import pytest

from spattn.dsl import ast as A
from spattn.dsl.parser import is_program, parse_expression, parse_program, parse_source
from spattn.dsl.prelude import prelude
from spattn.ir.lower import compile_source, parse_ir

# (written, same as) pairs: precedence is checked on the parse tree itself.
PRECEDENCE = [
    ("causal & q - k < W", "causal & (q - k < W)"),
    ("a & b | c", "(a & b) | c"),
    ("a | b & c", "a | (b & c)"),
    ("a and b or c", "(a & b) | c"),
    ("~a & b", "(~a) & b"),
    ("not a | b", "(~a) | b"),
    ("~q < k", "~(q < k)"),
    ("q + k * 2 < 3", "(q + (k * 2)) < 3"),
    ("q - k - 1 < 0", "((q - k) - 1) < 0"),
    ("q // 2 * 3 < k", "((q // 2) * 3) < k"),
    ("-q % 4 == k", "((-q) % 4) == k"),
    ("-doc[q] < 1", "-(doc[q]) < 1"),
    ("- - q < k", "(-(-q)) < k"),
    ("if a then b else c | d", "if a then b else (c | d)"),
    ("if a then b else if c then d else e", "if a then b else (if c then d else e)"),
    ("causal & (q - k < W | k < 4)", "causal & ((q - k < W) | (k < 4))"),
    ("a & b & c", "(a & b) & c"),
    ("x[q, k] < f(q)[1]", "(x[q, k]) < (f(q)[1])"),
]


@pytest.mark.parametrize("text,same", PRECEDENCE, ids=[p[0] for p in PRECEDENCE])
def test_precedence(text, same):
    assert parse_expression(text) == parse_expression(same)


def test_causal_window_means_parenthesised_comparison():
    e = parse_expression("causal & q - k < W")
    assert isinstance(e, A.Binary) and e.op == "&"
    assert isinstance(e.right, A.Compare)


CHAINS = [
    ("0 <= q - k < W", ("<=", "<")),
    ("a < b <= c > d", ("<", "<=", ">")),
    ("q == k != 3", ("==", "!=")),
]


@pytest.mark.parametrize("text,ops", CHAINS, ids=[c[0] for c in CHAINS])
def test_chained_comparison(text, ops):
    e = parse_expression(text)
    assert isinstance(e, A.Compare) and e.ops == ops
    assert len(e.operands) == len(ops) + 1


def test_chained_comparison_means_conjunction():
    assert compile_source("0 <= q - k < 8").ir == compile_source("0 <= q - k & q - k < 8").ir
    assert compile_source("q < k < 8").ir == compile_source("q < k & k < 8").ir


SYNONYMS = [("a and b", "a & b"), ("a or b", "a | b"), ("not a", "~a"),
            ("a and not b or c", "a & ~b | c")]


@pytest.mark.parametrize("word,sym", SYNONYMS, ids=[s[0] for s in SYNONYMS])
def test_word_synonyms(word, sym):
    assert parse_expression(word) == parse_expression(sym)


def test_literals_and_positions():
    e = parse_expression("\n  true | false & 1_024 < q")
    assert e.line == 2 and e.column == 3
    assert e.left == A.Bool(True)
    assert e.right.right.operands[0] == A.Int(1024)


def test_comments_and_multiline_expressions():
    src = "# header\npattern p = causal   # trailing\n   & window(8)  # more\n"
    prog = parse_program(src)
    (stmt,) = prog.statements
    assert stmt.expr == parse_expression("causal & window(8)")


def test_statements():
    src = """
param W = 1024
param N = -3
param spans = [256, 512, 1024, 2048]
param empty_default
input doc
def band(lo, hi) = lo <= q - k & q - k < hi
def zero = true
def nullary() = false
pattern streaming = causal & (q - k < W | k < 4)
"""
    prog = parse_program(src)
    kinds = [type(s).__name__ for s in prog.statements]
    assert kinds == ["ParamDecl", "ParamDecl", "ParamDecl", "ParamDecl", "InputDecl", "Def",
                     "Def", "Def", "PatternDef"]
    w, n, spans, nodef, doc, band, zero, nullary, pat = prog.statements
    assert (w.name, w.default) == ("W", 1024)
    assert n.default == -3
    assert spans.default == (256, 512, 1024, 2048)
    assert nodef.default is None
    assert doc.name == "doc" and doc.line == 6
    assert band.params == ("lo", "hi")
    assert zero.params == () and nullary.params == ()
    assert pat.name == "streaming"


def test_statements_need_no_separator():
    prog = parse_program("param W = 3 input doc pattern p = k < W pattern r = same(doc)")
    assert [s.name for s in prog.statements] == ["W", "doc", "p", "r"]


PROGRAM_OR_NOT = [
    ("causal & window(8)", False),
    ("# param W = 3\ncausal", False),
    ("pattern p = causal", True),
    ("  input doc\npattern p = same(doc)", True),
    ("def f = true pattern p = f", True),
    ("parameter < q", False),
]


@pytest.mark.parametrize("src,prog", PROGRAM_OR_NOT, ids=[p[0] for p in PROGRAM_OR_NOT])
def test_program_detection(src, prog):
    assert is_program(src) is prog
    assert isinstance(parse_source(src), A.Program) is prog


def test_list_literal_indexed_parses_back():
    assert compile_source("q - k < [8, 16][h]").ir == compile_source("q - k < s[h]",
                                                                      {"s": [8, 16]}).ir
    assert parse_ir("[-3, 5][h] <= q") == compile_source("[-3, 5][h] <= q").ir


def test_keywords_are_reserved_but_prefixes_are_names():
    e = parse_expression("orange & notice | iffy")
    assert e == parse_expression("(orange & notice) | iffy")


def test_prelude_names_exactly():
    assert set(prelude()) == {"full", "causal", "window", "local", "sink", "global_tokens",
                              "prefix_lm", "dilated", "strided", "fixed", "chunked", "same",
                              "power2", "alibi", "alibi_slope", "softcap", "t5_bucket",
                              "t5_bucket_causal"}


PRELUDE_MEANINGS = [
    ("full", "true", {}),
    ("causal", "k <= q", {}),
    ("window(7)", "0 <= q - k < 7", {}),
    ("local(3, 2)", "-2 <= q - k <= 3", {}),
    ("sink(4)", "k < 4", {}),
    ("global_tokens(4)", "q < 4 | k < 4", {}),
    ("prefix_lm(4)", "k <= q | k < 4", {}),
    ("dilated(4, 3)", "0 <= q - k < 4*3 & (q - k) % 3 == 0", {}),
    ("strided(5)", "0 <= q - k & (q - k < 5 | (q - k) % 5 == 0)", {}),
    ("fixed(8, 2)", "k <= q & (q // 8 == k // 8 | k % 8 >= 8 - 2)", {}),
    ("chunked(16)", "q // 16 == k // 16", {}),
    ("same(doc)", "doc[q] == doc[k]", {}),
    ("power2(4)", "0 <= q - k & (q - k < 4 | is_pow2(q - k))", {}),
]


@pytest.mark.parametrize("call,body,kw", PRELUDE_MEANINGS, ids=[p[0] for p in PRELUDE_MEANINGS])
def test_prelude_meaning(call, body, kw):
    assert compile_source(call, kw).ir == compile_source(body, kw).ir


def test_builtins():
    assert compile_source("abs(q - k) < 3").ir == compile_source("abs(k - q) <= 2").ir
    assert compile_source("min(q, k, 3) < max(q, 2)").ir is not None
    assert compile_source("clamp(q, 0, 7) == k").ir == \
        compile_source("min(max(q, 0), 7) == k").ir
    assert compile_source("is_pow2(q - k)").ir == compile_source("is_pow2(q - k) & true").ir


def test_program_params_inputs_and_pick():
    src = """
param W = 1024
param spans = [256, 512]
input doc
input blocks
def band(lo, hi) = lo <= q - k & q - k < hi
pattern streaming = causal & (q - k < W | k < 4)
pattern per_doc = causal & same(doc)
pattern heads = band(0, spans[h]) & streaming
pattern blk = blocks[q // 64, k // 64] & per_doc
"""
    s = compile_source(src, pattern="streaming")
    assert s.name == "streaming" and s.params == {"W": 1024, "spans": (256, 512)}
    assert s.inputs == {}
    assert compile_source(src, {"W": 8}, pattern="streaming").ir == \
        compile_source("causal & (q - k < 8 | k < 4)").ir
    assert compile_source(src, pattern="per_doc").inputs == {"doc": 1}
    assert compile_source(src, pattern="blk").inputs == {"blocks": 2, "doc": 1}
    heads = compile_source(src, {"spans": [8, 16]}, pattern="heads")
    assert heads.params["spans"] == (8, 16)
    assert heads.ir == compile_source("0 <= q - k < [8, 16][h] & causal & "
                                      "(q - k < 1024 | k < 4)").ir


def test_param_without_default_bound_at_compile():
    lw = compile_source("param W\npattern p = window(W)", {"W": 16})
    assert lw.ir == compile_source("window(16)").ir and lw.params == {"W": 16}


def test_bare_expression_free_names():
    lw = compile_source("window(W) & same(doc) & blocks[q // 64, k // 64]", {"W": 8})
    assert lw.name == "pattern" and lw.params == {"W": 8}
    assert lw.inputs == {"doc": 1, "blocks": 2}


def test_user_defs_shadow_prelude_hygienically():
    # A user 'causal' does not change what the prelude's own macros mean.
    src = "def causal = k >= q\npattern p = causal & fixed(4, 1)"
    expected = compile_source("k >= q & (k <= q & (q // 4 == k // 4 | k % 4 >= 3))").ir
    assert compile_source(src).ir == expected


def test_macro_arguments_are_not_captured():
    src = "def f(x) = g(q) & x\ndef g(x) = x < k\npattern p = f(k < 3)"
    assert compile_source(src).ir == compile_source("q < k & k < 3").ir


def test_patterns_can_use_patterns():
    src = "pattern a = causal\npattern c = a & sink(2)"
    assert compile_source(src, pattern="c").ir == compile_source("causal & k < 2").ir


def test_input_element_as_bool():
    assert compile_source("blocks[q, k]").ir == compile_source("blocks[q, k] != 0").ir
    assert compile_source("~blocks[q, k]").ir == compile_source("blocks[q, k] == 0").ir
