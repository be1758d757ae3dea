"""ActPRM selection rules (tasks/active/selection.py) on hand-made ensemble outputs, every value checked by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from tasks.active.selection import (
    PRESETS,
    SelectionParams,
    first_predicted_error,
    random_selection,
    select_uncertain,
    step_confident,
    trajectory_confident,
)

PAPER = PRESETS["paper"]
CODE = PRESETS["actprm_code"]
NAN = math.nan


@dataclass
class Scores:
    mean: list[float]
    std: list[float]


def test_presets_are_the_papers_and_the_codes():
    assert (PAPER.delta_pred, PAPER.delta_std) == (0.95, 0.005)
    assert (CODE.delta_pred, CODE.delta_std) == (0.9, 0.01)


@pytest.mark.parametrize(("mean", "std", "paper", "code"), [
    (0.97, 0.004, True, True),    # confidently right under both
    (0.03, 0.004, True, True),    # confidently wrong: 0.03 <= 1 - 0.95
    (0.95, 0.005, True, True),    # both bounds are inclusive
    (0.05, 0.005, True, True),    # 1 - 0.95 = 0.05: inclusive
    (0.93, 0.004, False, True),   # mean between 0.9 and 0.95: only the code's preset is sure
    (0.08, 0.004, False, True),   # 0.08 <= 0.1 but > 0.05
    (0.97, 0.008, False, True),   # std above 0.005, below 0.01
    (0.97, 0.02, False, False),   # the heads disagree
    (0.5, 0.0, False, False),     # unanimous but undecided
    (0.89, 0.0, False, False),
    (NAN, 0.0, False, False),     # an unscored (truncated) step is never confident
    (0.99, NAN, False, False),
])
def test_step_rule(mean, std, paper, code):
    assert step_confident(mean, std, PAPER) is paper
    assert step_confident(mean, std, CODE) is code


def test_first_predicted_error():
    assert first_predicted_error([0.9, 0.7, 0.4, 0.2]) == 2
    assert first_predicted_error([0.9, 0.5, 0.51]) is None  # 0.5 is not below 0.5
    assert first_predicted_error([0.49]) == 0
    assert first_predicted_error([NAN, 0.3]) == 1  # an unscored step is no prediction
    assert first_predicted_error([]) is None
    assert first_predicted_error([0.9, 0.6], threshold=0.7) == 1


def test_trajectory_rule_ignores_steps_after_the_first_predicted_error():
    # Step 1 is the first predicted error (0.02 < 0.5) and confident; step 2 is a coin toss, but it comes after.
    assert trajectory_confident([0.99, 0.02, 0.5], [0.001, 0.001, 0.3], PAPER)
    # The same coin toss before the error makes the trajectory uncertain.
    assert not trajectory_confident([0.99, 0.5, 0.02], [0.001, 0.3, 0.001], PAPER)
    # The first predicted error itself is included: 0.3 < 0.5 is an error, but not a confident one.
    assert not trajectory_confident([0.99, 0.3, 0.01], [0.001, 0.001, 0.001], PAPER)
    # No predicted error: every step counts, the last one too.
    assert trajectory_confident([0.99, 0.98, 0.96], [0.001, 0.002, 0.004], PAPER)
    assert not trajectory_confident([0.99, 0.98, 0.93], [0.001, 0.002, 0.004], PAPER)
    assert trajectory_confident([0.99, 0.98, 0.93], [0.001, 0.002, 0.004], CODE)
    # A NaN after the first error does not matter; one before it does.
    assert trajectory_confident([0.99, 0.01, NAN], [0.001, 0.001, NAN], PAPER)
    assert not trajectory_confident([NAN, 0.01], [NAN, 0.001], PAPER)
    # Nothing scored: uncertain.
    assert not trajectory_confident([], [], PAPER)
    with pytest.raises(ValueError, match="2 means but 1 stds"):
        trajectory_confident([0.9, 0.9], [0.0], PAPER)


def test_select_uncertain_ranks_by_largest_std_then_closeness_to_half():
    ids = ["a", "b", "c", "d", "e"]
    scores = [
        Scores([0.99, 0.01, 0.5], [0.001, 0.001, 0.4]),   # a: confident (the 0.4 std is after the error)
        Scores([0.7, 0.9], [0.05, 0.01]),                 # b: uncertain, max std 0.05
        Scores([0.6, 0.2], [0.2, 0.01]),                  # c: uncertain, max std 0.2
        Scores([0.55, 0.96], [0.05, 0.001]),              # d: max std 0.05 like b, |0.55-0.5| = 0.05 < b's 0.2
        Scores([0.97, 0.96], [0.004, 0.004]),             # e: confident
    ]
    sel = select_uncertain(ids, scores, PAPER)
    assert sel.selected == ("c", "d", "b")
    assert (sel.uncertain, sel.confident) == (3, 2)
    capped = select_uncertain(ids, scores, PAPER, max_selected=2)
    assert capped.selected == ("c", "d") and capped.uncertain == 3
    assert capped.digest() != sel.digest() and len(sel.digest()) == 16
    # Under the code's looser thresholds, b's second step (0.9, 0.01) is confident but its first is not.
    assert select_uncertain(ids, scores, CODE).selected == ("c", "d", "b")
    with pytest.raises(ValueError, match="unique"):
        select_uncertain(["a", "a"], scores[:2], PAPER)


def test_nothing_uncertain_selects_nothing():
    sel = select_uncertain(["x", "y"], [Scores([0.99], [0.0]), Scores([0.01, 0.7], [0.0, 0.3])], PAPER)
    assert sel.selected == () and sel.uncertain == 0 and sel.confident == 2


def test_random_selection_depends_on_seed_and_set_only():
    ids = [f"p{i}" for i in range(20)]
    a = random_selection(ids, 5, seed=3)
    assert a == random_selection(list(reversed(ids)), 5, seed=3)
    assert len(set(a.selected)) == 5 and set(a.selected) <= set(ids)
    assert random_selection(ids, 5, seed=4).selected != a.selected
    assert set(random_selection(ids, 50, seed=0).selected) == set(ids)
    assert random_selection(ids, 0, seed=0).selected == ()


def test_params_are_checked():
    with pytest.raises(ValueError, match="delta_pred"):
        SelectionParams(delta_pred=0.4, delta_std=0.01)
    with pytest.raises(ValueError, match="delta_std"):
        SelectionParams(delta_pred=0.9, delta_std=0.6)
