"""Hard / soft / ER-PRM (arXiv 2412.11006) step labels against hand-computed values and their limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.labelling.label_rule import er_label, hard_label, soft_label, step_labels

# (1/η) ln(1 - k/N + (k/N) e^η), worked by hand:
ER_1_2_ETA1 = 0.6201145069582775  # ln((1 + e) / 2)
ER_3_4_ETA1 = 0.8279889392428698  # ln(1/4 + 3e/4)
ER_1_4_ETA1 = 0.35737401950878844  # ln(3/4 + e/4)
ER_8_16_ETA10 = 0.9306898218339272  # ln(1/2 + e^10 / 2) / 10


def test_hard_and_soft_hand_values():
    assert hard_label(0, 16) is False
    assert hard_label(1, 16) is True
    assert soft_label(3, 4) == 0.75
    assert soft_label(0, 4) == 0.0
    assert isinstance(soft_label(1, 3), float)


def test_er_hand_values():
    assert er_label(1, 2, 1.0) == pytest.approx(ER_1_2_ETA1, abs=1e-15)
    assert er_label(3, 4, 1.0) == pytest.approx(ER_3_4_ETA1, abs=1e-15)
    assert er_label(1, 4, 1.0) == pytest.approx(ER_1_4_ETA1, abs=1e-15)
    assert er_label(8, 16, 10.0) == pytest.approx(ER_8_16_ETA10, abs=1e-15)
    assert er_label(1, 2, 1) == pytest.approx(ER_1_2_ETA1, abs=1e-15)  # an int eta is fine


@pytest.mark.parametrize("eta", [1e-12, 1e-9, 0.1, 0.999999, 1.0, 10.0, 1000.0, 1e6, math.inf])
def test_er_ends_are_exact(eta):
    assert er_label(0, 16, eta) == 0.0
    assert er_label(16, 16, eta) == 1.0
    assert er_label(1, 1, eta) == 1.0


@pytest.mark.parametrize("eta", [1000.0, 1e6, 1e300])
def test_er_huge_eta_is_finite(eta):
    with np.errstate(over="raise", invalid="raise"):  # no overflow, no NaN, anywhere
        out = er_label(np.arange(17), 16, eta)
    assert np.all(np.isfinite(out)) and np.all((out >= 0) & (out <= 1))
    assert out[0] == 0.0 and out[-1] == 1.0


def test_er_large_eta_asymptote():
    # k > 0: ER = 1 + ln(k/N)/η + O(e^-η/η)
    assert er_label(8, 16, 1000.0) == pytest.approx(0.9993068528194401, abs=1e-15)
    assert er_label(8, 16, 1e6) == pytest.approx(1 + math.log(0.5) / 1e6, abs=1e-15)


def test_er_tends_to_soft_as_eta_to_zero():
    k = np.arange(17)
    np.testing.assert_allclose(er_label(k, 16, 1e-9), k / 16, atol=1e-6)
    np.testing.assert_allclose(er_label(k, 16, 1e-9), k / 16, atol=1e-9)  # much closer than asked


def test_er_tends_to_hard_as_eta_to_infinity():
    out = er_label(np.arange(17), 16, 1e4)
    assert out[0] == 0.0
    assert np.all(out[1:] >= 0.999)
    np.testing.assert_array_equal(er_label(np.arange(17), 16, math.inf), (np.arange(17) > 0).astype(float))


def test_er_between_soft_and_hard_and_monotone_in_eta():
    k = np.arange(33)
    soft = soft_label(k, 32)
    hard = hard_label(k, 32).astype(float)
    prev = soft
    for eta in [0.01, 0.1, 0.5, 0.99, 1.0, 1.01, 2.0, 10.0, 100.0]:
        er = er_label(k, 32, eta)
        assert np.all(er >= soft - 1e-15) and np.all(er <= hard + 1e-15)
        assert np.all(er >= prev - 1e-15)
        prev = er


def test_er_continuous_across_the_formula_switch():
    # small-η and large-η forms meet at η = 1
    assert er_label(5, 16, 1.0 - 1e-12) == pytest.approx(er_label(5, 16, 1.0), abs=1e-11)


def test_vectorised_shapes_and_broadcast():
    k = np.array([[0, 1], [2, 4]])
    out = er_label(k, 4, 1.0)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0.0, ER_1_4_ETA1], [er_label(2, 4, 1.0), 1.0]], atol=1e-15)
    np.testing.assert_array_equal(hard_label(k, np.array([4, 4])), [[False, True], [True, True]])
    np.testing.assert_allclose(soft_label([1, 3], [2, 4]), [0.5, 0.75])
    assert er_label(np.array([], dtype=int), 4, 1.0).shape == (0,)


@pytest.mark.parametrize(
    ("k", "n", "match"),
    [(5, 4, "0 <= k <= N"), (-1, 4, "0 <= k <= N"), (0, 0, "N"), (1.5, 4, "whole"), ([1, 2], [3, 4, 5], "broadcast")],
)
def test_count_validation(k, n, match):
    for fn in (hard_label, soft_label, lambda a, b: er_label(a, b, 1.0)):
        with pytest.raises(ValueError, match=match):
            fn(k, n)


@pytest.mark.parametrize("eta", [0.0, -1.0, math.nan, "1", None, True])
def test_eta_validation(eta):
    with pytest.raises(ValueError, match="eta"):
        er_label(1, 2, eta)


# -- step_labels: the one rule ---------------------------------------------------------------------------------


def test_sampled_steps_get_all_three_labels_from_their_counts():
    out = step_labels([3, 1, 0], [4, 4, 4], ["rollout", "tree", "rollout"], 1.0)
    assert out.hard_list() == [True, True, False]
    assert out.soft_list() == [0.75, 0.25, 0.0]
    assert out.er_list() == pytest.approx([ER_3_4_ETA1, ER_1_4_ETA1, 0.0], abs=1e-15)
    assert out.valued.tolist() == [True, True, True]
    assert all(type(x) is bool for x in out.hard_list()) and all(type(x) is float for x in out.er_list())


def test_final_step_is_the_given_outcome_not_its_counts():
    # counts 3/4 but the answer is wrong: the outcome decides, soft = ER = 0.0
    out = step_labels([3, 3], [4, 4], ["rollout", "final"], 10.0, [None, False])
    assert out.hard_list() == [True, False]
    assert out.soft_list() == [0.75, 0.0] and out.er_list()[1] == 0.0
    assert step_labels([0], [0], ["final"], 1.0, [True]).er_list() == [1.0]  # N = 0 is fine for the outcome


def test_unsampled_steps_keep_a_hard_label_and_no_soft_or_er():
    out = step_labels([1, 0, 2], [3, 1, 4], ["early_stop", "estimated", "estimated"], 1.0, [None, True, False])
    assert out.hard_list() == [True, True, False]  # early stop: 1[k > 0]; estimated: the rule's verdict
    assert out.soft_list() == [None, None, None] and out.er_list() == [None, None, None]
    assert out.valued.tolist() == [False, False, False] and np.isnan(out.er).all()


def test_one_call_labels_mixed_origins_and_empty_input():
    out = step_labels([1, 3, 0, 1], [2, 4, 1, 1], ["early_stop", "rollout", "estimated", "final"], 1.0,
                      [None, None, True, True])
    assert out.hard_list() == [True, True, True, True]
    assert out.soft_list() == [None, 0.75, None, 1.0]
    assert out.er_list() == [None, pytest.approx(ER_3_4_ETA1, abs=1e-15), None, 1.0]
    empty = step_labels([], [], [], 1.0)
    assert empty.hard_list() == [] and empty.er_list() == []


def test_given_hard_labels_as_a_bool_array():
    out = step_labels(np.array([0, 1], np.int32), np.array([4, 1], np.int32), np.array(["rollout", "final"], object),
                      2.0, np.array([True, False]))
    assert out.hard_list() == [False, False]  # the rollout step ignores the given True; the outcome is False


@pytest.mark.parametrize(("args", "match"), [
    (([1, 2], [4], ["rollout", "rollout"], 1.0), "differ in length: 2, 1 and 2"),
    (([1], [4], ["rollout"], 0.0), "eta"),
    (([1], [4], ["tree_leaves"], 1.0), "step 0: unknown step origin 'tree_leaves'"),
    (([1, 0], [4, 0], ["rollout", "tree"], 1.0), r"step 1: a 'tree' step needs rollouts >= 1, got 0"),
    (([5], [4], ["early_stop"], 1.0), r"step 0: need 0 <= k <= N, got \(k, N\) = \(5, 4\)"),
    (([1, 1], [1, 1], ["rollout", "final"], 1.0), "step 1: a 'final' step needs its given hard label"),
    (([1], [1], ["estimated"], 1.0, [None]), "step 0: a 'estimated' step needs its given hard label"),
    (([1], [1], ["rollout"], 1.0, [True, True]), "given_hard has 2 entries for 1 steps"),
])
def test_step_labels_refuses_what_the_rule_cannot_label(args, match):
    with pytest.raises(ValueError, match=match):
        step_labels(*args)
