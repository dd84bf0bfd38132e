"""The language's grid builtins: ``coord(x, shape, axis)`` and ``neighborhood(shape,
kernel_size[, stride[, dilation[, is_causal]]])`` (docs/language.md, docs/layouts.md)."""
import numpy as np
import pytest

import spattn
from tests.helpers.natten_ref import neighborhood_mask


@pytest.mark.parametrize("src,args", [
    ("neighborhood([6, 8], [3, 4], [1, 2], 1, [false, true])",
     ((6, 8), (3, 4), (1, 2), 1, (False, True))),
    ("neighborhood([3, 4, 5], 2, 1, [1, 2, 1], true)", ((3, 4, 5), 2, 1, (1, 2, 1), True)),
    ("neighborhood(12, 5, 2)", ((12,), 5, 2, 1, False)),
], ids=["2d-per-axis", "3d-causal-dilated", "1d-scalars"])
def test_neighborhood_builtin_is_natten(src, args):
    pat = spattn.compile(src)
    assert pat == spattn.neighborhood(*args)
    N = int(np.prod(args[0]))
    assert np.array_equal(pat.mask(N, N)[0, 0].numpy(), neighborhood_mask(*args))


def test_coord_and_list_params_in_a_program():
    prog = """
    param G = [4, 6, 5]
    param K = [3, 3, 3]
    pattern video = neighborhood(G, K) & coord(k, G, 0) <= coord(q, G, 0)
    """
    pat = spattn.compile(prog)
    want = neighborhood_mask((4, 6, 5), 3) & np.tril(np.ones((4, 4), bool)).repeat(30, 0) \
        .repeat(30, 1)
    assert np.array_equal(pat.mask(120, 120)[0, 0].numpy(), want)
    flat = spattn.compile("coord(q, [4, 6, 5], 1) == q // 5 % 6")
    assert flat.source == "true"


@pytest.mark.parametrize("src,cls,words", [
    ("neighborhood([6, 8], [3, 9])", spattn.SpattnValueError, ["kernel_size[1]", "column 1"]),
    ("coord(q, [6, 8], 2)", spattn.SpattnValueError, ["axis 2"]),
    ("neighborhood([6, 8], q)", spattn.SpattnTypeError, ["kernel_size of neighborhood",
                                                         "column 22"]),
    ("neighborhood([6, 8])", spattn.SpattnTypeError, ["neighborhood takes"]),
    ("coord(q, [6, 8, 1, 2, 3], 0)", spattn.SpattnParamError, ["shape"]),
    ("neighborhood([6, 8], 3, [1, 2, 3])", spattn.SpattnParamError, ["stride", "2 axes"]),
    ("neighborhood([6, 8], 3, 1, 1, 2)", spattn.SpattnParamError, ["is_causal", "bools"]),
    ("neighborhood([6, 8], 3, 1, 1, [true, 0])", spattn.SpattnParamError,
     ["is_causal", "bools"]),
], ids=["kernel-too-big", "bad-axis", "non-constant", "too-few", "five-axes", "per-axis-len",
        "int-is-causal", "int-in-is-causal"])
def test_grid_builtin_errors(src, cls, words):
    with pytest.raises(cls) as e:
        spattn.compile(src)
    for w in words:
        assert w in str(e.value)
