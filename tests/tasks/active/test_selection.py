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


# -- the reference's trust rule, pseudo-label accuracy, calibration, the draw (issue 35) --------------------------

from tasks.active.selection import (  # noqa: E402
    calibrate_thresholds,
    draw_uncertain,
    gate_stats,
    pseudo_labels,
    pseudo_labels_correct,
)

SURE_RIGHT, SURE_WRONG, UNSURE = (0.99, 0.001), (0.01, 0.001), (0.7, 0.001)


def _traj(*steps: tuple[float, float]) -> Scores:
    return Scores([m for m, _ in steps], [s for _, s in steps])


def test_first_predicted_error_past_an_unsure_step_is_not_trusted():
    # The error is confident, but an unsure step comes before it: the ensemble might be wrong about that step.
    past_unsure = _traj(SURE_RIGHT, UNSURE, SURE_WRONG, SURE_RIGHT)
    # The same steps, the unsure one after the first predicted error: it decides nothing, so trusted.
    after_error = _traj(SURE_RIGHT, SURE_WRONG, UNSURE, SURE_RIGHT)
    # No error predicted: every step matters, and a wide std on the last one makes it uncertain.
    wide_last = _traj(SURE_RIGHT, SURE_RIGHT, (0.99, 0.2))
    assert trajectory_confident(past_unsure.mean, past_unsure.std, CODE) is False
    assert trajectory_confident(after_error.mean, after_error.std, CODE) is True
    assert trajectory_confident(wide_last.mean, wide_last.std, CODE) is False
    assert pseudo_labels(past_unsure.mean) == [1, 1, 0, None]
    assert pseudo_labels(after_error.mean) == [1, 0, None, None]


def test_pseudo_labels_are_right_when_the_first_errors_agree():
    means = [0.99, 0.01, 0.99]
    assert pseudo_labels_correct(means, [True, False, True]) is True      # truth after its first error is moot
    assert pseudo_labels_correct(means, [True, False, False]) is True
    assert pseudo_labels_correct(means, [False, False, True]) is False    # the true error comes earlier
    assert pseudo_labels_correct(means, [True, True, True]) is False      # no true error at all
    assert pseudo_labels_correct([0.99, 0.99], [True, True]) is True      # neither has an error
    assert pseudo_labels_correct(means, [True, None, False]) is False     # unknown step 1: first known error is 2
    assert pseudo_labels_correct(means, [True, None, True]) is True       # only known steps compared: none errs


def test_gate_stats_trusted_share_and_pseudo_label_accuracy():
    scores = [_traj(SURE_RIGHT, SURE_WRONG),            # trusted, pseudo error at 1
              _traj(SURE_RIGHT, SURE_RIGHT),            # trusted, no pseudo error
              _traj(SURE_RIGHT, UNSURE, SURE_WRONG),    # uncertain
              _traj(SURE_WRONG, UNSURE)]                # trusted, pseudo error at 0
    truths = [[True, False], [True, False], [True, True, True], None]
    stats = gate_stats(scores, CODE, truths)
    # 3 of 4 trusted; truth known for 2 of them: the first is right, the second misses the error at step 1.
    assert (stats.scored, stats.trusted, stats.checked, stats.correct) == (4, 3, 2, 1)
    assert stats.trusted_share == 0.75 and stats.pseudo_label_acc == 0.5 and stats.note is None
    none_trusted = gate_stats([scores[2]] * 20 + [scores[0]], CODE)
    assert none_trusted.trusted_share == 1 / 21 and none_trusted.pseudo_label_acc is None
    assert none_trusted.note.startswith("gate is not selecting: it trusts 4.8% of 21 trajectories")


def test_calibrated_gate_hits_its_target_share():
    # Ten trajectories whose least margins and largest stds are all distinct; the paper's preset trusts none.
    scores = [_traj((0.55 + 0.04 * i, 0.002 + 0.003 * (9 - i)), (0.99, 0.001)) for i in range(10)]
    assert gate_stats(scores, PAPER).trusted == 0
    for target, want in ((0.3, 3), (0.5, 5), (0.25, 3), (0.9, 9)):
        cal = calibrate_thresholds(scores, target)
        assert gate_stats(scores, cal.params).trusted == want, target
        assert cal.trusted_share == want / 10
        assert 0.5 < cal.params.delta_pred < 1 and cal.params.delta_std >= 0
    # The three most confident (i = 9, 8, 7): margin >= 0.33 and std <= 0.008.
    cal = calibrate_thresholds(scores, 0.3)
    assert cal.params.delta_pred == pytest.approx(0.5 + 0.05 + 0.04 * 7 - 0.0, abs=1e-6)
    assert cal.params.delta_std == pytest.approx(0.002 + 0.003 * 2, abs=1e-9)
    with pytest.raises(ValueError, match="only 1 of 2 trajectories are scored"):
        calibrate_thresholds([_traj((NAN, NAN)), scores[0]], 0.9)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        calibrate_thresholds(scores, 1.0)


def test_draw_among_the_uncertain_is_seeded_capped_and_order_free():
    ids = [f"p{i}" for i in range(12)]
    scores = [_traj(SURE_RIGHT) if i % 4 == 0 else _traj((0.8, 0.01 * i)) for i in range(12)]  # p0, p4, p8 trusted
    a = draw_uncertain(ids, scores, CODE, 5, seed=7)
    b = draw_uncertain(ids[::-1], scores[::-1], CODE, 5, seed=7)
    assert a.selected == b.selected and len(a.selected) == 5 and (a.uncertain, a.confident) == (9, 3)
    assert not {"p0", "p4", "p8"} & set(a.selected)
    assert draw_uncertain(ids, scores, CODE, 5, seed=8).selected != a.selected
    assert set(draw_uncertain(ids, scores, CODE, None, seed=1).selected) == set(ids) - {"p0", "p4", "p8"}
    groups = [f"q{i % 2}" for i in range(12)]  # two problems
    capped = draw_uncertain(ids, scores, CODE, None, seed=1, groups=groups, per_group=2)
    picked_groups = sorted(groups[ids.index(p)] for p in capped.selected)
    assert picked_groups == ["q0", "q0", "q1", "q1"]
    # By std: the largest std (0.11) is drawn first far more often than the smallest (0.01) over many seeds.
    firsts = [draw_uncertain(ids, scores, CODE, 1, seed=s, weight="std").selected[0] for s in range(400)]
    assert firsts.count("p11") > 3 * firsts.count("p1")
    # Everything uncertain: a uniform draw hits each id about equally often (the random baseline).
    flat = [_traj((0.8, 0.05))] * 12
    counts = {p: 0 for p in ids}
    for s in range(600):
        counts[draw_uncertain(ids, flat, CODE, 1, seed=s).selected[0]] += 1
    assert min(counts.values()) > 20 and max(counts.values()) < 85


def test_draw_by_std_per_token_prefers_the_cheaper_of_equally_unsure_trajectories():
    """``std_per_token``: expected gain (the std) per expected labelling token; two equally unsure trajectories,
    one four times as costly, are drawn first about 4:1; the std still counts; costs must come with that weight."""
    ids, scores = ["cheap", "dear"], [_traj((0.8, 0.05)), _traj((0.8, 0.05))]
    firsts = [draw_uncertain(ids, scores, CODE, 1, seed=s, weight="std_per_token", costs=[400.0, 1600.0]).selected[0]
              for s in range(800)]  # weights ~1e-4: as u ** (1 / w) every key would underflow to 0 and tie
    assert 3.0 < firsts.count("cheap") / firsts.count("dear") < 5.5
    unsure = [_traj((0.8, 0.20)), _traj((0.8, 0.05))]  # 4x the std at 4x the cost: even odds
    even = [draw_uncertain(ids, unsure, CODE, 1, seed=s, weight="std_per_token", costs=[1600.0, 400.0]).selected[0]
            for s in range(800)]
    assert 0.75 < even.count("cheap") / even.count("dear") < 1.33
    blind = [draw_uncertain(ids, unsure, CODE, 1, seed=s, weight="inverse_cost", costs=[1600.0, 400.0]).selected[0]
             for s in range(800)]  # the control ignores the std: the cheap one first about 4:1 again
    assert 3.0 < blind.count("dear") / blind.count("cheap") < 5.5
    with pytest.raises(ValueError, match="costs go with"):
        draw_uncertain(ids, scores, CODE, 1, seed=0, weight="std_per_token")
    with pytest.raises(ValueError, match="positive"):
        draw_uncertain(ids, scores, CODE, 1, seed=0, weight="std_per_token", costs=[1.0, 0.0])


def test_selection_diagnostics_error_shares_and_std_within_margin():
    from tasks.active.selection import selection_diagnostics

    # Four trajectories, truth known for three; two selected (0 and 3, whose truth is unknown).
    scores = [_traj((0.95, 0.30), (0.20, 0.01)),   # margin bin 0.4-0.5: misclassified step has the larger std
              _traj((0.92, 0.02), (0.75, 0.02)),   # bins 0.4-0.5 and 0.2-0.3
              _traj((0.93, 0.05), (0.72, 0.40)),   # bins 0.4-0.5 and 0.2-0.3
              _traj((0.99, 0.0), (0.99, 0.0))]
    truths = [[False, False], [True, True], [True, False], None]
    out = selection_diagnostics(scores, truths, [True, False, False, True])
    assert out["truth_known"] == 3
    assert out["error_share_selected"] == 1.0           # the one selected with known truth has a wrong step
    assert out["error_share_scored"] == pytest.approx(2 / 3)
    by_bin = {tuple(b["margin"]): b for b in out["std_auroc_by_margin"]}
    # Bin 0.4-0.5: steps (0.95, 0.30, wrong: misclassified), (0.92, 0.02), (0.93, 0.05): the misclassified one has
    # the largest std, AUROC 1. Bin 0.2-0.3: (0.75, 0.02, right) and (0.72, 0.40, wrong: misclassified): AUROC 1.
    assert by_bin[(0.4, 0.5)]["steps"] == 3 and by_bin[(0.4, 0.5)]["std_auroc"] == 1.0
    assert by_bin[(0.2, 0.3)]["steps"] == 2 and by_bin[(0.2, 0.3)]["std_auroc"] == 1.0
    # Bin 0.3-0.4 holds (0.20, 0.01, wrong): correctly classified alone, no AUROC; it is left out of the mean.
    assert by_bin[(0.3, 0.4)]["steps"] == 1 and by_bin[(0.3, 0.4)]["std_auroc"] is None
    assert out["std_auroc_within_margin"] == 1.0
    # The spread inverted: the misclassified steps have the smallest std, AUROC 0.
    flipped = [_traj((0.95, 0.01), (0.20, 0.01)), _traj((0.92, 0.30), (0.75, 0.50)),
               _traj((0.93, 0.40), (0.72, 0.02)), scores[3]]
    assert selection_diagnostics(flipped, truths, [False] * 4)["std_auroc_within_margin"] == 0.0
    nothing = selection_diagnostics(scores, [None] * 4, [True] * 4)
    assert nothing["error_share_selected"] is None and nothing["std_auroc_within_margin"] is None
    with pytest.raises(ValueError, match="selection flags"):
        selection_diagnostics(scores, truths, [True])
