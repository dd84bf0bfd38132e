"""Compile the warp-specialised forward (``runtime/ws_fwd.py``) for Hopper (sm_90a) on this
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
from spattn.ir.score import LOG2E, Capped  # noqa: E402
from spattn.runtime import ws_fwd  # noqa: E402
from spattn.runtime.triton_backend import BoxRows  # noqa: E402

CASES = [  # label, B, H, HK, N, D, dtype, BoxRows or None
    ("rows-B1-H2-L512-D128-bf16", 1, 2, 2, 512, 128, torch.bfloat16, None),
    ("rows-B2-H4-Hk2-L256-D64-fp16", 2, 4, 2, 256, 64, torch.float16, None),
    ("box-16x8-of-64x32-D128-bf16", 1, 2, 1, 2048, 128, torch.bfloat16,
     BoxRows((1, 64, 32), (1, 16, 8), False)),
    ("box-2x8x8-of-4x16x16-D64-bf16", 2, 2, 2, 1024, 64, torch.bfloat16,
     BoxRows((4, 16, 16), (2, 8, 8), True)),
    ("box-4x8x4-of-16x16x32-D128-bf16", 1, 2, 2, 8192, 128, torch.bfloat16,
     BoxRows((16, 16, 32), (4, 8, 4), True)),
    ("rows-masked-B1-H2-L1000-D128-bf16", 1, 2, 2, 1000, 128, torch.bfloat16, None),
    ("rows-runs-B2-H2-L700-D64-fp16", 2, 2, 1, 700, 64, torch.float16, None),
    ("rows-B1-H2-L512-D128-bf16-scored", 1, 2, 2, 512, 128, torch.bfloat16, None),
    ("rows-runs-B2-H2-L700-D64-fp16-scored", 2, 2, 1, 700, 64, torch.float16, None),
    ("rows-masked-B1-H2-L1000-D128-bf16-scored", 1, 2, 2, 1000, 128, torch.bfloat16, None),
    ("rows-B1-H2-L512-D128-bf16-capped", 1, 2, 2, 512, 128, torch.bfloat16, None),
    ("rows-runs-B2-H2-L700-D64-fp16-capped", 2, 2, 1, 700, 64, torch.float16, None),
    ("box-16x8-of-64x32-D128-bf16-capped", 1, 2, 1, 2048, 128, torch.bfloat16,
     BoxRows((1, 64, 32), (1, 16, 8), False)),
]


def diagonal_lists(N: int, label: str) -> ws_fwd.KeyLists:
    """Every 128 x 128 tile of an ``N`` x ``N`` call listed; with "masked" or "runs" in the
    label the diagonal tiles PARTIAL (by masks, or by each row's run of keys)."""
    n_t = -(-N // ws_fwd.TILE)
    count = torch.full((n_t,), n_t, dtype=torch.int32)
    midx = torch.full((n_t * n_t,), -1, dtype=torch.int32)
    masks = torch.zeros(n_t, 128, 128, dtype=torch.uint8)
    if "masked" in label or "runs" in label:
        midx[::n_t + 1] = torch.arange(n_t, dtype=torch.int32)
    if "runs" in label:
        masks = ws_fwd.tile_runs(masks)
    return ws_fwd.KeyLists(torch.arange(n_t, dtype=torch.int32) * n_t, count,
                           torch.arange(n_t, dtype=torch.int32).repeat(n_t), midx, masks,
                           (0, 0), n_t, n_partial=int((midx >= 0).sum()))


def call_and_score(label: str, B: int, H: int, N: int, D: int):
    """The call's stand-in (lengths, scale, offset) and, with "scored" in the label, an
    additive score's vectors (terms of the key unless the label has "runs"), with "capped"
    softcap(30)'s form."""
    call = SimpleNamespace(Lq=N, Lk=N, scale=D ** -0.5, positions=SimpleNamespace(q_offset=0))
    if "capped" in label:
        return call, Capped(30.0 * LOG2E, 1.0 / 30.0)
    score = "scored" in label and ws_fwd.ScoreVectors(
        torch.zeros(B, H), torch.zeros(1, H, -(-N // 128) * 128), torch.zeros(1, H, N), 1.0,
        keys="runs" not in label)
    return call, score or None


def facts(ptx: str, meta: dict, dims: int = 5) -> dict:
    """What the tests check in a kernel's PTX: its flags, the ``setmaxnreg`` counts, the
    ``wgmma.wait_group`` arguments, the ``dims``-D TMA loads and stores."""
    return dict(
        masked=meta.get("MASKED"), scored=meta["SCORED"],
        setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))),
        waits=sorted(set(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
        **{f"loads{dims}d": len(re.findall(
            rf"cp\.async\.bulk\.tensor\.{dims}d\.shared::cluster\.global", ptx)),
           f"stores{dims}d": len(re.findall(
               rf"cp\.async\.bulk\.tensor\.{dims}d\.global\.shared", ptx))})


def report(label: str, build) -> None:
    """``LABEL OK {facts}`` of the kernel ``build()`` gives as ``(kernel, args, meta)``,
    compiled for sm_90a, or ``LABEL FAILED error``."""
    try:
        kernel, args, meta = build()
        ptx = compile_sm90(kernel, args, meta).asm["ptx"]
    except Exception as e:  # noqa: BLE001 -- reported
        print(f"{label} FAILED {type(e).__name__}: {' '.join(str(e).split())[-400:]}")
        return
    print(f"{label} OK {facts(ptx, meta)}")


def main() -> None:
    for label, B, H, HK, N, D, dtype, rows in CASES:
        q = torch.empty(B, H, N, D, dtype=dtype)
        k, v = (torch.empty(B, HK, N, D, dtype=dtype) for _ in range(2))
        call, score = call_and_score(label, B, H, N, D)

        def build():
            stage = ws_fwd.WsFwdStage(call, q, k, v, rows, diagonal_lists(N, label), score)
            return stage.kernel, stage.args(q, k, v)[0], stage.meta
        report(label, build)


if __name__ == "__main__":
    main()
