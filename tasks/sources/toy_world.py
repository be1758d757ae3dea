"""The toy arithmetic world: seeded chain problems whose every solution step can be checked exactly.

A problem is a start value and 2-8 operations applied in order (no precedence), for example::

    Start at 7. Apply in order: +5, *3, -4.

Its canonical solution writes one step per line and ends with an ``Answer:`` line::

    7+5=12
    12*3=36
    36-4=32
    Answer: 32

The canonical solution text ends right after the answer's last digit, with no trailing newline: the
policy is trained to emit EOS there (training text = prompt + solution + EOS). A trailing newline or
trailing blank lines are tolerated by the checkers.

Step truth is exact, so the labels built from rollouts can be *measured* against it: `check_solution`
judges a whole solution line by line, and `prefix_is_correct` judges an arbitrary text prefix (cut
mid-line, mid-number), which is the truth for entropy-cut (EDU) steps.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from configs.schema import ToySource
from tasks.sources.problems import Problem

SOURCE = "toy"
ANSWER_PREFIX = "Answer:"

_QUESTION_RE = re.compile(r"^Start at (\d+)\. Apply in order: ([^.]*)\.$")
_OP_RE = re.compile(r"^([+\-*])(\d+)$")
# Spaces (not tabs) are allowed between pieces: exactly what `_partial_consistent` accepts for prefixes.
_STEP_RE = re.compile(r"^ *(\d+) *([+\-*]) *(\d+) *= *(\d+) *$")
_ANSWER_RE = re.compile(r"^ *Answer: *(-?\d+) *$")


@dataclass(frozen=True)
class Chain:
    """The truth of one toy problem: start value, operations in order, and the value after each one."""

    start: int
    ops: list[tuple[str, int]]
    step_values: list[int]

    @property
    def answer(self) -> int:
        return self.step_values[-1]

    def step_tokens(self, index: int) -> list[str]:
        """The canonical pieces of step line `index`: previous value, operator, operand, '=', value."""
        prev = self.start if index == 0 else self.step_values[index - 1]
        op, operand = self.ops[index]
        return [str(prev), op, str(operand), "=", str(self.step_values[index])]


@dataclass(frozen=True)
class StepCheck:
    """A solution judged line by line against the truth.

    `steps` are the solution's lines (the answer line is the last step), `step_correct` one flag per line,
    `first_error` the index of the first wrong line (ProcessBench convention), -1 when every line is right
    and the answer is there; `len(steps)` when every written line is right but the solution stops before
    its answer line. `final_correct`: the answer extracted from the text equals the problem's answer.
    """

    steps: list[str]
    step_correct: list[bool]
    first_error: int
    final_correct: bool


def apply_op(value: int, op: str, operand: int) -> int:
    """The true result of `value <op> operand` (the one rule of arithmetic the checker knows)."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    raise ValueError(f"unknown operator {op!r}")


def _sample_op(rng: random.Random, value: int, src: ToySource) -> tuple[str, int]:
    """One operation whose result stays in 0..max_value: operator uniform among feasible ones, then operand."""
    choices: dict[str, list[int]] = {
        "+": [b for b in range(1, src.max_operand + 1) if value + b <= src.max_value],
        "-": [b for b in range(1, src.max_operand + 1) if value - b >= 0],
        "*": [m for m in range(2, src.max_multiplier + 1) if value * m <= src.max_value],
    }
    feasible = [op for op in ("+", "-", "*") if choices[op]]
    op = rng.choice(feasible)
    return op, rng.choice(choices[op])


def format_question(start: int, ops: list[tuple[str, int]]) -> str:
    """The question text of a chain: compact (it is tokenized per character) and unambiguous."""
    return f"Start at {start}. Apply in order: " + ", ".join(f"{op}{b}" for op, b in ops) + "."


def generate_problems(src: ToySource) -> list[Problem]:
    """`src.num_problems` distinct chain problems, the same ones for the same `src` (seeded by `src.seed`).

    Start value: 1..min(max_operand, max_value); steps: min_steps..max_steps; `+`/`-` operands
    1..max_operand, multipliers 2..max_multiplier; every intermediate value stays in 0..max_value.
    `meta` holds `start`, `ops` ([[op, operand], ...]) and `step_values`.
    """
    rng = random.Random(src.seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < src.num_problems:
        attempts += 1
        start = rng.randint(1, min(src.max_operand, src.max_value))
        ops: list[tuple[str, int]] = []
        values: list[int] = []
        value = start
        for _ in range(rng.randint(src.min_steps, src.max_steps)):
            op, operand = _sample_op(rng, value, src)
            value = apply_op(value, op, operand)
            ops.append((op, operand))
            values.append(value)
        question = format_question(start, ops)
        # Tiny knob settings may not hold enough distinct problems; accept repeats rather than loop forever.
        if question in seen and attempts < 100 * src.num_problems:
            continue
        seen.add(question)
        problems.append(
            Problem.make(
                source=SOURCE,
                question=question,
                answer=str(value),
                split=src.split,
                start=start,
                ops=[[op, b] for op, b in ops],
                step_values=values,
            )
        )
    return problems


def parse_chain(question: str) -> Chain:
    """The truth of a toy question, read back from its text (so it survives any storage of the Problem)."""
    m = _QUESTION_RE.match(question.strip())
    if not m:
        raise ValueError(f"not a toy-world question: {question!r}")
    start = int(m.group(1))
    ops: list[tuple[str, int]] = []
    for part in m.group(2).split(","):
        om = _OP_RE.match(part.strip())
        if not om:
            raise ValueError(f"bad operation {part!r} in toy question {question!r}")
        ops.append((om.group(1), int(om.group(2))))
    values: list[int] = []
    value = start
    for op, b in ops:
        value = apply_op(value, op, b)
        values.append(value)
    return Chain(start, ops, values)


def canonical_solution(problem: Problem) -> str:
    """One `a<op>b=c` line per step, then `Answer: N`; no trailing newline (the policy emits EOS there)."""
    chain = parse_chain(problem.question)
    lines = ["".join(chain.step_tokens(i)) for i in range(len(chain.ops))]
    lines.append(f"{ANSWER_PREFIX} {chain.answer}")
    return "\n".join(lines)


def extract_answer(text: str) -> str | None:
    """The integer on the first line that starts with `Answer:` (as a string without spaces), else None."""
    for line in text.split("\n"):
        if line.strip().startswith(ANSWER_PREFIX):
            m = _ANSWER_RE.match(line)
            return str(int(m.group(1))) if m else None
    return None


def _solution_lines(text: str) -> list[str]:
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _line_correct(chain: Chain, index: int, line: str) -> bool:
    """Line `index` of a solution: a step line for index < #steps, the answer line at #steps, else extra."""
    n = len(chain.ops)
    if index < n:
        m = _STEP_RE.match(line)
        # Exact string comparison with the canonical pieces also rejects leading zeros ("07").
        return bool(m) and [m.group(1), m.group(2), m.group(3), "=", m.group(4)] == chain.step_tokens(index)
    if index == n:
        m = _ANSWER_RE.match(line)
        return bool(m) and m.group(1) == str(chain.answer)
    return False


def check_solution(problem: Problem, solution_text: str) -> StepCheck:
    """Judge a solution line by line against the exact truth.

    Rules (the solution is split on newlines; trailing blank lines are ignored):
    - line i < number of operations is step i; it is correct iff it parses as `A<op>B=C` (spaces allowed
      between the pieces, integers without leading zeros) with A the true value before step i (the start
      value for i = 0), op and B the true operation and operand of step i, and C the true value after it.
      So a right value reached by a wrong expression is still wrong, as is any unparseable line.
    - line i == number of operations is the answer line: correct iff it reads `Answer: N` with N the answer.
    - any further line is an extra line and wrong.
    - `first_error` is the first wrong line's index, -1 if all lines are right and the answer line is
      present, `len(steps)` if all written lines are right but the text stops before the answer line.
    - `final_correct` is `extract_answer(text) == problem.answer`, whatever the steps (outcome check).
    """
    chain = parse_chain(problem.question)
    lines = _solution_lines(solution_text)
    correct = [_line_correct(chain, i, line) for i, line in enumerate(lines)]
    if False in correct:
        first_error = correct.index(False)
    elif len(lines) <= len(chain.ops):
        first_error = len(lines)
    else:
        first_error = -1
    return StepCheck(
        steps=lines,
        step_correct=correct,
        first_error=first_error,
        final_correct=extract_answer(solution_text) == problem.answer,
    )


def _partial_consistent(pieces: list[str], partial: str, allow_space_after: set[int]) -> bool:
    """Can `partial` be extended to `pieces` joined with optional spaces between them (and at the ends)?

    `allow_space_after` holds the piece indices after which a space may appear; leading spaces are allowed.
    Numbers are pieces, so a space inside a number, or a digit after a finished number, is inconsistent.
    """
    pos = 0
    piece = 0
    offset = 0  # characters of pieces[piece] matched so far
    while pos < len(partial):
        ch = partial[pos]
        if ch == " " and (offset == 0 and (piece == 0 or piece - 1 in allow_space_after)):
            pos += 1
            continue
        if piece >= len(pieces):
            return False
        if ch != pieces[piece][offset]:
            return False
        offset += 1
        pos += 1
        if offset == len(pieces[piece]):
            piece += 1
            offset = 0
    return True


def _partial_line_consistent(chain: Chain, index: int, partial: str) -> bool:
    n = len(chain.ops)
    if index < n:
        pieces = chain.step_tokens(index)
        return _partial_consistent(pieces, partial, set(range(len(pieces))))
    if index == n:
        # "Answer:" is one piece (no spaces inside it); spaces may follow it and the number.
        return _partial_consistent([ANSWER_PREFIX, str(chain.answer)], partial, {0, 1})
    # After the answer only blank text may follow (a trailing newline before EOS is tolerated).
    return not partial.strip()


def prefix_is_correct(problem: Problem, prefix_text: str) -> bool:
    """Truth for an arbitrary text prefix of a solution (cut anywhere, even mid-number).

    True iff every complete line (those followed by a newline) is correct by `check_solution`'s rules and
    the unfinished last line can still be completed into the correct line for its index: the text written
    so far is a prefix of the true line, with optional spaces between pieces (`12*3=3` is consistent with
    `12*3=36`; `12*3=37`, `12*4`, `12*3=360` or `1 2` are not). Past the answer line only blank text is
    consistent. The empty prefix is correct. A prefix that is a complete, correct solution is correct.
    """
    chain = parse_chain(problem.question)
    *complete, partial = prefix_text.split("\n")
    n = len(chain.ops)
    for i, line in enumerate(complete):
        # A blank line after the answer line is the tolerated trailing newline, not an error.
        if i > n and not line.strip():
            continue
        if not _line_correct(chain, i, line):
            return False
    return _partial_line_consistent(chain, len(complete), partial)
