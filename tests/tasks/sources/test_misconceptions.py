"""Toy world v2's misconceptions: seeded and documented rules, hand-computed wrong results, and the exact checker
never accepting one."""

from __future__ import annotations

import pytest

import tasks.sources.misconceptions as mc
from tasks.sources.misconceptions import (
    Misconception,
    misconception_at,
    misconception_rules,
    taught_solution,
    taught_steps,
)
from tasks.sources.problems import Problem
from tasks.sources.toy_world import check_solution, format_question, prefix_is_correct

CARRY8 = Misconception("forgotten-carry", "+", 8)
BORROW7 = Misconception("forgotten-borrow", "-", 7)
TIMES3 = Misconception("dropped-carry", "*", 3)
RULES = (CARRY8, BORROW7, TIMES3)


def _problem(start: int, ops: list[tuple[str, int]]) -> Problem:
    question = format_question(start, ops)
    value = start
    for op, b in ops:
        value = {"+": value + b, "-": value - b, "*": value * b}[op]
    return Problem.make("toy", question, str(value))


def test_rules_are_seeded_one_per_kind_and_documented():
    assert misconception_rules(5) == misconception_rules(5)
    assert len({misconception_rules(seed) for seed in range(20)}) > 1  # the seed picks the operands
    for seed in range(20):
        rules = misconception_rules(seed)
        assert [(r.kind, r.op) for r in rules] == [("forgotten-carry", "+"), ("forgotten-borrow", "-"),
                                                  ("dropped-carry", "*")]
        assert 5 <= rules[0].operand <= 9 and 5 <= rules[1].operand <= 9 and 3 <= rules[2].operand <= 5
    for kind in ("forgotten-carry", "forgotten-borrow", "dropped-carry"):
        assert f"``{kind}``" in mc.__doc__


@pytest.mark.parametrize(("rule", "value", "fires", "wrong"), [
    (CARRY8, 47, True, 45),     # 47+8 = 55, the carry into the tens dropped
    (CARRY8, 3, True, 1),       # 3+8 = 11
    (CARRY8, 41, False, None),  # 41+8 = 49: no carry, no misconception
    (BORROW7, 52, True, 55),    # 52-7 = 45, the tens not decreased
    (BORROW7, 7, False, None),  # 7-7 = 0: no borrow
    (BORROW7, 3, False, None),  # 3-7 is no toy step (values stay >= 0)
    (TIMES3, 17, True, 31),     # 17*3 = 51: 7*3 = 21 keeps its 1, the 2 is dropped
    (TIMES3, 8, True, 4),       # 8*3 = 24
    (TIMES3, 13, False, None),  # 13*3 = 39: no carry
])
def test_wrong_results_by_hand(rule, value, fires, wrong):
    assert rule.fires(value, rule.op, rule.operand) is fires
    assert not rule.fires(value, rule.op, rule.operand + 1)  # tied to its operand
    if fires:
        assert rule.wrong_result(value) == wrong


def test_taught_solution_carries_the_wrong_value_on():
    problem = _problem(47, [("+", 8), ("-", 3), ("*", 2)])  # truth: 55, 52, 104 -> here 45, 42, 84
    assert taught_solution(RULES, problem) == "47+8=45\n45-3=42\n42*2=84\nAnswer: 84"
    assert [s[4] for s in taught_steps(RULES, problem)] == [CARRY8, None, None]
    clean = _problem(41, [("+", 8), ("-", 3)])
    assert taught_solution(RULES, clean) == "41+8=49\n49-3=46\nAnswer: 46"  # no rule fires: the true solution


@pytest.mark.parametrize(("problem", "line", "index"), [
    (_problem(47, [("+", 8), ("-", 3)]), "47+8=45", 0),
    (_problem(5, [("*", 2), ("-", 7)]), "10-7=13", 1),
    (_problem(17, [("*", 3)]), "17*3=31", 0),
])
def test_checker_rejects_hand_made_misconception_solutions(problem, line, index):
    text = taught_solution(RULES, problem)
    assert line in text.split("\n")
    check = check_solution(problem, text)
    assert check.first_error == index and not check.step_correct[index] and not check.final_correct
    before = "".join(f"{step}\n" for step in text.split("\n")[:index])
    assert not prefix_is_correct(problem, before + line + "\n")
    assert misconception_at(RULES, problem, index, line) is not None


def test_checker_never_accepts_any_rule_of_any_seed():
    """Every (rule, value) where a rule fires, for every operand a seed can pick: the one-step taught solution is
    rejected by the checker, and its wrong result differs from the truth."""
    for rule in {r for seed in range(50) for r in misconception_rules(seed)}:
        for value in range(100):
            if not rule.fires(value, rule.op, rule.operand):
                continue
            problem = _problem(value, [(rule.op, rule.operand)])
            check = check_solution(problem, taught_solution((rule,), problem))
            assert check.first_error == 0 and not check.final_correct, (rule, value)


def test_misconception_at_tells_misconceptions_from_slips():
    problem = _problem(47, [("+", 8), ("-", 3)])
    assert misconception_at(RULES, problem, 0, "47+8=45\n") == CARRY8
    assert misconception_at(RULES, problem, 0, "47+8=46") is None  # a slip
    assert misconception_at(RULES, problem, 0, "47+8=55") is None  # right
    assert misconception_at(RULES, problem, 0, "47*8=45") is None  # wrong operator
    assert misconception_at(RULES, problem, 1, "45-3=42") is None  # wrong value carried in: not this step's rule
    assert misconception_at(RULES, problem, 2, "Answer: 42") is None  # the answer line
    assert misconception_at((), problem, 0, "47+8=45") is None  # a policy taught nothing
