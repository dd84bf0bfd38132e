"""Canonicalising constructors: equal patterns are equal trees, constants fold, errors are named."""
import pytest

from spattn import SpattnError
from spattn.ir import build as B
from spattn.ir.nodes import And, Range
from spattn.ir.printer import to_source

q, k, h = B.var("q"), B.var("k"), B.var("h")
c = B.const


def test_commutative_and_merges_ranges():
    causal = B.cmp("<=", k, q)
    win = B.and_(B.cmp("<=", c(0), B.sub(q, k)), B.cmp("<", B.sub(q, k), c(8)))
    assert B.and_(causal, win) == B.and_(win, causal) == win
    assert isinstance(win, Range) and (win.lo, win.hi) == (0, 7)
    assert to_source(win) == "0 <= q - k <= 7"


def test_affine_terms_collect():
    assert B.sub(B.add(q, k, c(3)), B.add(k, c(1))) == B.add(q, c(2))
    assert B.mul(B.add(q, c(1)), B.add(k, c(1))) == B.add(B.mul(q, k), q, k, c(1))


def test_products_expand_like_sympy():
    """Products of sums expand into sorted monomials with like terms collected, as sympy's
    ``expand`` does, so every way of writing one polynomial builds one tree."""
    import sympy
    kq = B.floordiv(k, c(3))
    factors = [B.add(q, c(1)), B.sub(k, q), B.add(kq, B.scale(h, 2), c(-5)), B.mul(q, kq)]
    got = factors[0]
    for f in factors[1:]:
        got = B.mul(got, f)
    sq, sk, sh, skq = sympy.symbols("q k h kq")
    want = sympy.expand((sq + 1) * (sk - sq) * (skq + 2 * sh - 5) * (sq * skq)).as_coefficients_dict()
    sym = {sq: q, sk: k, sh: h, skq: kq}
    terms = []
    for mono, coeff in want.items():
        atom = None
        for base, e in mono.as_powers_dict().items():
            for _ in range(int(e)):
                atom = sym[base] if atom is None else B.mul(atom, sym[base])
        terms.append(B.scale(atom, int(coeff)))
    assert got == B.add(*terms)
    assert B.mul(factors[1], factors[0]) == B.mul(factors[0], factors[1])
    assert B.mul(B.sub(q, k), B.sub(k, q)) == B.add(B.scale(B.mul(q, q), -1), B.scale(B.mul(q, k), 2),
                                                     B.scale(B.mul(k, k), -1))


def test_comparison_normal_form():
    # 2q - 2k < 7  <=>  q - k <= 3
    r = B.cmp("<", B.scale(B.sub(q, k), 2), c(7))
    assert r == B.cmp("<=", B.sub(q, k), c(3))
    # k - q >= -3  <=>  q - k <= 3
    assert B.cmp(">=", B.sub(k, q), c(-3)) == r


def test_constant_folding_and_complements():
    assert B.cmp("<", c(1), c(2)) == B.TRUE
    assert B.and_(B.cmp("<", q, c(3)), B.cmp(">", q, c(5))) == B.FALSE
    assert B.or_(B.cmp("<", q, c(3)), B.cmp(">=", q, c(3))) == B.TRUE
    a = B.cmp("==", B.mod(q, c(4)), c(1))
    assert B.and_(a, B.not_(a)) == B.FALSE
    assert B.not_(B.not_(a)) == a
    assert B.cmp(">=", B.mod(q, c(4)), c(0)) == B.TRUE
    assert B.floordiv(c(-7), c(2)) == c(-4) and B.mod(c(-7), c(2)) == c(1)


def test_sorted_operands_hash_equal():
    x = B.cmp("<", k, c(4))
    y = B.cmp("<", q, c(4))
    z = B.cmp("==", B.mod(B.sub(q, k), c(3)), c(0))
    assert B.or_(x, y, z) == B.or_(z, B.or_(y, x))
    assert hash(B.and_(x, z)) == hash(B.and_(z, x))
    assert isinstance(B.and_(x, z), And)


@pytest.mark.parametrize("fn,match", [
    (lambda: B.floordiv(q, c(0)), "by zero"),
    (lambda: B.mod(q, c(0)), "by zero"),
    (lambda: B.mod(q, k), "must not depend on q, k"),
    (lambda: B.add(q, B.TRUE), "must be an int"),
    (lambda: B.and_(q, B.TRUE), "must be a bool"),
    (lambda: B.table([1, 2], c(5), "spans"), "out of range for spans"),
], ids=["div0", "mod0", "mod-by-k", "int-plus-bool", "and-of-int", "table-range"])
def test_errors_are_named(fn, match):
    with pytest.raises(SpattnError, match=match):
        fn()


def test_select_bool_desugars_and_uniform_divisor_allowed():
    s = B.select(B.cmp("<", q, c(8)), B.cmp("<=", k, q), B.cmp("<", B.sub(q, k), c(3)))
    assert s.type == "bool" and "if" not in to_source(s)
    assert B.mod(k, B.var("H")).type == "int"


@pytest.mark.parametrize("src", ["-((-q) // -3)", "-(q * k) + 1", "-(q % 3) // 2",
                                 "-(if q < 1 then q else k)", "-abs(q) - k"],
                         ids=["neg-floordiv", "neg-prod", "neg-mod-div", "neg-if", "neg-call"])
def test_negated_first_term_round_trips(src):
    """A lone negated atom is printed at unary-minus precedence (found by hypothesis)."""
    from spattn.ir.lower import parse_ir
    ir = parse_ir(src)
    assert parse_ir(to_source(ir)) == ir
