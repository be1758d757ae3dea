"""Scores against exact truth: AUROC, accuracy at a threshold, Brier score (pure functions).

AUROC is the probability that a truly correct step scores above a truly wrong one, ties counting 1/2 (the
Mann-Whitney U statistic over P*N pairs, computed from average ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    # Mann-Whitney U with midranks for ties.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
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
