"""Compile the warp-specialised dQ kernel (``runtime/ws_dq.py``) for Hopper (sm_90a) on this
machine, no GPU: one line per configuration, ``LABEL OK {facts}`` (the ``setmaxnreg``
counts, the ``wgmma.wait_group`` arguments, the 5-D TMA loads and stores), or ``LABEL
FAILED error``. Run without ``TRITON_INTERPRET`` (tests/helpers/uninterpreted.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from spattn.runtime import ws_dq  # noqa: E402
from tests.helpers.compile_ws import call_and_score, diagonal_lists, report  # noqa: E402

CASES = [  # label, B, H, HK, N, D, dtype
    ("B1-H2-L512-D128-bf16", 1, 2, 2, 512, 128, torch.bfloat16),
    ("B2-H4-Hk2-L256-D64-fp16", 2, 4, 2, 256, 64, torch.float16),
    ("masked-B1-H2-L1000-D128-bf16", 1, 2, 2, 1000, 128, torch.bfloat16),
    ("runs-B2-H2-L700-D64-fp16", 2, 2, 1, 700, 64, torch.float16),
    ("B1-H2-L512-D128-bf16-scored", 1, 2, 2, 512, 128, torch.bfloat16),
    ("runs-B2-H2-L700-D128-bf16-scored", 2, 2, 1, 700, 128, torch.bfloat16),
    ("masked-B1-H2-L1000-D64-fp16-scored", 1, 2, 2, 1000, 64, torch.float16),
]


def main() -> None:
    for label, B, H, HK, N, D, dtype in CASES:
        q, o, do = (torch.empty(B, H, N, D, dtype=dtype) for _ in range(3))
        k, v = (torch.empty(B, HK, N, D, dtype=dtype) for _ in range(2))
        call, score = call_and_score(label, B, H, N, D)

        def build():
            ws = ws_dq.WsDq(call, q, k, v, diagonal_lists(N, label), score)
            rows = torch.empty(B, H, N)
            return ws.kernel, ws.args(q, k, v, o, rows, do, torch.empty_like(q), rows,
                                      rows), ws.meta
        report(label, build)


if __name__ == "__main__":
    main()
