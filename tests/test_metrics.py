import math

import pytest

from tasks.metrics import accuracy, auroc, brier


def test_auroc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert auroc([0.9, 0.5, 0.4, 0.1], [True, False, True, False]) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    assert auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert auroc([1, 1, 0], [True, False, False]) == pytest.approx(0.75)


def test_auroc_perfect_and_inverted():
    assert auroc([0.2, 0.8], [False, True]) == 1.0
    assert auroc([0.8, 0.2], [False, True]) == 0.0


def test_auroc_one_class_is_nan():
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


def test_accuracy_and_brier():
    assert accuracy([0.6, 0.4, 0.5], [True, True, False]) == pytest.approx(1 / 3)
    assert brier([1.0, 0.5], [True, False]) == pytest.approx((0 + 0.25) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        accuracy([0.1], [True, False])
