"""Bugs the adversarial search (``tests/helpers/adversarial.py``) and the explored property
tests found, each with its class of inputs, on both backends (the Triton kernels under the
interpreter) against the float64 reference."""
import pytest
import torch

import spattn

from tests.runtime.test_review_scores import assert_matches, run


@pytest.mark.interpreter
@pytest.mark.parametrize("mask,score,tables", [
    ("full", "0.75", {}),
    ("causal", "float(q) * 0.25", {}),
    ("k < q & q >= 4", "w[h] * log(float(max(k - 5, 0)))", {"w": (2,)}),
], ids=["B2-H2-Lq20-Lk24-const", "B2-H2-Lq20-Lk24-rows", "B2-H2-Lq20-Lk24-cols-table"])
def test_scores_without_s_fill_the_tile(mask, score, tables):
    """A score that reads neither ``s`` nor both positions is a scalar, a row or a column of
    the tile: the kernels broadcast it to the tile (the dots of the backward and the
    softmax rows were of the wrong shape: an interpreter AssertionError, a compile error on
    the GPU)."""
    p = spattn.compile(mask, score=score, backend="triton")
    got, want, _ = run(p, B=2, Lq=20, Lk=24, Hk=1, q_offset=3, tables=tables, seed=11)
    assert_matches(got, want, score)
