"""Scores against exact truth: AUROC, accuracy at a threshold, Brier score, first-error F1 and bootstrap intervals
over problems (pure functions).

AUROC is the probability that a truly correct step scores above a truly wrong one, ties counting 1/2 (the
Mann-Whitney U statistic over P*N pairs, computed from average ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tasks.evaluation.scorers import DEFAULT_THRESHOLD, EvaluationError


def auroc(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties count 1/2.

    NaN when only one class is present (no ranking to judge).
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(truth, dtype=bool)
    if s.shape != y.shape:
        raise EvaluationError(f"scores ({s.shape}) and truth ({y.shape}) differ in shape")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with midranks for ties (vectorised: bootstraps call this thousands of times).
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # the mean of the 1-based ranks a tie group spans
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def accuracy(scores: Sequence[float], truth: Sequence[bool], threshold: float = DEFAULT_THRESHOLD) -> float:
    """Fraction of steps where `score >= threshold` equals the truth (hard labels: pass 0/1 scores)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(truth, dtype=bool)
    if s.shape != y.shape:
        raise EvaluationError(f"scores ({s.shape}) and truth ({y.shape}) differ in shape")
    if len(s) == 0:
        return float("nan")
    return float(((s >= threshold) == y).mean())


def brier(scores: Sequence[float], truth: Sequence[bool]) -> float:
    """Mean squared error of a probability-like label against 0/1 truth."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(truth, dtype=float)
    if len(s) == 0:
        return float("nan")
    return float(((s - y) ** 2).mean())


# -- metrics a step's position cannot game ----------------------------------------------------------------
#
# On a ruler, later steps are wrong more often (an error stays wrong), so "earlier steps score higher" already
# gets a step AUROC near 0.7 without reading a single step. Within-position AUROC compares steps only with
# steps at the same index, where position says nothing; first-error F1 asks for the first wrong step exactly.


def within_position_auroc(scores: Sequence[Sequence[float]], truth: Sequence[Sequence[bool]]
                          ) -> dict[str, Any]:
    """AUROC among the steps at each step index, and their mean over the indices where both classes occur.

    `scores[i]` and `truth[i]` are trajectory i's per-step values; a trajectory may have fewer scores than
    truth values (steps past a context cut are unscored and left out). A NaN score is left out too, and
    counted. Returns ``{"mean": float (NaN when no index has both classes), "positions": [{"index", "steps",
    "auroc"}], "left_out": n}``; a position with one class only has ``auroc`` None and does not count.
    """
    by_index: dict[int, tuple[list[float], list[bool]]] = {}
    left_out = 0
    for i, (s, t) in enumerate(zip(scores, truth, strict=True)):
        if len(s) > len(t):
            raise EvaluationError(f"trajectory {i}: {len(s)} scores for {len(t)} steps")
        for j, (value, good) in enumerate(zip(s, t, strict=False)):
            if value is None or math.isnan(value):
                left_out += 1
                continue
            xs, ys = by_index.setdefault(j, ([], []))
            xs.append(float(value))
            ys.append(bool(good))
    positions = []
    for j in sorted(by_index):
        xs, ys = by_index[j]
        value = auroc(xs, ys)
        positions.append({"index": j, "steps": len(xs), "auroc": None if math.isnan(value) else value})
    judged = [p["auroc"] for p in positions if p["auroc"] is not None]
    return {"mean": float(np.mean(judged)) if judged else math.nan, "positions": positions, "left_out": left_out}


def first_error_labels(truth: Sequence[Sequence[bool]]) -> list[int]:
    """Per trajectory: the index of its first wrong step, -1 when every step is right (ProcessBench's label)."""
    return [next((j for j, good in enumerate(t) if not good), -1) for t in truth]


def first_error_f1(scores: Sequence[Sequence[float]], truth: Sequence[Sequence[bool]],
                   threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """ProcessBench's rule (arXiv 2412.06559) with exact truth as the label, as fractions in [0, 1].

    A trajectory's prediction is the first step scoring below `threshold` (-1: none); accuracy on the
    erroneous trajectories (prediction == the first wrong step), on the correct ones (prediction == -1), and
    F1 = their harmonic mean. A NaN score counts as below the threshold (an unscorable step is not passed).
    """
    labels = first_error_labels(truth)
    preds = [next((j for j, v in enumerate(s) if not v >= threshold), -1) for s in scores]
    err = [p == y for y, p in zip(labels, preds, strict=True) if y != -1]
    cor = [p == -1 for y, p in zip(labels, preds, strict=True) if y == -1]
    acc_err = sum(err) / len(err) if err else None
    acc_cor = sum(cor) / len(cor) if cor else None
    f1 = None
    if acc_err is not None and acc_cor is not None:
        f1 = 2 * acc_err * acc_cor / (acc_err + acc_cor) if acc_err + acc_cor > 0 else 0.0
    return {"f1": f1, "error_acc": acc_err, "correct_acc": acc_cor, "erroneous": len(err), "correct": len(cor),
            "threshold": threshold}


def bootstrap_ci(groups: Sequence[Any], statistic: Callable[[Sequence[Any]], float], *, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval for `statistic` over `groups` resampled with replacement.

    Resample the unit that is independent (on the ruler: problems, since a problem's samples share its
    difficulty). Resamples whose statistic is NaN are left out; (NaN, NaN) when all are.
    """
    if not groups:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(groups), len(groups))
        value = statistic([groups[k] for k in picked])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def within_position_auroc_ci(problem_ids: Sequence[str], scores: Sequence[Sequence[float]],
                             truth: Sequence[Sequence[bool]], n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of within-position AUROC over trajectories (`problem_ids[i]` is trajectory i's
    problem), resampling problems (their samples together); NaN scores are left out. None when no resample has
    a value."""
    by_problem: dict[str, dict[int, tuple[list[float], list[bool]]]] = {}
    for problem_id, s, t in zip(problem_ids, scores, truth, strict=True):
        positions = by_problem.setdefault(problem_id, {})
        for j, value in enumerate(s):
            if math.isnan(value):
                continue
            xs, ys = positions.setdefault(j, ([], []))
            xs.append(value)
            ys.append(t[j])
    groups = [{j: (np.asarray(xs), np.asarray(ys, dtype=bool)) for j, (xs, ys) in pos.items()}
              for pos in by_problem.values()]
    max_j = max((j for g in groups for j in g), default=-1)

    def statistic(picked: Sequence[dict[int, tuple[np.ndarray, np.ndarray]]]) -> float:
        values = []
        for j in range(max_j + 1):
            parts = [g[j] for g in picked if j in g]
            if parts:
                value = auroc(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
                if not math.isnan(value):
                    values.append(value)
        return float(np.mean(values)) if values else math.nan

    lo, hi = bootstrap_ci(groups, statistic, n_boot=n_boot, seed=seed)
    return None if math.isnan(lo) else [lo, hi]
