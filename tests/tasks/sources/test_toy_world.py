"""The toy world: seeded generation, canonical solutions, and the exact step truth (whole solutions and prefixes)."""

from __future__ import annotations

import pytest

from configs.schema import ToySource
from tasks.sources.problems import Problem
from tasks.sources.toy_world import (
    canonical_solution,
    check_solution,
    extract_answer,
    format_question,
    generate_problems,
    parse_chain,
    prefix_is_correct,
)

# Start at 7. Apply in order: +5, *3, -4.  ->  12, 36, 32
PROBLEM = Problem.make(source="toy", question=format_question(7, [("+", 5), ("*", 3), ("-", 4)]), answer="32")
CANONICAL = "7+5=12\n12*3=36\n36-4=32\nAnswer: 32"


def test_same_seed_same_problems_different_seed_different() -> None:
    src = ToySource(num_problems=50, seed=3)
    a, b = generate_problems(src), generate_problems(src)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    c = generate_problems(src.model_copy(update={"seed": 4}))
    assert [p.question for p in a] != [p.question for p in c]
    assert len({p.problem_id for p in a}) == 50  # distinct problems, stable ids


def test_problem_record_fields() -> None:
    p = generate_problems(ToySource(num_problems=1, seed=0, split="dev"))[0]
    assert p.source == "toy" and p.split == "dev"
    chain = parse_chain(p.question)
    assert p.meta["start"] == chain.start
    assert [tuple(op) for p_op in [p.meta["ops"]] for op in p_op] == chain.ops
    assert p.meta["step_values"] == chain.step_values
    assert p.answer == str(chain.step_values[-1])


@pytest.mark.parametrize(
    "knobs",
    [
        {"min_steps": 2, "max_steps": 8},
        {"min_steps": 3, "max_steps": 3, "max_value": 20, "max_operand": 3, "max_multiplier": 2},
        {"min_steps": 1, "max_steps": 12, "max_value": 500, "max_operand": 50, "max_multiplier": 9},
    ],
)
def test_knobs_respected(knobs: dict) -> None:
    src = ToySource(num_problems=300, seed=11, **knobs)
    problems = generate_problems(src)
    assert len(problems) == 300
    lengths = set()
    for p in problems:
        chain = parse_chain(p.question)
        lengths.add(len(chain.ops))
        assert src.min_steps <= len(chain.ops) <= src.max_steps
        assert 1 <= chain.start <= src.max_operand
        assert all(0 <= v <= src.max_value for v in chain.step_values)
        for op, b in chain.ops:
            if op == "*":
                assert 2 <= b <= src.max_multiplier
            else:
                assert 1 <= b <= src.max_operand
    assert lengths == set(range(src.min_steps, src.max_steps + 1))  # every length occurs
    ops = {op for p in problems for op, _ in parse_chain(p.question).ops}
    assert ops == {"+", "-", "*"}


def test_question_and_canonical_solution_format() -> None:
    assert PROBLEM.question == "Start at 7. Apply in order: +5, *3, -4."
    assert canonical_solution(PROBLEM) == CANONICAL  # no trailing newline: EOS follows the answer
    assert parse_chain(PROBLEM.question).step_values == [12, 36, 32]


def test_canonical_solutions_check_all_correct() -> None:
    for p in generate_problems(ToySource(num_problems=200, seed=5, max_steps=8)):
        sol = canonical_solution(p)
        check = check_solution(p, sol)
        assert check.first_error == -1 and check.final_correct and all(check.step_correct)
        assert len(check.steps) == len(p.meta["ops"]) + 1
        assert extract_answer(sol) == p.answer
        assert check_solution(p, sol + "\n").first_error == -1  # a trailing newline is tolerated


@pytest.mark.parametrize(
    ("text", "step_correct", "first_error", "final_correct"),
    [
        ("7+5=13\n13*3=39\n39-4=35\nAnswer: 35", [False, False, False, False], 0, False),  # error at step 0
        ("7+5=12\n12*3=35\n35-4=31\nAnswer: 31", [True, False, False, False], 1, False),  # middle step
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 33", [True, True, True, False], 3, False),  # answer line
        ("7+5=12\n12*3=36\n36-4=31\nAnswer: 32", [True, True, False, True], 2, True),  # right answer, wrong step
        ("7+5=12\n12 times 3 is 36\n36-4=32\nAnswer: 32", [True, False, True, True], 1, True),  # unparseable
        ("7+5=12\n12*3=36\n36-4=32", [True, True, True], 3, False),  # missing answer: stops early
        ("7+5=12\n12*3=36\nAnswer: 36", [True, True, False], 2, False),  # skipped step: answer line too early
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 32\n1+1=2", [True, True, True, True, False], 4, True),  # extra line
        ("7+5=12\n12*3=36\n36-4=32\n\nAnswer: 32", [True, True, True, False, False], 3, True),  # blank line
        ("7+6=12\n12*3=36\n36-4=32\nAnswer: 32", [False, True, True, True], 0, True),  # right value, wrong operand
        ("7*5=12\n12*3=36\n36-4=32\nAnswer: 32", [False, True, True, True], 0, True),  # wrong operator
        ("6+5=12\n12*3=36\n36-4=32\nAnswer: 32", [False, True, True, True], 0, True),  # wrong previous value
        ("7+5=012\n12*3=36\n36-4=32\nAnswer: 32", [False, True, True, True], 0, True),  # leading zero
        ("7 + 5 = 12\n 12*3=36 \n36-4=32\nAnswer:32", [True, True, True, True], -1, True),  # spaces are fine
        ("", [], 0, False),  # nothing written
    ],
)
def test_check_solution_wrong_solutions(
    text: str, step_correct: list[bool], first_error: int, final_correct: bool
) -> None:
    check = check_solution(PROBLEM, text)
    assert check.step_correct == step_correct
    assert check.first_error == first_error
    assert check.final_correct is final_correct
    assert len(check.steps) == len(step_correct)


def test_extract_answer() -> None:
    assert extract_answer(CANONICAL) == "32"
    assert extract_answer("1+1=2\nAnswer:  042 \n") == "42"
    assert extract_answer("1+1=2\nAnswer: -3") == "-3"
    assert extract_answer("1+1=2\nAnswer: 2\nAnswer: 3") == "2"  # the first answer line counts
    assert extract_answer("1+1=2\nAnswer: two") is None
    assert extract_answer("1+1=2\nAnswer:") is None
    assert extract_answer("1+1=2") is None


def test_every_prefix_of_the_canonical_solution_is_correct() -> None:
    for p in [PROBLEM, *generate_problems(ToySource(num_problems=100, seed=9, max_steps=8))]:
        sol = canonical_solution(p)
        for cut in range(len(sol) + 1):
            assert prefix_is_correct(p, sol[:cut]), (p.question, sol[:cut])
        assert prefix_is_correct(p, sol + "\n")


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", True),
        ("7", True),
        ("7+", True),
        ("7-", False),  # wrong operator, mid-expression
        ("7*", False),
        ("8", False),  # wrong previous value
        ("71", False),  # digit after the finished number 7
        ("7+5", True),
        ("7+55", False),  # operand too long
        ("7+6", False),
        ("7+5=", True),
        ("7+5=1", True),  # mid-number, a prefix of 12
        ("7+5=12", True),
        ("7+5=13", False),
        ("7+5=120", False),  # longer than the true value
        ("7+5=2", False),
        ("7+5=12 ", True),  # trailing space, line can still end
        ("7+5=1 2", False),  # space inside a number
        ("7 + 5 = 1", True),  # spaces between pieces
        ("  7+5", True),  # leading spaces
        ("7+5=12\n", True),  # empty partial line
        ("7+5=13\n", False),  # wrong complete line
        ("7+5=13\n13", False),  # wrong complete line, consistent-looking continuation
        ("7+5=12\n1", True),
        ("7+5=12\n12*", True),
        ("7+5=12\n12+", False),
        ("7+5=12\n13", False),
        ("7+5=12\n12*3=3", True),
        ("7+5=12\n12*3=37", False),
        ("7+5=12\n12*3=36\n36-4=32\n", True),
        ("7+5=12\n12*3=36\n36-4=32\nA", True),
        ("7+5=12\n12*3=36\n36-4=32\nAns", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer:", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: ", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 3", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer:3", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 32", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 33", False),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 320", False),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 32\n", True),  # trailing newline before EOS
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 32\n\n", True),
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 32\n1", False),  # extra text after the answer
        ("7+5=12\n12*3=36\n36-4=32\nAnswer: 32\n\n1", False),
        ("7+5=12\n12*3=36\nA", False),  # answer line started one step too early
        ("7+5=12\n12*3=36\n36-4=32\n3", False),  # a 4th step line where the answer belongs
        ("7+5=12\n\n", False),  # blank line in place of step 1
        ("Answer", False),
        ("x", False),
    ],
)
def test_prefix_is_correct_hand_made(prefix: str, expected: bool) -> None:
    assert prefix_is_correct(PROBLEM, prefix) is expected


def test_prefix_truth_agrees_with_check_solution_on_complete_texts() -> None:
    """A finished text's prefix truth is 'no written line is wrong' (incomplete solutions included)."""
    texts = [
        CANONICAL,
        "7+5=13\n13*3=39\n39-4=35\nAnswer: 35",
        "7+5=12\n12*3=35\n35-4=31\nAnswer: 31",
        "7+5=12\n12*3=36\n36-4=32\nAnswer: 33",
        "7+5=12\n12*3=36\n36-4=32",
        "7+5=12\n12*3=36\n36-4=32\nAnswer: 32\n1+1=2",
    ]
    for text in texts:
        check = check_solution(PROBLEM, text)
        assert prefix_is_correct(PROBLEM, text) is all(check.step_correct)
        # Once a prefix is wrong, every longer prefix stays wrong.
        truth = [prefix_is_correct(PROBLEM, text[:cut]) for cut in range(len(text) + 1)]
        assert truth == sorted(truth, reverse=True)


def test_prefix_wrong_exactly_from_the_first_wrong_character() -> None:
    text = "7+5=12\n12*3=38\n38-4=34\nAnswer: 34"
    first_bad = text.index("38")  # "3" is a prefix of 36; "38" is not
    assert prefix_is_correct(PROBLEM, text[: first_bad + 1])
    assert not prefix_is_correct(PROBLEM, text[: first_bad + 2])


def test_not_a_toy_question_raises() -> None:
    bad = Problem.make(source="toy", question="What is 2+2?", answer="4")
    with pytest.raises(ValueError, match="not a toy-world question"):
        check_solution(bad, "Answer: 4")
