"""Evaluating a step scorer: ProcessBench's official metric, step AUROC against exact truth, best-of-N.

Every function takes any `StepScorer`: the trained PRM (`tasks.prm_model.LoadedPRM`), or the reference
scorers in `tasks.ruler` (an oracle from the exact toy truth and a constant), which check this code
independently of any training.

- ProcessBench (arXiv 2412.06559): the predicted label of a sample is the index of the first step whose
  score is below the threshold (0.5), else -1. Per subset: accuracy on the erroneous samples (exact index
  match), accuracy on the correct ones (predicted -1), F1 = their harmonic mean; in percent, as the official
  script and the published tables report them.
- Step AUROC: the probability that a truly correct step scores above a truly wrong one, ties counting 1/2
  (the Mann-Whitney U statistic over P*N pairs, computed from average ranks).
- Best-of-N: pick one of N sampled solutions by a selector; accuracy = the picked answer is right.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

PROCESSBENCH_SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")
PROCESSBENCH_FIELDS = ("id", "generator", "problem", "steps", "final_answer_correct", "label")
DEFAULT_THRESHOLD = 0.5


class EvaluationError(ValueError):
    """Input an evaluation cannot use (missing file, bad row, overlap with training data); says which."""


class ScoresLike(Protocol):
    """Per-step scores of one sample: `mean` (one per scored step), `std`, and whether steps were cut off."""

    mean: list[float]
    std: list[float]
    truncated: bool


@runtime_checkable
class StepScorer(Protocol):
    """Anything that scores steps: `score(prompts, completions)` gives one ScoresLike per prompt.

    `completions[i]` is the list of step texts of sample i; the scores of sample i cover its steps in order.
    A scorer whose model context cannot hold every step sets `truncated` and returns fewer scores.
    """

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 16) -> list[ScoresLike]: ...


# -- ProcessBench ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessBenchSample:
    """One ProcessBench row: `label` is the first wrong step's index, -1 when every step is right."""

    id: str
    generator: str
    problem: str
    steps: list[str]
    final_answer_correct: bool
    label: int


def load_processbench(path: str | Path) -> list[ProcessBenchSample]:
    """One subset file (a JSON array). A malformed row raises EvaluationError naming its index and field."""
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"ProcessBench file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{p} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise EvaluationError(f"{p}: expected a JSON array of samples, got {type(data).__name__}")
    samples = []
    for i, row in enumerate(data):
        missing = [f for f in PROCESSBENCH_FIELDS if not isinstance(row, dict) or f not in row]
        if missing:
            raise EvaluationError(f"{p} row {i}: missing field(s) {missing}")
        steps, label = row["steps"], row["label"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise EvaluationError(f"{p} row {i} (id {row['id']!r}): 'steps' must be a non-empty list of strings")
        if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
            raise EvaluationError(f"{p} row {i} (id {row['id']!r}): label {label!r} is not -1 or a step index "
                                  f"below {len(steps)}")
        samples.append(ProcessBenchSample(str(row["id"]), str(row["generator"]), str(row["problem"]), list(steps),
                                          bool(row["final_answer_correct"]), label))
    return samples


def balanced_limit(samples: Sequence[ProcessBenchSample], limit: int | None) -> list[ProcessBenchSample]:
    """At most `limit` samples: the first ceil(limit/2) erroneous and floor(limit/2) correct ones in file
    order (topped up from the other class when one runs short), so both accuracies stay defined on CPU runs."""
    if limit is None or limit >= len(samples):
        return list(samples)
    if limit < 1:
        raise EvaluationError(f"limit must be >= 1, got {limit}")
    wrong = [s for s in samples if s.label != -1]
    right = [s for s in samples if s.label == -1]
    n_wrong = min(len(wrong), (limit + 1) // 2)
    n_right = min(len(right), limit - n_wrong)
    n_wrong = min(len(wrong), limit - n_right)
    keep = {id(s) for s in wrong[:n_wrong] + right[:n_right]}
    return [s for s in samples if id(s) in keep]


def first_error_index(step_scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> int:
    """ProcessBench's prediction: the index of the first step scoring below `threshold`, else -1."""
    for i, s in enumerate(step_scores):
        if s < threshold:
            return i
    return -1


@dataclass
class ProcessBenchResult:
    """One subset's figures (accuracies and F1 in percent; None when a class has no sample)."""

    subset: str
    samples: int
    erroneous: int
    correct: int
    error_acc: float | None
    correct_acc: float | None
    f1: float | None
    truncated: int = 0


def processbench_metric(subset: str, labels: Sequence[int], predictions: Sequence[int],
                        truncated: int = 0) -> ProcessBenchResult:
    """The official metric: accuracy on erroneous samples (prediction == label), on correct ones
    (prediction == -1), and their harmonic mean (0 when both are 0), all in percent."""
    if len(labels) != len(predictions):
        raise EvaluationError(f"{len(labels)} labels but {len(predictions)} predictions")
    err = [p == y for y, p in zip(labels, predictions, strict=True) if y != -1]
    cor = [p == -1 for y, p in zip(labels, predictions, strict=True) if y == -1]
    acc1 = 100.0 * sum(err) / len(err) if err else None
    acc2 = 100.0 * sum(cor) / len(cor) if cor else None
    f1 = None
    if acc1 is not None and acc2 is not None:
        f1 = 2 * acc1 * acc2 / (acc1 + acc2) if acc1 + acc2 > 0 else 0.0
    return ProcessBenchResult(subset, len(labels), len(err), len(cor), acc1, acc2, f1, truncated)


def evaluate_processbench(scorer: StepScorer, data_dir: str | Path, subsets: Sequence[str] = PROCESSBENCH_SUBSETS,
                          limit: int | None = None, threshold: float = DEFAULT_THRESHOLD,
                          batch_size: int = 16) -> dict:
    """Score every (limited) subset and apply the metric; returns per-subset rows and their mean F1.

    A truncated sample is predicted from the steps that were scored (its later steps count as unjudged).
    """
    rows = []
    for subset in subsets:
        samples = balanced_limit(load_processbench(Path(data_dir) / f"{subset}.json"), limit)
        scores = scorer.score([s.problem for s in samples], [s.steps for s in samples], batch_size=batch_size)
        if len(scores) != len(samples):
            raise EvaluationError(f"scorer returned {len(scores)} results for {len(samples)} samples ({subset})")
        preds = [first_error_index(sc.mean, threshold) for sc in scores]
        rows.append(processbench_metric(subset, [s.label for s in samples], preds,
                                        truncated=sum(bool(sc.truncated) for sc in scores)))
    f1s = [r.f1 for r in rows if r.f1 is not None]
    return {"threshold": threshold, "limit": limit, "subsets": [asdict(r) for r in rows],
            "mean_f1": sum(f1s) / len(f1s) if len(f1s) == len(rows) and rows else None}


# -- step AUROC and accuracy ----------------------------------------------------------------------------


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for the positive class, ties counting 1/2 (Mann-Whitney U).

    AUROC = (R+ - P(P+1)/2) / (P*N), with R+ the sum of the positives' ranks (1-based, ties get their
    average rank). NaN when either class is empty.
    """
    if len(scores) != len(positives):
        raise EvaluationError(f"{len(scores)} scores but {len(positives)} labels")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # average of the 1-based ranks i+1 .. j+1
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    n_pos = sum(bool(p) for p in positives)
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = sum(r for r, p in zip(ranks, positives, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def step_accuracy(scores: Sequence[float], truth: Sequence[bool], threshold: float = DEFAULT_THRESHOLD) -> float:
    """Share of steps where (score >= threshold) equals the truth (a step scoring below it is judged wrong)."""
    if len(scores) != len(truth):
        raise EvaluationError(f"{len(scores)} scores but {len(truth)} labels")
    if not scores:
        return math.nan
    return sum((s >= threshold) == bool(t) for s, t in zip(scores, truth, strict=True)) / len(scores)


# -- best-of-N --------------------------------------------------------------------------------------------


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
