"""Regenerate the committed examples of generated kernels (``examples/generated/*.py``).

    python examples/generated/regenerate.py

Writes the forward kernels of three patterns and the backward kernels of the
first, the forward and backward kernels of a pattern with a score (with the score flags a
bf16 call on CUDA gets), exactly as the kernel cache would (GPU defaults: bf16, head dim 128),
into this folder; and the first one's forward once more as the autotuner picks it on
an H200 (64 x 64 tiles, fused loop) with the TMA loads that Hopper gets by default; the
forward and backward of a 2-D neighbourhood in its token layout with rows addressed through
row tables (``SPATTN_LAYOUT_GATHER=kernel``, docs/layouts.md), and its forward through
the layout's boxes (``SPATTN_LAYOUT_GATHER=box``); and the
decode modules (split-K kernel + combine, ``docs/decode.md``) of the first pattern (closed
form) and of documents (scanned).  The "ranges" example uses ``ir.ranges.closed_form`` when the
analysis provides one, else the closed form written out below.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
from types import SimpleNamespace

HERE = pathlib.Path(__file__).resolve().parent
os.environ.pop("TRITON_INTERPRET", None)          # GPU tile defaults, not the interpreter's

import spattn  # noqa: E402
from spattn.ir.ranges import Interval  # noqa: E402
from spattn.codegen.config import get_closed_form, ranges_ok  # noqa: E402
from spattn.ir import build as B  # noqa: E402
from spattn.ir.layout import choose  # noqa: E402
from spattn.runtime import cache, decode  # noqa: E402


def streaming_cf(W: int, S: int):
    """causal & (window(W) | sink(S)): per query tile [qs, qe] the keys
    [qs-W+1, qe] (all allowed in [qe-W+1, qs]) and [0, min(S-1, qe)]; transposed likewise."""
    V, C = B.var, B.const
    qs, qe, ks, ke = V("qs"), V("qe"), V("ks"), V("ke")
    big = C(1 << 30)
    return SimpleNamespace(
        rows=(Interval(B.add(qs, C(1 - W)), qe, B.add(qe, C(1 - W)), qs),
              Interval(C(0), B.min_(C(S - 1), qe), C(0), B.min_(C(S - 1), qs))),
        cols=(Interval(ks, B.add(ke, C(W - 1)), ke, B.add(ks, C(W - 1))),
              Interval(ks, B.select(B.cmp("<=", ks, C(S - 1)), big, B.add(ks, C(-1))),
                       ke, B.select(B.cmp("<=", ke, C(S - 1)), big, B.add(ke, C(-1))))))


STREAMING = spattn.compile("pattern streaming = causal & (q - k < 1024 | k < 4)")
#: a 13 x 13 neighbourhood on a 64 x 64 grid, remapped into the box order the layout choice
#: picks (what a RemappedPlan's inner plan compiles)
_NB = spattn.neighborhood((64, 64), (13, 13))
NB_LAYOUT = type(_NB)(choose(_NB.ir, 4096, 4096, 0, force=True).ir, name="neighborhood_layout")
EXAMPLES = [
    # (pattern, strategy, hand-written closed form, kinds, launch options)
    (STREAMING, "ranges", streaming_cf(1024, 4), ("fwd", "bwd"), {}),
    (spattn.compile("input doc\npattern documents = causal & same(doc)"), "table", None, ("fwd",),
     {}),
    (spattn.compile("pattern per_head_window = causal & q - k < [256, 512, 1024, 2048][h]"),
     "table", None, ("fwd",), {}),
    (STREAMING, "ranges", streaming_cf(1024, 4), ("fwd",),
     dict(block_m=64, block_n=64, num_warps=4, num_stages=3, loop="fused", tma=True)),
    # a score: Gemma-2 soft-capping and a learnable relative bias (docs/language.md §13),
    # with the flags the runtime picks for a bf16 call on CUDA: tanh.approx.f32, and table
    # loads without a bounds check (the pattern clamps the index: proven in range)
    (spattn.compile("input rel\npattern softcap_bias = causal & window(1024) "
                    "score softcap(30.0) + rel[h, clamp(q - k, 0, 1023)]"), "ranges", None,
     ("fwd", "bwd"), dict(score_index="free", fast_tanh=True)),
    # a layout's pattern over slots, its rows read through the row tables Q_ROWS, K_ROWS
    (NB_LAYOUT, "table", None, ("fwd", "bwd"), dict(rows="table")),
    # its forward reading the layout's boxes of the caller's tensors through 5-D TMA
    (NB_LAYOUT, "table", None, ("fwd",), dict(rows="box", tma=True)),
]

#: decode modules (split-K kernel + combine): a closed form, and a scanned pattern
DECODE_EXAMPLES = [STREAMING, spattn.compile("input doc\npattern documents = causal & same(doc)")]


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="spattn-examples-")
    os.environ["SPATTN_CACHE_DIR"] = tmp
    for old in HERE.glob("attn_*.py"):
        old.unlink()
    try:
        for pattern, strategy, cf, kinds, opts in EXAMPLES:
            if strategy == "ranges":
                auto = get_closed_form(pattern)
                cf = auto if auto is not None and ranges_ok(auto) else cf
            for kind in kinds:
                path = cache.kernel_file(pattern, kind, head_dim=128, dtype="bf16",
                                         strategy=strategy, closed_form=cf, **opts)
                shutil.copy(path, HERE / path.name)
                print(f"{kind:3s} {pattern.name:16s} {strategy:6s} -> {path.name}")
        for pattern in DECODE_EXAMPLES:
            name, text = decode.kernel_text(pattern, head_dim=128, dtype="bf16",
                                            device="cuda")
            (HERE / name).write_text(text)
            print(f"dec {pattern.name:16s} {text.split('Strategy: ')[1].split()[0]:6s} -> {name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
