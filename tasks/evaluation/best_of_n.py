"""Best-of-N: pick one of N sampled solutions by a selector; accuracy = the picked answer is right."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tasks.evaluation.scorers import EvaluationError


@dataclass(frozen=True)
class Candidate:
    """One sampled solution: its step scores, the answer extracted from it (None: none) and whether it is right."""

    step_scores: list[float]
    answer: str | None
    correct: bool


Selector = Callable[[Sequence[Candidate], random.Random], int]


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (deterministic)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def select_min_step(cands: Sequence[Candidate], rng: random.Random) -> int:
    """The solution whose weakest step scores highest (ActPRM/Qwen PRM aggregation); no steps scores 0."""
    return _argmax([min(c.step_scores) if c.step_scores else 0.0 for c in cands])


def select_last_step(cands: Sequence[Candidate], rng: random.Random) -> int:
    """The solution whose last step scores highest; no steps scores 0."""
    return _argmax([c.step_scores[-1] if c.step_scores else 0.0 for c in cands])


def select_majority(cands: Sequence[Candidate], rng: random.Random) -> int:
    """The first solution carrying the most frequent extracted answer (self-consistency; no scorer needed).

    Solutions without an answer do not vote; ties go to the answer seen first. None voting: the first one.
    """
    votes = Counter(c.answer for c in cands if c.answer is not None)
    if not votes:
        return 0
    top = max(votes.values())
    winner = next(c.answer for c in cands if c.answer is not None and votes[c.answer] == top)
    return next(i for i, c in enumerate(cands) if c.answer == winner)


def select_random(cands: Sequence[Candidate], rng: random.Random) -> int:
    """A uniformly random solution (the baseline every selector must beat)."""
    return rng.randrange(len(cands))


SELECTORS: dict[str, Selector] = {
    "min_step": select_min_step,
    "last_step": select_last_step,
    "majority": select_majority,
    "random": select_random,
}
SCORE_FREE_SELECTORS = ("majority", "random")


def _select_any_correct(cands: Sequence[Candidate], rng: random.Random) -> int:
    """Not a selector one could run (it reads the truth): the pass@N ceiling every selector sits under."""
    return next((i for i, c in enumerate(cands) if c.correct), 0)


def best_of_n_accuracy(problems: Sequence[Sequence[Candidate]], n: int, selector: Selector, seed: int = 0) -> float:
    """Accuracy of `selector` picking among N solutions, over every problem's disjoint groups of N.

    Problem j's M samples are cut into floor(M/N) groups (samples 0..N-1, N..2N-1, ...); each group counts
    once, so every N uses all samples and the estimate is deterministic. A problem with fewer than N
    samples is an error.
    """
    if n < 1:
        raise EvaluationError(f"N must be >= 1, got {n}")
    rng = random.Random(seed)
    hits = groups = 0
    for j, cands in enumerate(problems):
        if len(cands) < n:
            raise EvaluationError(f"problem {j} has {len(cands)} samples, fewer than N={n}")
        for start in range(0, len(cands) - n + 1, n):
            group = cands[start : start + n]
            hits += group[selector(group, rng)].correct
            groups += 1
    return hits / groups if groups else math.nan


@dataclass
class BestOfNResult:
    """Accuracy vs N per selector: `accuracy[selector][i]` is for `ns[i]`."""

    ns: list[int]
    problems: int
    samples_per_problem: int
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    oracle_any_correct: list[float] = field(default_factory=list)  # pass@N ceiling: some solution is right


def best_of_n(problems: Sequence[Sequence[Candidate]], ns: Sequence[int], selectors: Sequence[str] = tuple(SELECTORS),
              seed: int = 0) -> BestOfNResult:
    """`best_of_n_accuracy` for every selector and N, plus the share of groups where any solution is right."""
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise EvaluationError(f"unknown selector(s) {unknown}; known: {sorted(SELECTORS)}")
    res = BestOfNResult(list(ns), len(problems), min((len(c) for c in problems), default=0))
    for name in selectors:
        res.accuracy[name] = [best_of_n_accuracy(problems, n, SELECTORS[name], seed) for n in ns]
    res.oracle_any_correct = [best_of_n_accuracy(problems, n, _select_any_correct, seed) for n in ns]
    return res
