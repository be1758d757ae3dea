"""Confident misconceptions of the toy world v2: systematic wrong rules a policy is taught on purpose.

In toy world v1 the policy's only errors are sampling slips (an unlikely digit drawn at temperature 1), so its
own token confidence nearly finds every error. A v2 policy is trained on text where a few seeded rules are
*consistently* wrong, so it learns them with high probability and makes errors it is sure of (issue 21).

The rules are the classic column-arithmetic mistakes, each tied to one operand chosen by the seed:

- ``forgotten-carry`` (``+d``): when the units digits carry (``value % 10 + d >= 10``), the carry into the tens
  is dropped: ``value + d - 10`` (``47+8=45`` instead of 55).
- ``forgotten-borrow`` (``-d``): when the units digit must borrow (``value % 10 < d <= value``), the tens are
  not decreased: ``value - d + 10`` (``52-7=55`` instead of 45).
- ``dropped-carry`` (``*m``): when the units product carries (``(value % 10) * m >= 10``), only its units digit
  is kept: ``(value // 10) * m * 10 + (value % 10) * m % 10`` (``17*3=31`` instead of 51).

`misconception_rules(seed)` picks one operand per rule: ``+d`` and ``-d`` with d in 5..9, ``*m`` with m in 3..5
(operands where the rule fires often enough to be learned, not so often that it swamps the slips). A wrong
result always differs from the true one (the dropped carry or borrow is at least 10), so the exact checker,
`tasks.sources.toy_world.check_solution`, which knows only the true rules, never accepts one.

`taught_solution` is the training text of a v2 policy: the chain computed with the rules applied wherever they
fire, every later step continuing from the taught (wrong) value, and the answer line its end value.
`misconception_at` tells whether a written step line is a rule's wrong result (used to classify errors).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tasks.sources.problems import Problem
from tasks.sources.toy_world import ANSWER_PREFIX, apply_op, parse_chain

Rules = tuple["Misconception", ...]

_STEP_RE = re.compile(r"^ *(-?\d+) *([+\-*]) *(\d+) *= *(-?\d+) *$")


@dataclass(frozen=True)
class Misconception:
    """One systematic wrong rule: `kind` applied to operation `op` with operand `operand`."""

    kind: str  # "forgotten-carry" | "forgotten-borrow" | "dropped-carry"
    op: str
    operand: int

    def fires(self, value: int, op: str, operand: int) -> bool:
        """Does the rule change the result of `value <op> operand`?"""
        if op != self.op or operand != self.operand or value < 0:
            return False
        if self.kind == "forgotten-carry":
            return value % 10 + operand >= 10
        if self.kind == "forgotten-borrow":
            return value % 10 < operand <= value
        if self.kind == "dropped-carry":
            return (value % 10) * operand >= 10
        raise ValueError(f"unknown misconception kind {self.kind!r}")

    def wrong_result(self, value: int) -> int:
        """The rule's result of `value <op> operand` (only meaningful where `fires`)."""
        if self.kind == "forgotten-carry":
            return value + self.operand - 10
        if self.kind == "forgotten-borrow":
            return value - self.operand + 10
        if self.kind == "dropped-carry":
            return (value // 10) * self.operand * 10 + (value % 10) * self.operand % 10
        raise ValueError(f"unknown misconception kind {self.kind!r}")


def misconception_rules(seed: int) -> tuple[Misconception, ...]:
    """The seeded rule set: one operand each for the forgotten carry (+), forgotten borrow (-), dropped carry (*)."""
    rng = random.Random(seed)
    return (
        Misconception("forgotten-carry", "+", rng.choice(range(5, 10))),
        Misconception("forgotten-borrow", "-", rng.choice(range(5, 10))),
        Misconception("dropped-carry", "*", rng.choice(range(3, 6))),
    )


def taught_result(rules: Rules, value: int, op: str, operand: int) -> tuple[int, Misconception | None]:
    """The result a policy taught `rules` writes for `value <op> operand`, and the rule that fired (or None)."""
    for rule in rules:
        if rule.fires(value, op, operand):
            return rule.wrong_result(value), rule
    return apply_op(value, op, operand), None


def taught_steps(rules: Rules, problem: Problem) -> list[tuple[int, str, int, int, Misconception | None]]:
    """The taught chain: (value before, op, operand, value after, rule that fired) per step."""
    chain = parse_chain(problem.question)
    value, steps = chain.start, []
    for op, operand in chain.ops:
        after, rule = taught_result(rules, value, op, operand)
        steps.append((value, op, operand, after, rule))
        value = after
    return steps


def taught_solution(rules: Rules, problem: Problem) -> str:
    """The solution text as taught: like `canonical_solution`, with every firing rule's wrong result carried on."""
    steps = taught_steps(rules, problem)
    lines = [f"{a}{op}{b}={c}" for a, op, b, c, _ in steps]
    end = steps[-1][3] if steps else parse_chain(problem.question).start
    return "\n".join(lines + [f"{ANSWER_PREFIX} {end}"])


def misconception_at(rules: Rules, problem: Problem, index: int, line: str) -> Misconception | None:
    """The rule whose wrong result step line `index` writes, given the right value before it, else None.

    A line matches when it reads `A<op>B=C` with A the true value before step `index`, op and B the true
    operation, a rule firing there and C that rule's wrong result. Anything else (a slip, an answer line, a
    line past the steps) is None.
    """
    chain = parse_chain(problem.question)
    if not 0 <= index < len(chain.ops):
        return None
    m = _STEP_RE.match(line.rstrip("\n"))
    if not m:
        return None
    prev = chain.start if index == 0 else chain.step_values[index - 1]
    op, operand = chain.ops[index]
    if (m.group(1), m.group(2), m.group(3)) != (str(prev), op, str(operand)):
        return None
    result, rule = taught_result(rules, prev, op, operand)
    return rule if rule is not None and m.group(4) == str(result) else None
