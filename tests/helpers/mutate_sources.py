"""Random token-level mutations of valid pattern sources (grids with extra tokens, scores,
neighbourhoods, params, macros): every compile either succeeds or raises a SpattnError,
and a compiled pattern's canonical source compiles back to an equal pattern.

    python -m tests.helpers.mutate_sources --n 3000 --seed 1
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import traceback
import warnings

if __name__ == "__main__":     # run as the tool, not imported by a test
    os.environ.setdefault("TRITON_INTERPRET", "1")

import spattn  # noqa: E402
from spattn.dsl.errors import SpattnError  # noqa: E402

SEEDS = [
    "param BEFORE = 5\nparam ROWS = 6\nparam COLS = 8\nparam AFTER = 7\nparam r = 1\n"
    "grid (row: ROWS, col: COLS) after BEFORE before AFTER\n"
    "def prompt(x) = x < BEFORE\ndef answer(x) = x >= BEFORE + ROWS * COLS\n"
    "def patch(x) = ~prompt(x) & ~answer(x)\n"
    "pattern p = ((prompt(q) | answer(q)) & k <= q) |\n"
    "    (patch(q) & (prompt(k) | patch(k) & abs(row(q) - row(k)) <= r & abs(col(q) - col(k)) <= r))\n",
    "grid (y: 8, x: 8) before 5 x(q) == x(k)",
    "grid (t: 3, y: 4, x: 5) after 2 abs(t(q) - t(k)) <= 1 & y(q) == y(k) | k < 2",
    "neighborhood([4, 6], [3, 3], [1, 2], [1, 1], [false, true])",
    "neighborhood([4, 6], [3, 3], [1, 2], [1, 1], [false, true]) & causal",
    "coord(q, [4, 6], 1) == coord(k, [4, 6], 1) & abs(coord(q, [4, 6], 0) - coord(k, [4, 6], 0)) <= 1",
    "param c = 30.0\npattern capped = causal & window(64) score softcap(c)",
    "param m = [0.5, 0.25]\npattern a = causal score alibi(m[h])",
    "input bias\npattern t5 = full score s + bias[h, t5_bucket(32, 128)]",
    "input rel\npattern r = causal & window(8) score s + rel[h, clamp(q - k, 0, 7)]",
    "causal & (window(16) | sink(4)) score (if q - k > 3 then tanh(s) else s * 0.5)",
    "abs(q // 64 - k // 64) <= 8 & abs(q % 64 - k % 64) <= 8",
    "k < 77 | (q >= 77 & abs((q - 77) // 64 - (k - 77) // 64) <= 2 & abs((q - 77) % 64 - (k - 77) % 64) <= 2)",
    "input doc\ndef same(x) = doc[q] == doc[k]\npattern d = causal & same(doc)",
    "dilated(512, 4) | strided(128)",
    "def twice(s) = s * 2.0\npattern p = causal score twice(s)",
    "full score s + float(log_bucket(abs(q - k), 8, 128, 16)) * 0.1",
    "causal & q - k <= [" + ", ".join(str(i % 9) for i in range(60)) + "][q % 60]",
    "full score s + [" + ", ".join(str(i % 5 / 4) for i in range(60)) + "][k % 60]",
    "k <= min(" + ", ".join(f"q + {i}" for i in range(40)) + ") & k >= q - 7",
]
TOKENS = ["(", ")", "[", "]", ",", ":", "&", "|", "~", "+", "-", "*", "/", "//", "%", "==",
          "<", "<=", ">=", "!=", "q", "k", "h", "b", "s", "Lq", "Lk", "H", "0", "1", "-1",
          "2**63", "9223372036854775807", "1e308", "0.0", "1e-400", "grid", "after",
          "before", "score", "param", "input", "def", "pattern", "if", "then", "else",
          "\n", " ", "neighborhood", "coord", "t5_bucket", "softcap", "alibi", "float",
          "abs", "min", "max", "clamp", "log_bucket", "window", "causal", "true", "false",
          "row", "col", "x", "y", "[]", "()", "#", "'", "\"", "\\", "1.5", "99999999999"]


def mutate(r: random.Random, src: str) -> str:
    toks = re.findall(r"\*\*|//|<=|>=|==|!=|\w+\.?\w*|\S|\s+", src)
    for _ in range(r.randint(1, 4)):
        op = r.randrange(5)
        i = r.randrange(len(toks) + 1)
        if op == 0 and toks:
            del toks[min(i, len(toks) - 1)]
        elif op == 1:
            toks.insert(i, r.choice(TOKENS))
        elif op == 2 and toks:
            toks[min(i, len(toks) - 1)] = r.choice(TOKENS)
        elif op == 3 and toks:
            j = r.randrange(len(toks))
            toks[min(i, len(toks) - 1)], toks[j] = toks[j], toks[min(i, len(toks) - 1)]
        else:
            num = [j for j, t in enumerate(toks) if t.isdigit()]
            if num:
                toks[r.choice(num)] = str(r.choice([0, 1, -1, 2, 3, 7, 2 ** 31, 2 ** 62,
                                                    2 ** 63, 2 ** 64, 10 ** 30]))
    return "".join(toks)


def one(seed: int) -> str:
    r = random.Random(seed)
    src = mutate(r, r.choice(SEEDS))
    score = None
    if r.random() < 0.15 and "score" not in src:
        score = mutate(r, r.choice(["softcap(30.0)", "s + w[h]", "alibi(alibi_slope)",
                                    "s * 0.5 + float(q - k)"]))
    try:
        p = spattn.compile(src, score=score, m=[0.5, 0.25]) if "m[" in src and "param m" not in src \
            else spattn.compile(src, score=score)
    except SpattnError:
        return "refused"
    back = spattn.compile(p.source)
    assert back == p, f"source {p.source!r} compiles to another pattern"
    return _run(r, p)


def _run(r: random.Random, p) -> str:
    """Call a compiled pattern on tiny tensors (torch backend, or the Triton kernels under
    the interpreter) against the reference."""
    import torch
    from spattn.runtime.reference import pattern_reference
    L = r.randint(1, 24)
    if p.grid is not None:
        cells = 1
        for x in p.grid:
            cells *= x
        L = p.grid_offset + cells + p.grid_suffix
        if L > 300:
            return "ok (grid too long to call)"
    Lq = L if (p.grid is not None or r.random() < 0.5) else r.randint(1, 24)
    g = torch.Generator().manual_seed(r.randrange(2 ** 31))
    q = torch.randn(1, 2, Lq, 16, generator=g)
    k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(2))
    ins = {}
    for name, nd in p.inputs.items():
        ins[name] = torch.randint(0, 3, (L,) if nd == 1 else (L,) * nd, generator=g)
    for name, nd in (p.score_inputs or {}).items():
        ins[name] = torch.randn((2,) + (40,) * (nd - 1) if nd > 1 else (40,), generator=g)
    q_offset = r.choice([None, 0, 3, -2])
    backend = r.choice(["torch", "triton"])
    p = spattn.compile(p.source, backend=backend)
    try:
        o = p(q, k, v, q_offset=q_offset, **ins)
    except SpattnError:
        return "ok (refused at the call)"
    ro, _ = pattern_reference(p, q.double(), k.double(), v.double(), q_offset=q_offset,
                              **{n: t.double() if t.is_floating_point() else t
                                 for n, t in ins.items()})
    if ro.isnan().any():
        return "ok (NaN reference)"
    assert not o.isnan().any(), "NaN output"
    torch.testing.assert_close(o.double(), ro, atol=2e-4, rtol=2e-3)
    return "ran"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.case is not None:
        r = random.Random(args.case)
        print(repr(mutate(r, r.choice(SEEDS))))
        print(one(args.case))
        return
    fails, counts = 0, {}

    def slow(*_):
        raise TimeoutError("over 20 s")
    signal.signal(signal.SIGALRM, slow)
    for i in range(args.n):
        seed = args.seed * 10 ** 6 + i
        try:
            signal.alarm(20)
            try:
                res = one(seed)
            finally:
                signal.alarm(0)
            counts[res] = counts.get(res, 0) + 1
        except Exception as e:  # noqa: BLE001
            fails += 1
            r = random.Random(seed)
            print(f"FAIL {seed}: {type(e).__name__}: {str(e)[:300]}\n   {mutate(r, r.choice(SEEDS))!r}")
            if not isinstance(e, AssertionError):
                traceback.print_exc(limit=-3)
    print(counts, f"{fails} failures")


if __name__ == "__main__":
    main()
