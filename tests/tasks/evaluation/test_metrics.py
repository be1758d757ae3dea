"""Scores against exact truth on hand-made values: AUROC (ties, pair counting), accuracy, Brier."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from tasks.evaluation.metrics import (
    accuracy,
    auroc,
    bootstrap_ci,
    brier,
    first_error_f1,
    first_error_labels,
    within_position_auroc,
    within_position_auroc_ci,
)


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


# -- within-position AUROC, first-error F1, bootstrap intervals ---------------------------------------------


def test_within_position_auroc_averages_the_positions_with_both_classes():
    # index 0: right steps 0.9, 0.2 vs wrong 0.4 -> pairs (0.9>0.4, 0.2<0.4) = 1/2
    # index 1: right 0.8 vs wrong 0.1, 0.3 -> 1; index 2: one class only -> not counted
    scores = [[0.9, 0.8, 0.7], [0.2, 0.1], [0.4, 0.3]]
    truth = [[True, True, True], [True, False], [False, False]]
    res = within_position_auroc(scores, truth)
    assert res["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert [p["auroc"] for p in res["positions"]] == [0.5, 1.0, None]
    assert [p["steps"] for p in res["positions"]] == [3, 3, 1]


def test_within_position_auroc_gives_position_nothing_and_leaves_nan_out():
    # a scorer that only knows the index (earlier higher) wins step AUROC but is 0.5 at every index
    truth = [[True, False, False], [True, True, False], [False, False, False], [True, True, True]]
    position = [[1.0, 0.5, 1 / 3] for _ in truth]
    flat_s = [s for traj in position for s in traj]
    flat_t = [t for traj in truth for t in traj]
    assert auroc(flat_s, flat_t) > 0.7
    assert within_position_auroc(position, truth)["mean"] == 0.5
    res = within_position_auroc([[0.9, math.nan], [0.1, 0.5]], [[True, True], [False, False]])
    assert res["left_out"] == 1 and res["mean"] == 1.0  # index 1 has one class left once the NaN is out
    assert math.isnan(within_position_auroc([[0.5]], [[True]])["mean"])


def test_first_error_f1_is_processbench_rule_on_exact_truth():
    truth = [[True, False, False], [True, True, True], [False, True], [True, True]]
    # predictions: 1 (right), -1 (right), 1 (wrong: the first error is 0), 1 (wrong: no error)
    scores = [[0.9, 0.2, 0.1], [0.9, 0.8, 0.7], [0.6, 0.3], [0.9, 0.4]]
    res = first_error_f1(scores, truth)
    assert (res["error_acc"], res["correct_acc"]) == (0.5, 0.5)
    assert res["f1"] == pytest.approx(0.5)
    assert res["erroneous"] == 2 and res["correct"] == 2
    assert first_error_f1([[0.5, math.nan]], [[True, True]])["correct_acc"] == 0.0  # NaN never passes
    assert first_error_labels(truth) == [1, -1, 0, -1]


def test_bootstrap_ci_covers_the_known_mean_and_degenerates_on_constants():
    lo, hi = bootstrap_ci([1.0] * 50, lambda xs: float(np.mean(xs)), n_boot=200)
    assert lo == hi == 1.0
    # 0/1 values with mean 0.5 over 400 groups: the 95% interval of the mean is about 0.5 +- 0.049
    values = [0.0, 1.0] * 200
    lo, hi = bootstrap_ci(values, lambda xs: float(np.mean(xs)), n_boot=2000, seed=1)
    assert 0.44 < lo < 0.47 and 0.53 < hi < 0.56
    assert all(math.isnan(x) for x in bootstrap_ci([], lambda xs: 0.0))


def test_bootstrap_ci_gives_the_exact_percentiles_of_a_two_group_set():
    # Two groups, 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so its 2.5% and 97.5%
    # percentiles are exactly 0 and 1. A resample's max is 1 unless both draws are 0 (1 in 4), so its 30% and 70%
    # percentiles are both exactly 1.
    assert bootstrap_ci([0.0, 1.0], lambda xs: float(np.mean(xs)), n_boot=4000, seed=3) == (0.0, 1.0)
    lo, hi = bootstrap_ci([0.0, 1.0], lambda xs: float(np.max(xs)), n_boot=4000, level=0.4, seed=3)
    assert (lo, hi) == (1.0, 1.0)


def test_within_position_auroc_ci_resamples_problems_and_leaves_nan_out():
    # Every problem ranks its right step above its wrong one at position 0: any resample of problems gives 1.0.
    ids = ["a", "a", "b", "b"]
    scores = [[0.9, math.nan], [0.2], [0.8], [0.1]]
    truth = [[True, False], [False], [True], [False]]
    assert within_position_auroc_ci(ids, scores, truth, n_boot=200, seed=0) == [1.0, 1.0]
    # Problem a ranks right, b wrong: a resample of both gives 0.5, of one 1.0 or 0.0; the 95% interval spans them.
    flipped = [[0.9], [0.2], [0.1], [0.8]]
    flat = [[True], [False], [True], [False]]
    assert within_position_auroc_ci(ids, flipped, flat, n_boot=2000, seed=0) == [0.0, 1.0]
    assert within_position_auroc_ci(ids, [[math.nan], [], [], []], [[True], [], [], []]) is None  # no scored pair
