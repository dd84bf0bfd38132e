"""Compile the warp-specialised dQ kernel (``runtime/ws_dq.py``) for Hopper (sm_90a) on this
machine, no GPU: one line per configuration, ``LABEL OK {facts}`` (the ``setmaxnreg``
counts, the ``wgmma.wait_group`` arguments, the 5-D TMA loads and stores), or ``LABEL
FAILED error``. Run without ``TRITON_INTERPRET`` (tests/helpers/uninterpreted.py)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gluon_fwd import compile_sm90  # noqa: E402
from spattn.runtime import ws_dq, ws_fwd  # noqa: E402

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
        n_t = -(-N // ws_fwd.TILE)
        count = torch.full((n_t,), n_t, dtype=torch.int32)
        midx = torch.full((n_t * n_t,), -1, dtype=torch.int32)
        masks = torch.zeros(n_t, 128, 128, dtype=torch.uint8)
        if "masked" in label or "runs" in label:       # the diagonal tiles PARTIAL
            midx[::n_t + 1] = torch.arange(n_t, dtype=torch.int32)
        if "runs" in label:                             # (each row's run of keys)
            masks = ws_fwd.tile_runs(masks)
        lists = ws_fwd.KeyLists(torch.arange(n_t, dtype=torch.int32) * n_t, count,
                                torch.arange(n_t, dtype=torch.int32).repeat(n_t), midx,
                                masks, (0, 0), n_t, n_partial=int((midx >= 0).sum()))
        call = SimpleNamespace(Lq=N, Lk=N, scale=D ** -0.5,
                               positions=SimpleNamespace(q_offset=0))
        score = "scored" in label and ws_fwd.ScoreVectors(
            torch.zeros(B, H), torch.zeros(1, H, n_t * 128), torch.zeros(1, H, N), 1.0,
            keys="runs" not in label)
        try:
            ws = ws_dq.WsDq(call, q, k, v, lists, score or None)
            rows = torch.empty(B, H, N)
            args = ws.args(q, k, v, o, rows, do, torch.empty_like(q), rows, rows)
            ptx = compile_sm90(ws.kernel, args, ws.meta).asm["ptx"]
        except Exception as e:  # noqa: BLE001 -- reported
            print(f"{label} FAILED {type(e).__name__}: {' '.join(str(e).split())[-400:]}")
            continue
        facts = dict(
            masked=ws.meta["MASKED"],
            scored=ws.meta["SCORED"],
            setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                             ptx))),
            waits=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
            loads5d=len(re.findall(r"cp\.async\.bulk\.tensor\.5d\.shared::cluster\.global", ptx)),
            stores5d=len(re.findall(r"cp\.async\.bulk\.tensor\.5d\.global\.shared", ptx)))
        print(f"{label} OK {facts}")


if __name__ == "__main__":
    main()
