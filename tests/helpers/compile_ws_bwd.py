"""Compile the warp-specialised dK/dV kernel (``runtime/ws_bwd.py``) for Hopper (sm_90a) on
this machine, no GPU: one line per configuration, ``LABEL OK {facts}`` (the
``setmaxnreg`` counts, the ``wgmma.wait_group`` arguments, the 4-D and 1-D TMA loads, the
4-D stores), or ``LABEL FAILED error``. Run without ``TRITON_INTERPRET``
(tests/helpers/uninterpreted.py)."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gluon_fwd import compile_sm90  # noqa: E402
from spattn.runtime import ws_bwd  # noqa: E402

CASES = [  # label, B, H, HK, Lq, Lk, D, dtype, PARTIAL tiles ("runs": keys' runs), a score
    ("B1-H2-L512-D128-bf16", 1, 2, 2, 512, 512, 128, torch.bfloat16, False, False),
    ("B2-H4-Hk2-L1000-D64-fp16-masked", 2, 4, 2, 1000, 1000, 64, torch.float16, True, False),
    ("B1-H2-Lq300-Lk700-D128-bf16-masked", 1, 2, 1, 300, 700, 128, torch.bfloat16, True,
     False),
    ("B1-H2-L512-D128-bf16-scored", 1, 2, 2, 512, 512, 128, torch.bfloat16, False, True),
    ("B2-H4-Hk2-L1000-D64-fp16-masked-scored", 2, 4, 2, 1000, 1000, 64, torch.float16, True,
     True),
    ("B1-H2-L1000-D128-bf16-runs", 1, 2, 2, 1000, 1000, 128, torch.bfloat16, "runs", False),
    ("B2-H4-Hk2-L700-D64-fp16-runs-scored", 2, 4, 2, 700, 700, 64, torch.float16, "runs",
     True),
]


def main() -> None:
    for label, B, H, HK, Lq, Lk, D, dtype, masked, scored in CASES:
        q, do = (torch.empty(B, H, Lq, D, dtype=dtype) for _ in range(2))
        k, v = (torch.empty(B, HK, Lk, D, dtype=dtype) for _ in range(2))
        n_q, n_k = -(-Lq // ws_bwd.BLOCK_M), -(-Lk // ws_bwd.BLOCK_N)
        midx = torch.full((n_q * n_k,), -1, dtype=torch.int32)
        if masked:
            midx[::3] = torch.arange(midx[::3].numel(), dtype=torch.int32)
        lists = ws_bwd.QueryLists(torch.arange(n_k, dtype=torch.int32) * n_q,
                                  torch.full((n_k,), n_q, dtype=torch.int32),
                                  torch.arange(n_q, dtype=torch.int32).repeat(n_k), midx,
                                  torch.zeros(max(1, int((midx >= 0).sum())), 64, 128,
                                              dtype=torch.uint8) if masked != "runs" else
                                  torch.zeros(max(1, int((midx >= 0).sum())), 128, 2,
                                              dtype=torch.int16), (0, 0), n_k,
                                  int((midx >= 0).sum()))
        call = SimpleNamespace(Lq=Lq, Lk=Lk, scale=D ** -0.5,
                               positions=SimpleNamespace(q_offset=Lk - Lq))
        score = scored and ws_bwd.ScoreVectors(
            torch.zeros(B, H), torch.zeros(1, H, n_k * 128), torch.zeros(1, H, Lq), 1.0)
        try:
            ws = ws_bwd.WsBwd(call, q, k, lists, score or None)
            rows = torch.empty(B, H, Lq)
            args = ws.args(q, k, v, do, rows, rows, torch.empty_like(k), torch.empty_like(v))
            ptx = compile_sm90(ws.kernel, args, ws.meta).asm["ptx"]
        except Exception as e:  # noqa: BLE001 -- reported
            print(f"{label} FAILED {type(e).__name__}: {' '.join(str(e).split())[-400:]}")
            continue
        facts = dict(
            masked=ws.meta["MASKED"], scored=ws.meta["SCORED"],
            setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                             ptx))),
            waits=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
            loads4d=len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.shared::cluster\.global", ptx)),
            loads1d=len(re.findall(r"cp\.async\.bulk\.tensor\.1d\.shared::cluster\.global", ptx)),
            stores4d=len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.global\.shared", ptx)))
        print(f"{label} OK {facts}")


if __name__ == "__main__":
    main()
