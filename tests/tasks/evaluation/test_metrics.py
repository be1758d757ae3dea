"""Scores against exact truth on hand-made values: AUROC (ties, pair counting), accuracy, Brier."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from tasks.evaluation.metrics import accuracy, auroc, brier


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


def _auroc_by_pairs(scores, positives):
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_values():
    # positives 0.9 and 0.7, negatives 0.8 and 0.6: pairs won 0.9>0.8, 0.9>0.6, 0.7>0.6; lost 0.7<0.8 -> 3/4
    assert auroc([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == 0.75
    assert auroc([0.1, 0.9], [False, True]) == 1.0
    assert auroc([0.9, 0.1], [False, True]) == 0.0
    # ties: positives 0.5, 0.5; negatives 0.5, 0.2 -> each positive: 1/2 (tie) + 1 -> 3/4
    assert auroc([0.5, 0.5, 0.5, 0.2], [True, False, True, False]) == 0.75
    assert auroc([0.5] * 5, [True, False, True, True, False]) == 0.5  # a constant scorer
    assert math.isnan(auroc([0.1, 0.2], [True, True]))


def test_auroc_matches_pair_counting_on_random_scores_with_ties():
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 40)
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        labels = [rng.random() < 0.5 for _ in range(n)]
        if all(labels) or not any(labels):
            continue
        assert auroc(scores, labels) == pytest.approx(_auroc_by_pairs(scores, labels))


def test_step_accuracy_threshold_is_inclusive_for_correct():
    # 0.5 counts as "correct" (only scores below 0.5 are judged wrong, as in ProcessBench)
    assert accuracy([0.5, 0.49, 0.9, 0.1], [True, False, False, True]) == 0.5
    assert accuracy([0.2], [False], threshold=0.1) == 0.0
