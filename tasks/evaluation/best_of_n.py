"""Best-of-N: pick one of N sampled solutions by a selector; accuracy = the picked answer is right."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tasks.evaluation.metrics import bootstrap_ci
from tasks.evaluation.scorers import EvaluationError


@dataclass(frozen=True)
class Candidate:
    """One sampled solution: its step scores, the answer extracted from it (None: none) and whether it is right."""

    step_scores: list[float]
    answer: str | None
    correct: bool


Selector = Callable[[Sequence[Candidate], random.Random], int]


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (deterministic). NaN ranks below every number, so a
    NaN never wins unless every value is NaN (then the first)."""
    best = 0
    for i, v in enumerate(values):
        if not math.isnan(v) and (math.isnan(values[best]) or v > values[best]):
            best = i
    return best


def _aggregate(step_scores: Sequence[float], how: Callable[[Sequence[float]], float]) -> float:
    """A candidate's score from its steps: NaN when it has no step or any step is NaN (unscored, e.g. past the
    context), so such a candidate never wins over a fully scored one (see `_argmax`)."""
    if not step_scores or any(math.isnan(s) for s in step_scores):
        return math.nan
    return how(step_scores)


def select_min_step(cands: Sequence[Candidate], rng: random.Random) -> int:
    """The solution whose weakest step scores highest (ActPRM/Qwen PRM aggregation)."""
    return _argmax([_aggregate(c.step_scores, min) for c in cands])


def select_last_step(cands: Sequence[Candidate], rng: random.Random) -> int:
    """The solution whose last step scores highest."""
    return _argmax([_aggregate(c.step_scores, lambda s: s[-1]) for c in cands])


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


def best_of_n_hits(problems: Sequence[Sequence[Candidate]], n: int, selector: Selector, seed: int = 0
                   ) -> list[tuple[int, int]]:
    """Per problem: (groups whose pick was right, groups), picking among disjoint groups of N solutions.

    Problem j's M samples are cut into floor(M/N) groups (samples 0..N-1, N..2N-1, ...); each group counts
    once, so every N uses all samples and the estimate is deterministic. A problem with fewer than N
    samples is an error.
    """
    if n < 1:
        raise EvaluationError(f"N must be >= 1, got {n}")
    rng = random.Random(seed)
    out = []
    for j, cands in enumerate(problems):
        if len(cands) < n:
            raise EvaluationError(f"problem {j} has {len(cands)} samples, fewer than N={n}")
        hits = groups = 0
        for start in range(0, len(cands) - n + 1, n):
            group = cands[start : start + n]
            hits += group[selector(group, rng)].correct
            groups += 1
        out.append((hits, groups))
    return out


def hit_rate(per_problem: Sequence[tuple[int, int]]) -> float:
    """Right picks over groups, summed over problems (NaN with no group)."""
    groups = sum(g for _, g in per_problem)
    return sum(h for h, _ in per_problem) / groups if groups else math.nan


def best_of_n_accuracy(problems: Sequence[Sequence[Candidate]], n: int, selector: Selector, seed: int = 0) -> float:
    """Accuracy of `selector` picking among N solutions, over every problem's disjoint groups of N."""
    return hit_rate(best_of_n_hits(problems, n, selector, seed))


@dataclass
class BestOfNResult:
    """Accuracy vs N per selector: `accuracy[selector][i]` is for `ns[i]`."""

    ns: list[int]
    problems: int
    samples_per_problem: int
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    oracle_any_correct: list[float] = field(default_factory=list)  # pass@N ceiling: some solution is right
    # 95% bootstrap intervals over problems: ci[selector][i] = [lo, hi] for ns[i]; diff_vs_majority[selector][i]
    # is the paired interval of (selector - majority) on the same resampled problems: above majority "outside
    # the CI" means its lo > 0.
    ci: dict[str, list[list[float]]] = field(default_factory=dict)
    diff_vs_majority: dict[str, list[list[float]]] = field(default_factory=dict)


def best_of_n(problems: Sequence[Sequence[Candidate]], ns: Sequence[int], selectors: Sequence[str] = tuple(SELECTORS),
              seed: int = 0, n_boot: int = 1000) -> BestOfNResult:
    """Accuracy for every selector and N with bootstrap intervals over problems, plus the pass@N ceiling."""
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise EvaluationError(f"unknown selector(s) {unknown}; known: {sorted(SELECTORS)}")
    res = BestOfNResult(list(ns), len(problems), min((len(c) for c in problems), default=0))
    hits = {name: [best_of_n_hits(problems, n, SELECTORS[name], seed) for n in ns] for name in selectors}
    for name in selectors:
        res.accuracy[name] = [hit_rate(h) for h in hits[name]]
        res.ci[name] = [list(bootstrap_ci(h, hit_rate, n_boot=n_boot, seed=seed)) for h in hits[name]]
        if "majority" in hits and name != "majority":
            res.diff_vs_majority[name] = [
                list(bootstrap_ci(list(zip(h, m, strict=True)), _paired_diff, n_boot=n_boot, seed=seed))
                for h, m in zip(hits[name], hits["majority"], strict=True)]
    res.oracle_any_correct = [best_of_n_accuracy(problems, n, _select_any_correct, seed) for n in ns]
    return res


def _paired_diff(pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]]) -> float:
    return hit_rate([a for a, _ in pairs]) - hit_rate([b for _, b in pairs])
