"""Best-of-N selectors and accuracy on hand-made candidates."""

from __future__ import annotations

import math
import random

import pytest

from tasks.evaluation.best_of_n import (
    Candidate,
    best_of_n,
    best_of_n_accuracy,
    select_last_step,
    select_majority,
    select_min_step,
    select_random,
)
from tasks.evaluation.scorers import EvaluationError


def _c(scores, answer, correct):
    return Candidate(list(scores), answer, correct)


def test_selectors_pick_by_their_rule():
    cands = [
        _c([0.9, 0.2, 0.95], "5", False),  # min 0.2, last 0.95
        _c([0.6, 0.7, 0.6], "7", True),  # min 0.6, last 0.6
        _c([0.8, 0.65, 0.7], "5", False),  # min 0.65 (best), last 0.7
        _c([0.5], None, False),
    ]
    rng = random.Random(0)
    assert select_min_step(cands, rng) == 2
    assert select_last_step(cands, rng) == 0
    assert select_majority(cands, rng) == 0  # "5" has 2 votes; its first carrier
    assert select_majority([_c([1], "7", True), _c([1], "5", False)], rng) == 0  # tie: first seen answer
    assert select_majority([_c([1], None, False), _c([1], None, False)], rng) == 0
    assert select_min_step([_c([0.4], "1", False), _c([0.4], "2", True)], rng) == 0  # ties: first
    picks = {select_random(cands, random.Random(s)) for s in range(40)}
    assert picks == {0, 1, 2, 3}


def test_best_of_n_accuracy_uses_disjoint_groups():
    # One problem, 4 samples; scores put the right one (index 3) highest by min-step.
    p = [_c([0.3], "1", False), _c([0.2], "2", False), _c([0.1], "1", False), _c([0.9], "4", True)]
    assert best_of_n_accuracy([p], 1, select_min_step) == 0.25  # groups {0},{1},{2},{3}: 1 hit of 4
    assert best_of_n_accuracy([p], 2, select_min_step) == 0.5  # {0,1} miss, {2,3} hit
    assert best_of_n_accuracy([p], 4, select_min_step) == 1.0
    assert best_of_n_accuracy([p], 4, select_majority) == 0.0  # "1" wins the vote and is wrong
    with pytest.raises(EvaluationError, match="fewer than N=8"):
        best_of_n_accuracy([p], 8, select_min_step)


def test_best_of_n_table_and_pass_at_n_ceiling():
    p1 = [_c([0.1], "1", False), _c([0.9], "2", True)]
    p2 = [_c([0.9], "3", False), _c([0.8], "3", False)]
    res = best_of_n([p1, p2], [1, 2], selectors=("min_step", "majority"))
    assert res.accuracy["min_step"] == [0.25, 0.5]  # N=1: 1 hit of 4 groups; N=2: p1 hit, p2 miss
    assert res.accuracy["majority"] == [0.25, 0.0]  # N=2: p1 tie -> "1" (first seen, wrong); p2 wrong
    assert res.oracle_any_correct == [0.25, 0.5]
    with pytest.raises(EvaluationError, match="unknown selector"):
        best_of_n([p1], [1], selectors=("best",))


def test_a_nan_step_never_wins_whatever_the_order():
    nan = math.nan
    rng = random.Random(0)
    for cands in ([_c([nan, 0.1], "1", False), _c([0.2, 0.3], "2", True)],
                  [_c([0.2, 0.3], "2", True), _c([nan, 0.1], "1", False)],
                  [_c([0.9, nan], "1", False), _c([0.05], "2", True)]):
        picked = cands[select_min_step(cands, rng)]
        assert picked.correct, "a candidate with an unscored step must not beat a fully scored one"
        picked = cands[select_last_step(cands, rng)]
        assert picked.correct
    assert select_min_step([_c([nan], "1", False), _c([], "2", True)], rng) == 0  # none scored: the first


def test_best_of_n_reports_bootstrap_intervals_and_the_paired_difference_to_majority():
    # 40 problems x 4 samples: min_step always finds the right sample, majority only on half the problems
    problems = []
    for j in range(40):
        right = _c([0.9], "7", True)
        wrong = [_c([0.1], "5", False) for _ in range(3)] if j % 2 else [_c([0.1], "7", True)] * 3
        problems.append([wrong[0], right, *wrong[1:]] if j % 2 else [right, *wrong])
    res = best_of_n(problems, [1, 4], n_boot=300)
    assert res.accuracy["min_step"][1] == 1.0 and res.accuracy["majority"][1] == 0.5
    lo, hi = res.ci["majority"][1]
    assert lo < 0.5 < hi
    d_lo, d_hi = res.diff_vs_majority["min_step"][1]
    assert 0 < d_lo <= 0.5 <= d_hi  # above majority, outside the interval
    assert "majority" not in res.diff_vs_majority
