"""``spattn.nn.SparseAttention``: a pattern as an ``nn.Module``.

    attn = SparseAttention("causal & (window(W) | sink(4))", W=256)
    o = attn(q, k, v)                      # q [B, Hq, L, D], k, v [B, Hk, L, D]
    o = attn(q, k, v, doc=doc_ids)         # patterns with runtime inputs

The pattern is compiled once, at construction. The module has no parameters
(it is the attention core, not the projections around it) and works inside
``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

from torch import nn

from .pattern import Pattern

__all__ = ["SparseAttention"]


class SparseAttention(nn.Module):
    """Scaled dot-product attention restricted to a sparsity pattern.

    Args:
        pattern: pattern source (``"causal & window(W)"``) or a compiled :class:`Pattern`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`spattn.compile`).
        scale: softmax scale; default ``1 / sqrt(D)``.
        layout: ``"bhsd"`` (q ``[B, H, L, D]``, the default) or ``"bshd"`` (q
            ``[B, L, H, D]``; the output likewise).
        **params: compile-time params of the pattern (only with a source string).
    """

    def __init__(self, pattern: "str | Pattern", *, backend: str = "auto",
                 scale: float | None = None, layout: str | None = None, **params):
        super().__init__()
        from .dsl.errors import SpattnParamError
        from .runtime import autograd as _ag
        from .runtime.usage import check_layout
        self.layout = check_layout(layout)
        if isinstance(pattern, Pattern):
            if params:
                raise SpattnParamError(
                    f"params {', '.join(map(repr, sorted(params)))} cannot be bound on an "
                    "already compiled Pattern: pass the source string instead")
            if backend != pattern.backend:
                pattern = Pattern(pattern.ir, name=pattern.name, params=pattern.params,
                                  inputs=pattern.inputs, backend=backend, grid=pattern.grid,
                                  grid_offset=pattern.grid_offset,
                                  grid_suffix=pattern.grid_suffix,
                                  score=pattern.score, score_inputs=pattern.score_inputs)
        elif isinstance(pattern, str):
            from . import compile as _compile
            pattern = _compile(pattern, backend=backend, **params)
        else:
            raise SpattnParamError(f"pattern must be a str or a spattn.Pattern, got "
                                   f"{type(pattern).__name__}")
        self.pattern = pattern
        self.scale = scale
        _ag.register(pattern)          # so the compiled custom op can find it

    def forward(self, q, k, v, q_offset: int | None = None, *, order=None,
                return_lse: bool = False, deterministic: bool = False, plan=None, **inputs):
        """The attention output ``[B, Hq, Lq, D]`` (in ``layout``), and with ``return_lse``
        also the log-sum-exp ``[B, Hq, Lq]`` (fp32); ``inputs``: the pattern's runtime
        inputs; ``order``: a token order to run in; ``deterministic``: a score's learnable
        tables get their gradients summed in a fixed order; ``plan``: a plan made by
        ``module.pattern.plan(...)`` (all four as for :meth:`spattn.Pattern.__call__`).
        ``scale`` and ``layout`` are the module's, fixed at construction."""
        from .runtime.api import call
        for name in ("scale", "layout"):        # no runtime input has these names
            if name in inputs:
                from .dsl.errors import SpattnParamError
                raise SpattnParamError(f"{name}= is fixed when the module is made "
                                       f"(SparseAttention(..., {name}=...)), not at a call")
        return call(self.pattern, q, k, v, scale=self.scale, return_lse=return_lse,
                    q_offset=q_offset, inputs=inputs, layout=self.layout, order=order,
                    deterministic=deterministic, plan=plan)

    def extra_repr(self) -> str:
        parts = [repr(self.pattern.source)]
        if self.pattern.inputs:
            parts.append(f"inputs={sorted(self.pattern.inputs)}")
        if self.pattern.backend != "auto":
            parts.append(f"backend={self.pattern.backend!r}")
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        if self.layout is not None:
            parts.append(f"layout={self.layout!r}")
        return ", ".join(parts)
