"""``torch.compile(fullgraph=True)`` of a model using spattn: no graph breaks, same numbers."""
import pytest
import torch
from torch import nn

import spattn
from spattn.nn import SparseAttention


class TinyBlock(nn.Module):
    def __init__(self, dim=32, heads=2, kv_heads=1):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.d)
        self.out = nn.Linear(dim, dim)
        self.attn = SparseAttention("causal & (window(W) | sink(2)) & same(doc)", W=12,
                                    backend="torch")

    def forward(self, x, doc):
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, self.h + 2 * self.hk, self.d).transpose(1, 2)
        q, k, v = qkv.split([self.h, self.hk, self.hk], dim=1)     # strided views, GQA
        o = self.attn(q, k, v, doc=doc)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))


def test_compile_fullgraph_forward_backward_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(2, 40, 32)
    doc = (torch.rand(2, 40) < 0.1).cumsum(-1)

    y_eager = model(x, doc)
    y_eager.square().mean().backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x, doc)
    y.square().mean().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-4, atol=1e-6, msg=n)

    # the attention is one opaque op in the graph, not a graph break
    explanation = torch._dynamo.explain(model)(x, doc)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
