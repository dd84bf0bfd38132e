"""The emitted code of a score computes the score: random scores (tests/helpers/ir_exprs.py)
emitted for each kernel (forward, dQ, and dK/dV's transposed tile), their lines run with
``tl`` standing for torch in float64, against the IR's own evaluation: the value (in the
units the kernel chose) and ``d score / d s``. This checks the emitter's grouping of float
operands by tile axes, the folded scale and the split differences, and the terms of the query
alone that the kernels move to the row's lse and the constant factor their softmax applies
(both added back here), exactly, without the interpreter."""
import math
from types import SimpleNamespace

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spattn.codegen.kernels import _score_code
from spattn.ir.lower import parse_score_ir
from spattn.ir.nodes import Score
from spattn.ir.printer import to_source
from spattn.ir.score import LOG2E, derivative, score_env, score_values

from tests.helpers.ir_exprs import score_exprs


def _tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(x, dtype=torch.bool if isinstance(x, bool) else torch.float64)


# Triton's language as the emitted lines use it, on float64 torch tensors
tl = SimpleNamespace(
    float32=torch.float64, int64=torch.int64, PropagateNan=SimpleNamespace(ALL=None),
    cast=lambda x, dt: _tensor(x).to(dt), exp=torch.exp, log=torch.log, sqrt=torch.sqrt,
    abs=lambda x: torch.abs(_tensor(x)), sigmoid=torch.sigmoid,
    where=lambda c, a, b: torch.where(_tensor(c), _tensor(a), _tensor(b)),
    minimum=lambda a, b, propagate_nan=None: torch.minimum(_tensor(a), _tensor(b)),
    maximum=lambda a, b, propagate_nan=None: torch.maximum(_tensor(a), _tensor(b)),
    min=lambda x: _tensor(x).min(), max=lambda x: _tensor(x).max(),
    zeros_like=torch.zeros_like)


def _run(sc, names: dict):
    # the floor-division helpers (codegen.emit.HELPERS) as Python's floor semantics
    ns = dict(names, tl=tl, _floordiv=lambda a, b: a // b, _mod=lambda a, b: a % b)
    for line in sc.lines:
        name, _, expr = line.partition(" = ")
        ns[name] = eval(expr, ns)
    return ns


@settings(max_examples=40, deadline=None)
@given(score_exprs(), st.integers(-6, 6), st.integers(0, 2**16))
@example(parse_score_ir("s - 0.5 * float(q - k) + [0.5, 0.25, 2.0][h] * float(k - q)"), 3, 0)
@example(parse_score_ir("30.0 * tanh(s / 30.0)"), 0, 1)
@example(parse_score_ir("s * [0.5, 0.25, 2.0][h] * float(q + 1) + 0.5 * abs(s)"), -4, 2)
@example(parse_score_ir("tanh(s) + tanh(s * 0.5) / 3.0"), 1, 3)
@example(parse_score_ir("s * exp(0.1 * float(q)) * exp(0.2 * float(k)) - float(2 * q - 3 * k)"
                        " * 0.5 + exp(0.3 * float(k)) + float(h) / 4.0"), -5, 4)
@example(parse_score_ir("(if q - q // 2 >= 1 then s else 0.5) + 2.0 * s"), 0, 0)  # _floordiv
@example(parse_score_ir("((if Lq != Lk then s else 0.5) + s) / (s * s + 1.0)"), 0, 0)
@example(parse_score_ir("abs((if q - k <= -1 then s else float(h)) / (s * s + 1.0))"), 0, 0)
def test_emitted_lines_compute_the_score(f, off, seed):
    """(NaN where the IR's derivative is NaN too: ``1/h * h`` at h = 0.)"""
    g = torch.Generator().manual_seed(seed)
    H, BM, BN, scale = 3, 4, 5, 0.37
    env = score_env(BM, BN, num_heads=H, batch=1, q_offset=off)
    raw = (torch.rand(1, H, BM, BN, generator=g, dtype=torch.float64) - 0.5) * 8
    s = raw * scale
    want = score_values(f, s, env, {})
    want_d = score_values(derivative(f, Score()), s, env, {})
    pat = SimpleNamespace(score=f, score_inputs={})
    for kind in ("fwd", "dq", "dkdv"):
        sc = _score_code(pat, kind, False)
        t = (lambda x: x.T) if kind == "dkdv" else (lambda x: x)    # dK/dV: keys x queries
        for h in range(H):
            names = {"o_q": t(env["q"][0, 0]), "o_k": t(env["k"][0, 0]),
                     "i_h": torch.tensor(h), "i_b": torch.tensor(0), "H": torch.tensor(H),
                     "Lq": torch.tensor(BM), "Lk": torch.tensor(BN),
                     "sm_scale": scale, sc.raw: t(raw[0, h])}
            names["b_x"] = names[sc.raw] * scale
            ns = _run(sc, names)
            got = eval(sc.value, ns) + torch.zeros_like(names[sc.raw])
            if sc.factor is not None:         # the constant factor the softmax applies
                got = got * float(sc.factor)
            if sc.row_value is not None:      # the terms of the query alone, in log2 units
                rows = _run(SimpleNamespace(lines=sc.row_lines), names)
                got = got + eval(sc.row_value, rows) / (1.0 if sc.log2 else LOG2E)
            exp_v = want[0, h] * (LOG2E if sc.log2 else 1.0)
            got = t(got)
            torch.testing.assert_close(got, exp_v, atol=1e-9, rtol=1e-9, equal_nan=True,
                                       msg=f"{kind}: {to_source(f)}")
            if sc.deriv is not None:
                d = eval(sc.deriv, ns) + torch.zeros_like(names[sc.raw])
                d = t(d)
                torch.testing.assert_close(d, want_d[0, h], atol=1e-9, rtol=1e-9, equal_nan=True,
                                           msg=f"{kind} derivative: {to_source(f)}")
