"""IR nodes compute their structural hash once; pickling, copying and other processes see
the same structure (docs/decisions.md, "Cached structural hashes")."""
import copy
import dataclasses
import os
import pickle
import subprocess
import sys

import pytest

import spattn
from spattn.ir import build as B
from spattn.ir import nodes as N

q, k = B.var("q"), B.var("k")

SOURCES = {
    "streaming": "causal & (window(1024) | sink(4))",
    "grid2d": "abs(q // 64 - k // 64) <= 3 & abs(q % 64 - k % 64) <= 3",
    "lists": "q - k < [64, 128, 256, 512][h] & k % 7 != 3",
    "score": "causal",
}
SCORE = {"score": "s - 0.25 * float(q - k) + tanh(s)"}


def _count_hashes(monkeypatch, cls) -> list:
    calls = []
    fields_hash = cls._fields_hash

    def counted(self):
        calls.append(self)
        return fields_hash(self)
    monkeypatch.setattr(cls, "_fields_hash", counted)
    return calls


def test_hash_is_computed_once_per_node(monkeypatch):
    """Building a node hashes its fields once; hashing it again, and dict and set lookups
    keyed by it or by its parents, read the cached value (the children are not walked)."""
    sums = _count_hashes(monkeypatch, N.Sum)
    ranges = _count_hashes(monkeypatch, N.Range)
    x = N.Sum(((q, 3), (k, -2)), 5)        # fresh nodes (as ir.build makes them)
    r = N.Range(x, 0, 7)
    assert (len(sums), len(ranges)) == (1, 1) and sums[0] is x
    memo = {x: 1, r: 2}
    for _ in range(5):
        assert hash(x) == hash(N.Sum(((q, 3), (k, -2)), 5))
        assert memo[r] == 2 and memo[x] == 1 and r in {r}
    assert len(ranges) == 1
    assert len(sums) == 6           # one per Sum built above, none per hash or lookup
    parent = N.Or((r, N.Range(k, None, 3)))
    before = len(sums), len(ranges)
    hash(parent)
    {parent: 0}[parent]
    assert (len(sums), len(ranges)) == (before[0], before[1])


def test_hash_slot_is_not_a_field():
    """The cached hash and repr are outside the dataclass fields, the repr and the pickled
    state; the kept repr is the dataclass's."""
    x = B.add(q, B.const(1))
    assert [f.name for f in dataclasses.fields(x)] == ["terms", "const"]
    assert repr(x) == "Sum(terms=((Var(name='q'), 1),), const=1)" == repr(x)
    assert repr(N.Range(x, None, 4)) == f"Range(x={x!r}, lo=None, hi=4)"
    assert x.__getstate__() == (x.terms, x.const)
    for cls in N.NODE_TYPES:
        assert not {"_hash", "_repr"} & {f.name for f in dataclasses.fields(cls)}, cls
        assert cls.__hash__ is N.Node.__hash__, cls


def test_repr_is_kept_once_asked(monkeypatch):
    """A node's repr (the canonical order's key) is built once, from its children's kept
    reprs; a parent's repr does not rebuild theirs."""
    x = N.Sum(((q, 3), (k, -2)), 5)
    r = N.Range(x, 0, 7)
    built = []
    real = N.Sum.__repr__

    def counted(self):
        if not hasattr(self, "_repr"):
            built.append(self)
        return real(self)
    monkeypatch.setattr(N.Sum, "__repr__", counted)
    assert N.sort_key(r) == (1, "Range", repr(r)) and N.sort_key(r) == N.sort_key(r)
    assert built == [x]
    assert N.sort_key(N.Range(x, 0, 8)) > N.sort_key(r) and built == [x]


def test_equality_is_structural_and_typed():
    a, b = B.add(q, B.const(1)), B.add(q, B.const(1))
    assert a is not b and a == b and hash(a) == hash(b)
    assert a != B.add(q, B.const(2))
    assert N.Min((q, k)) != N.Max((q, k)) and N.Not(q) != N.Abs(q)
    assert N.Const(3) != 3 and (N.Const(3) == 3) is False
    assert dataclasses.replace(N.Const(3), value=4) == N.Const(4)
    assert hash(dataclasses.replace(N.Const(3), value=4)) == hash(N.Const(4))


@pytest.mark.parametrize("name", list(SOURCES))
def test_pickle_and_copy_preserve_equality_and_hash(name):
    p = spattn.compile(SOURCES[name], **({"score": SCORE[name]} if name in SCORE else {}))
    assert (p.score is not None) == (name in SCORE)
    for ir in (p.ir, p.score) if p.score is not None else (p.ir,):
        pickled = [pickle.loads(pickle.dumps(ir, protocol=v))
                   for v in range(pickle.HIGHEST_PROTOCOL + 1)]
        for back in pickled + [copy.copy(ir), copy.deepcopy(ir)]:
            assert back == ir and hash(back) == hash(ir)
            assert {ir: 1}[back] == 1
            assert all(hash(n) == hash(m) for n, m in zip(N.walk(back), N.walk(ir)))
            assert repr(back) == repr(ir)
    again = pickle.loads(pickle.dumps(p))
    assert again == p and hash(again) == hash(p)


CHILD = r"""
import pickle, sys
import spattn
from spattn.ir import nodes as N
data = pickle.loads(bytes.fromhex(sys.stdin.read()))
for src, ir in data:
    fresh = spattn.compile(src).ir
    assert ir == fresh and hash(ir) == hash(fresh), src
    assert {fresh: 1}[ir] == 1 and ir in {n for n in N.walk(fresh)}
    assert all(hash(a) == hash(b) for a, b in zip(N.walk(ir), N.walk(fresh)))
print("ok", len(data))
"""


def test_unpickled_in_another_process_hashes_as_built_there():
    """A node pickled here and loaded by a process with another string-hash seed equals, and
    hashes as, the same pattern compiled there: the pickle carries no hash (Var names hash
    differently per process)."""
    data = [(s, spattn.compile(s).ir) for s in SOURCES.values()]
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", CHILD], input=pickle.dumps(data).hex(),
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(f"ok {len(data)}")


def test_a_node_type_keeps_nodes_post_init():
    """A node class with its own ``__post_init__`` would skip the hash: refused at
    definition."""
    with pytest.raises(TypeError, match="must not define __post_init__"):
        @N.node
        class Bad(N.Node):
            a: int

            def __post_init__(self):
                pass
