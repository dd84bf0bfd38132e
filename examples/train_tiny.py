"""Train a tiny transformer language model with a sparse attention pattern, on the CPU.

The task is generated in code (no downloads): each sequence is a random block of
PERIOD tokens repeated to fill the context, so after the first period the next
token is the one PERIOD - 1 positions back. The pattern

    causal & (window(16) | sink(2))

(a StreamingLLM-style sliding window with two attention sinks) sees far enough
back for that, so the loss falls from ~ln(VOCAB) towards the unpredictable first
period's share. Every attention call goes through spattn's block-sparse torch
backend, forward and backward.

    python examples/train_tiny.py            # 10-20 s on a 2-core CPU
    python examples/train_tiny.py --threads 0   # torch's default thread count

The model is tiny (each operation is a few hundred microseconds of work), so it runs on
one thread by default: with several, every operation ends by waiting for all threads,
and on a machine whose cores are busy with other work a waiting thread can lose a
whole scheduler slice per operation (measured on 2 cores with two busy processes: about
2 s per step with torch's 2 threads, whichever attention it uses, against 0.1-0.3 s
with one).

Exits with status 1 if the final loss is not clearly below the initial one.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

from spattn.nn import SparseAttention

PATTERN = "causal & (window(W) | sink(2))"
VOCAB, PERIOD, SEQ = 16, 8, 64


def batch(n: int, g: torch.Generator) -> torch.Tensor:
    block = torch.randint(0, VOCAB, (n, PERIOD), generator=g)
    return block.repeat(1, SEQ // PERIOD + 1)[:, : SEQ + 1]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn = SparseAttention(PATTERN, W=window, backend="torch")

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        o = self.attn(qkv[0], qkv[1], qkv[2])                 # [B, H, L, hd], strided views in
        x = x + self.proj(o.transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, dim=64, heads=4, layers=2, window=16):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(SEQ, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, window) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 suits a model this small")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = TinyLM()
    print(f"pattern: {model.blocks[0].attn}  (threads: {torch.get_num_threads()})")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    eval_data = batch(256, torch.Generator().manual_seed(12345))

    def evaluate() -> float:
        with torch.no_grad():
            logits = model(eval_data[:, :-1])
            return loss_fn(logits.reshape(-1, VOCAB), eval_data[:, 1:].reshape(-1)).item()

    initial = evaluate()
    floor = math.log(VOCAB) * (PERIOD - 1) / SEQ        # the first period is unpredictable
    print(f"initial loss {initial:.3f}  (uniform guess: {math.log(VOCAB):.3f}; "
          f"best possible ~{floor:.3f})")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        data = batch(args.batch, g)
        logits = model(data[:, :-1])
        loss = loss_fn(logits.reshape(-1, VOCAB), data[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  train loss {loss.item():.3f}  ({time.time() - t0:.1f}s)")
    final = evaluate()
    print(f"final loss {final:.3f} after {args.steps} steps in {time.time() - t0:.1f}s")
    if not final < 0.6 * initial:
        print("FAIL: the loss did not go down clearly", file=sys.stderr)
        return 1
    print("OK: the loss went down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
