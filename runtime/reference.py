"""The float64 dense reference: the number every kernel is checked against.

``attention_reference`` computes masked softmax attention densely, in float64,
from an explicit bool mask (``Pattern.mask(...)``). It is the library's
definition of the right answer, used by the tests and by ``spattn run``.
It materialises the full ``[B, H, Lq, Lk]`` scores: use it on small inputs only.

Conventions (the same as the kernels'):

* q ``[B, Hq, Lq, D]``, k ``[B, Hk, Lk, D]``, v ``[B, Hk, Lk, Dv]``; grouped-query
  attention when ``Hk < Hq``: query head ``h`` reads key head ``h // (Hq // Hk)``.
* ``scale`` defaults to ``1 / sqrt(D)``.
* A fully masked row gives output 0 and log-sum-exp ``-inf``, never NaN, and
  zero gradients. A row with a score of ``+inf`` or NaN at an allowed pair is NaN, its
  log-sum-exp too (``+inf`` where no score is NaN).
* lse is the natural-log log-sum-exp of the scaled scores over allowed keys.
* Only allowed pairs of nonzero weight reach the result: an inf or NaN in q, k or v where
  the mask removes the pair leaves the output and the gradients finite (a plain
  ``p @ v`` would give ``0 * inf = NaN``). The kernels agree where they never read the
  value (tiles proven EMPTY, positions past ``Lq`` / ``Lk``, cache slots past a decode
  step's ``seq_lens``); a non-finite key or value they do read for other pairs of its tile
  can reach rows that exclude it through ``0 * NaN`` in a matrix product, as in
  ``scaled_dot_product_attention`` with a boolean mask (docs/usage.md, "Non-finite values
  at excluded keys"). The reference is the ideal the tests compare finite inputs against.

It is differentiable: ``torch.autograd`` through it gives the reference
gradients (float64).

``attention_reference_chunked`` computes the same output for a ``Pattern`` row chunk by
row chunk, each with its own slice of the mask, to check kernels at lengths where the
dense ``[B, H, Lq, Lk]`` mask and scores do not fit.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention_reference", "attention_reference_chunked", "pattern_reference",
           "rows_per_chunk"]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        *, scale: float | None = None, score=None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in float64.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hk, Lk, D]``; v: ``[B, Hk, Lk, Dv]``; ``Hq % Hk == 0``.
        mask: bool, broadcastable as ``[B or 1, Hq or 1, Lq, Lk]``; True = allowed.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        score: a score modification, ``s [B, Hq, Lq, Lk] float64 -> s'``, applied to the
            scaled scores before the mask (:func:`pattern_reference` builds it from a
            pattern's score).

    Returns:
        ``(out, lse)``: out ``[B, Hq, Lq, Dv]`` float64 and lse ``[B, Hq, Lq]`` float64.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, L, D]; got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    Hk = k.shape[1]
    if Hq % Hk != 0 or v.shape[1] != Hk:
        raise ValueError(f"bad head counts: q has {Hq}, k {Hk}, v {v.shape[1]}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    q64, k64, v64 = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    group = Hq // Hk
    if group > 1:
        k64 = k64.repeat_interleave(group, dim=1)
        v64 = v64.repeat_interleave(group, dim=1)
    mask = torch.as_tensor(mask, device=q.device).to(torch.bool)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    s = torch.matmul(q64, k64.transpose(-1, -2)) * float(scale)
    # under a torch.func transform the values cannot choose a branch: the general form
    mapped = any(_mapped(t) for t in (q, k, v))
    bad_q, bad_k = ~torch.isfinite(q64).all(-1), ~torch.isfinite(k64).all(-1)
    if mapped or bad_q.any() or bad_k.any():
        # the pairs that read an inf or NaN keep it (detached: it has no gradient); the
        # others come from finite copies, so that a pair the mask removes passes its zero
        # gradient on as zero, not 0 * inf
        fin = torch.matmul(_finite(q64), _finite(k64).transpose(-1, -2)) * float(scale)
        s = torch.where(bad_q[..., :, None] | bad_k[..., None, :], s.detach(), fin)
    if score is not None:
        s = score(s)
    s = torch.where(mask, s, torch.full((), float("-inf"), dtype=s.dtype, device=s.device))
    # The row max is a constant shift (softmax is invariant to it): detached, so no gradient
    # flows through amax's tie-breaking; rows with no allowed key shift by 0.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)                       # exp(-inf) = 0 at masked pairs
    l = p.sum(dim=-1, keepdim=True)
    has = l != 0            # a row with a NaN score: l, out and lse NaN
    l_safe = torch.where(has, l, torch.ones_like(l))
    out = _weighted(p / l_safe, v64, mapped)   # a row with l == 0 has p == 0: out 0
    lse = torch.where(has, m + torch.log(l_safe),
                      torch.full((), float("-inf"), dtype=l.dtype, device=l.device))
    return out, lse.squeeze(-1)


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


_mapped = torch._C._functorch.is_functorch_wrapped_tensor


def _weighted(w: torch.Tensor, v: torch.Tensor, mapped: bool) -> torch.Tensor:
    """``w @ v``, where a zero weight contributes nothing whatever its value (no ``0 * inf``):
    an inf or NaN of v reaches only the rows that weigh it, as inf (one sign), or NaN (a NaN,
    or both signs). ``mapped``: under a transform (no branch on v's values)."""
    if not mapped and torch.isfinite(v).all():
        return torch.matmul(w, v)
    out = torch.matmul(w, _finite(v))
    live = (w.detach() > 0).to(v.dtype)
    n_nan, n_pos, n_neg = (torch.matmul(live, x.to(v.dtype)) > 0
                           for x in (torch.isnan(v), v == math.inf, v == -math.inf))
    inf = torch.full((), math.inf, dtype=v.dtype, device=v.device)
    out = torch.where(n_pos, inf, torch.where(n_neg, -inf, out))
    return torch.where(n_nan | (n_pos & n_neg), torch.full_like(inf, math.nan), out)


def rows_per_chunk(batch: int, heads: int, Lk: int, budget: int = 2 ** 28) -> int:
    """Query rows per chunk so that one ``[B, H, rows, Lk]`` intermediate has about
    ``budget`` elements (16 to 2048 rows)."""
    return max(16, min(2048, budget // (batch * heads * Lk)))


def attention_reference_chunked(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                scale: float | None = None, q_offset: int | None = None,
                                chunk: int | None = None, **inputs) -> torch.Tensor:
    """``attention_reference`` of ``pattern`` by row chunks: out ``[B, Hq, Lq, Dv]`` float64.

    Each chunk of query rows gets its own slice of ``pattern.mask`` (positions continue
    from the chunk's first row), so memory is O(chunk x Lk) per (batch, head) instead of
    O(Lq x Lk). ``inputs`` are the pattern's runtime inputs.
    """
    from ..ir.evaluate import query_offset
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    off = query_offset(Lq, Lk, q_offset)
    chunk = chunk or rows_per_chunk(B, Hq, Lk)
    outs = []
    for s in range(0, Lq, chunk):
        n = min(chunk, Lq - s)
        m = pattern.mask(n, Lk, num_heads=Hq, batch=B, q_offset=off + s, device=q.device,
                         **inputs)
        outs.append(attention_reference(q[:, :, s:s + n], k, v, m, scale=scale)[0])
    return torch.cat(outs, dim=2)


def pattern_reference(pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      scale: float | None = None, q_offset: int | None = None, **inputs
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_reference`` of ``pattern`` (its mask and, when it has one, its score)
    in float64: ``(out, lse)``. ``inputs``: the mask's int inputs and the score's float
    tables; differentiable with respect to q, k, v and the tables."""
    from ..ir.score import score_env, score_values
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    ints = {n: t for n, t in inputs.items() if n in pattern.inputs}
    m = pattern.mask(Lq, Lk, num_heads=Hq, batch=B, q_offset=q_offset, device=q.device, **ints)
    fn = None
    if pattern.score is not None:
        from ..ir.evaluate import query_offset
        env = score_env(Lq, Lk, num_heads=Hq, batch=B, q_offset=query_offset(Lq, Lk, q_offset),
                        device=q.device)
        allowed = torch.as_tensor(m, device=q.device).to(torch.bool)

        def fn(s):
            # the score is differentiated only at the pairs it is seen at: allowed by the
            # mask and not excluded by a score of -inf (elsewhere its derivative may be
            # infinite or NaN, and 0 * inf would poison the gradients)
            with torch.no_grad():
                f0 = score_values(pattern.score, s.detach(), env,
                                  {n: t.detach() for n, t in inputs.items()})
            keep = allowed.expand(s.shape) & (f0 != float("-inf"))
            if not bool(keep.any()):
                return torch.full_like(s.detach(), float("-inf"))
            sub = {n: (t.expand(s.shape)[keep] if isinstance(t, torch.Tensor) else t)
                   for n, t in env.items()}
            vals = score_values(pattern.score, s[keep], sub, inputs)
            out = torch.full_like(s.detach(), float("-inf"))
            return out.index_put(keep.nonzero(as_tuple=True), vals)
    return attention_reference(q, k, v, m, scale=scale, score=fn)
