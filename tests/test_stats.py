import numpy as np
import pytest

from secompress.se_rule import SERule, find_super_experts


def grid(L=8, C=9, base=1.0):
    return np.full((L, C), base)


def test_rule_flags_only_values_above_percentile_and_max_fraction():
    v = grid()
    v[1, 2] = 500.0
    assert find_super_experts(v) == [(1, 2)]


def test_rule_ignores_the_last_quarter_of_layers():
    v = grid()
    v[6, 0] = 900.0  # layer 6 of 8: outside the first 75%
    v[2, 5] = 50.0
    assert find_super_experts(v) == [(2, 5)]
    assert find_super_experts(v, SERule(layer_fraction=1.0)) == [(6, 0)]


def test_max_ratio_threshold_drops_small_outliers():
    v = grid(L=4, C=100)
    v[0, 0], v[1, 1] = 1000.0, 50.0  # both above P99.5 of 300 values? only the top ones
    ses = find_super_experts(v, SERule(percentile=99.0, max_ratio=0.1))
    assert (0, 0) in ses and (1, 1) not in ses  # 50 < 1000 / 10
    assert (1, 1) in find_super_experts(v, SERule(percentile=99.0, max_ratio=0.01))


def test_nan_cells_are_absent_experts():
    v = grid()
    v[0, :] = np.nan  # a dense layer
    v[:, 8] = np.nan  # no shared expert
    v[3, 1] = 80.0
    assert find_super_experts(v) == [(3, 1)]


def test_layer_normalised_variant_prefers_the_early_relative_outlier():
    # residual stream grows with depth: layer 4's experts are all large, one a bit larger
    v = grid(L=8, C=16)
    v[0, 12] = 30.0  # 30x its layer's median
    v[4, :] = 40.0
    v[4, 8] = 120.0  # absolute max, but only 3x its layer's median
    assert find_super_experts(v) == [(4, 8)]
    assert find_super_experts(v, normalise=True) == [(0, 12)]


@pytest.mark.parametrize("kw", [dict(layer_fraction=0), dict(percentile=101), dict(max_ratio=-1)])
def test_invalid_rule_is_rejected(kw):
    with pytest.raises(ValueError):
        SERule(**kw)
