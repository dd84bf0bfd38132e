"""An independent numpy definition of NATTEN's neighbourhood semantics (per axis: kernel
size, stride, dilation, causal), for tests: windows are listed member by member."""
from __future__ import annotations

import numpy as np


def axis_mask(n: int, K: int, s: int, d: int, causal: bool) -> np.ndarray:
    """bool ``[n, n]``: may coordinate ``i`` attend to coordinate ``j`` on this axis."""
    out = np.zeros((n, n), dtype=bool)
    for i in range(n):
        members = list(range(i % d, n, d))
        m = members.index(i)
        group = (m // s) * s
        if causal:
            leader = min(group + s - 1, len(members) - 1)
            window = members[max(0, leader - K + 1): m + 1]
        else:
            leader = min(group + s // 2, len(members) - 1)
            start = leader - K // 2
            start = max(0, min(start, len(members) - K))
            window = members[start: start + K]
        out[i, window] = True
    return out


def neighborhood_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> np.ndarray:
    """bool ``[N, N]`` over the cells of ``shape`` flattened row-major."""
    d = len(shape)

    def per(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d
    ks, st, di, ca = per(kernel_size), per(stride), per(dilation), per(is_causal)
    mask = np.ones((1, 1), dtype=bool)
    for n, K, s, dl, c in zip(shape, ks, st, di, ca):
        a = axis_mask(n, K, s, dl, c)
        mask = (mask[:, None, :, None] & a[None, :, None, :]).reshape(
            mask.shape[0] * n, mask.shape[1] * n)
    return mask
