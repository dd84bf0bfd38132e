"""Receptive field over stacked layers (networkx), exact and tile-coarsened."""
from __future__ import annotations

import math

import pytest

from spattn.dsl.errors import SpattnValueError
from spattn.ir import build as B
from spattn.ir.receptive import receptive_field
from spattn.pattern import Pattern

from tests.ir.test_tiles import causal, q, k, c, window


def test_causal_one_layer():
    rf = Pattern(causal).receptive_field(64, 2)
    assert rf.layers_to_full == 1 and rf.last_fraction == 1.0 and rf.mean_fraction == 1.0
    assert not rf.coarsened and rf.tile == 1


@pytest.mark.parametrize("w", [2, 5, 8])
def test_window_grows_linearly(w):
    L = 60
    rf = receptive_field(Pattern(window(w)), L, 3)
    # each layer reaches w - 1 positions further back
    assert rf.layers_to_full == math.ceil((L - 1) / (w - 1))
    for n, f in enumerate(rf.last_fraction_per_layer, 1):
        assert f == pytest.approx(min(n * (w - 1), L - 1) / (L - 1))
    assert rf.fraction[10] == pytest.approx(min(3 * (w - 1), 10) / 10)


def test_power2_logarithmic():
    d = B.sub(q, k)
    ir = B.and_(B.cmp(">=", d, c(0)), B.or_(B.cmp("<", d, c(2)), B.is_pow2(d)))
    rf = receptive_field(Pattern(ir), 128, 8)
    assert rf.layers_to_full is not None and rf.layers_to_full <= 7
    assert rf.last_fraction == 1.0


def test_never_full():
    # sink only: the last position sees 4 tokens, nothing else ever
    ir = B.and_(causal, B.cmp("<", k, c(4)))
    rf = receptive_field(Pattern(ir), 32, 5)
    assert rf.layers_to_full is None
    assert rf.last_fraction == pytest.approx(4 / 31)


def test_coarsened():
    rf = receptive_field(Pattern(window(64)), 4096, 2, max_nodes=512)
    assert rf.coarsened and rf.tile == 8 and rf.nodes == 512
    assert "coarsened" in str(rf) and rf.to_dict()["coarsened"]
    assert 0 < rf.last_fraction < 1


def test_bad_args():
    with pytest.raises(SpattnValueError, match="layers"):
        receptive_field(Pattern(causal), 10, 0)
    with pytest.raises(SpattnValueError, match="L"):
        receptive_field(Pattern(causal), -1, 2)
