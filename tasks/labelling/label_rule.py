"""The rule for a step's labels: hard, soft and ER-PRM's entropy-regularized label, from counts and origin.

From a step prefix, N rollouts are sampled and k of them reach the right answer (r_i in {0, 1}):

- hard  = 1[k > 0]                                  (Math-Shepherd hard estimation)
- soft  = k / N                                     (Math-Shepherd soft estimation)
- ER(η) = (1/η) ln(mean_i exp(η r_i)) = (1/η) ln(1 - k/N + (k/N) e^η)   (ER-PRM, arXiv 2412.11006)

ER(η) lies in [0, 1] and moves from soft (η -> 0) to hard (η -> ∞); the paper's default is η = 1.
Only k and N are stored with the dataset, so any η can be recomputed later without new rollouts.
The formulas take scalars (return Python bool/float) or numpy arrays (return arrays, broadcast).

Which of them a step gets depends on where its counts come from (its origin): ``step_labels`` is the one
place that says so. The tree labeller (tasks/labelling/tree_labeller.py), relabelling (tasks/store/relabel.py) and the
dataset's row checks (tasks/store/dataset.py) all call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Below this η the log1p(q·expm1(η)) form is the accurate one; above it, the log-sum-exp form (no overflow).
_SMALL_ETA = 1.0


def _check_eta(eta: Any) -> float:
    if isinstance(eta, bool) or not isinstance(eta, int | float | np.floating | np.integer) or not eta > 0:
        raise ValueError(f"eta must be a number > 0, got {eta!r}")
    return float(eta)


def _counts(k: Any, n: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated (k, N) as float64 arrays broadcast together, and whether both came in as scalars."""
    scalar = np.ndim(k) == 0 and np.ndim(n) == 0
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    try:
        k_arr, n_arr = np.broadcast_arrays(k_arr, n_arr)
    except ValueError:
        raise ValueError(f"k and N do not broadcast: shapes {np.shape(k)} and {np.shape(n)}") from None
    if np.any(~np.isfinite(k_arr)) or np.any(~np.isfinite(n_arr)):
        raise ValueError("k and N must be finite counts")
    if np.any(k_arr != np.round(k_arr)) or np.any(n_arr != np.round(n_arr)):
        raise ValueError("k and N must be whole numbers (counts of rollouts)")
    if np.any(n_arr < 1):
        raise ValueError(f"N (rollouts) must be >= 1, got {n_arr[n_arr < 1].tolist()[:5]}")
    if np.any(k_arr < 0) or np.any(k_arr > n_arr):
        bad = [(int(a), int(b)) for a, b in zip(k_arr.ravel(), n_arr.ravel(), strict=True) if not 0 <= a <= b]
        raise ValueError(f"need 0 <= k <= N, got (k, N) = {bad[:5]}")
    return k_arr, n_arr, scalar


def hard_label(k: Any, n: Any) -> Any:
    """``1[k > 0]``: the step can still reach a right answer. bool for scalars, bool array for arrays."""
    k_arr, _, scalar = _counts(k, n)
    out = k_arr > 0
    return bool(out) if scalar else out


def soft_label(k: Any, n: Any) -> Any:
    """``k / N``: the fraction of rollouts from the step that reach the right answer."""
    k_arr, n_arr, scalar = _counts(k, n)
    out = k_arr / n_arr
    return float(out) if scalar else out


def er_label(k: Any, n: Any, eta: float) -> Any:
    """ER-PRM label ``(1/η) ln(1 - k/N + (k/N) e^η)`` (arXiv 2412.11006, eq. for the entropy-regularized value).

    Exact at the ends: ``k == 0`` gives exactly 0.0, ``k == N`` exactly 1.0, for every η. Stable for any
    η > 0: small η uses ``log1p(q·expm1(η))/η`` (tends to the soft label k/N as η -> 0); large η uses the
    log-sum-exp form ``logaddexp(ln(1-q), ln q + η)/η`` (no overflow at η = 1e6; tends to the hard label
    1[k>0], as ``1 + ln(q)/η`` for k > 0). ``η = inf`` returns the hard label as floats.
    """
    eta = _check_eta(eta)
    k_arr, n_arr, scalar = _counts(k, n)
    q = k_arr / n_arr
    if math.isinf(eta):
        out = (k_arr > 0).astype(np.float64)
    elif eta < _SMALL_ETA:
        out = np.log1p(q * math.expm1(eta)) / eta
    else:
        with np.errstate(divide="ignore", under="ignore"):  # log(0) = -inf is wanted at q = 0 or 1
            out = np.logaddexp(np.log1p(-q), np.log(q) + eta) / eta
    # Pin the ends exactly (and keep rounding inside [0, 1]).
    out = np.where(k_arr == 0, 0.0, np.where(k_arr == n_arr, 1.0, np.clip(out, 0.0, 1.0)))
    return float(out) if scalar else out


# -- which steps get which labels ------------------------------------------------------------------------
#
# Soft and ER labels are k/N statistics, so they exist only where (k, N) are N policy samples drawn from the
# step prefix with a fixed N. Every step keeps a hard label (TRL trains on it).

SAMPLED_ORIGINS = frozenset({"rollout", "tree"})  # k of N completions sampled from this exact prefix
FINAL_ORIGIN = "final"  # the whole solution: its label is the outcome (final answer right)
EARLY_STOP_ORIGIN = "early_stop"  # counts drawn until the first success: k/N is biased upward
ESTIMATED_ORIGIN = "estimated"  # labelled by the binary search's rule; the counts are no sample of N
TRUTH_ORIGIN = "truth"  # the toy world's exact checker (the truth labeller: an upper bound, never a real run)
# Counts real but not a fixed-size sample (early stop) or no sample behind the label (binary-search rule):
# the hard label is kept, soft and ER are null.
UNSAMPLED_ORIGINS = frozenset({EARLY_STOP_ORIGIN, ESTIMATED_ORIGIN})
STEP_ORIGINS = SAMPLED_ORIGINS | UNSAMPLED_ORIGINS | {FINAL_ORIGIN, TRUTH_ORIGIN}
# Origins whose hard label is not read from the counts but given: the outcome, the bisection's or the checker's
# verdict. A given verdict that is exact (the outcome, the checker) is also the step's soft and ER value.
GIVEN_HARD_ORIGINS = frozenset({FINAL_ORIGIN, ESTIMATED_ORIGIN, TRUTH_ORIGIN})
EXACT_ORIGINS = frozenset({FINAL_ORIGIN, TRUTH_ORIGIN})


@dataclass(frozen=True)
class StepLabels:
    """The labels of a sequence of steps, one entry per step.

    ``hard`` (bool) always exists; ``soft`` and ``er`` (float64) exist where ``valued`` is True and are NaN
    elsewhere (the dataset stores them as null there: ``soft_list`` / ``er_list``).
    """

    hard: np.ndarray
    soft: np.ndarray
    er: np.ndarray
    valued: np.ndarray

    def hard_list(self) -> list[bool]:
        return [bool(x) for x in self.hard]

    def soft_list(self) -> list[float | None]:
        return [float(x) if v else None for x, v in zip(self.soft, self.valued, strict=True)]

    def er_list(self) -> list[float | None]:
        return [float(x) if v else None for x, v in zip(self.er, self.valued, strict=True)]


def step_labels(successes: Sequence[int] | np.ndarray, rollouts: Sequence[int] | np.ndarray,
                origins: Sequence[str] | np.ndarray, eta: float,
                given_hard: Sequence[bool | None] | np.ndarray | None = None) -> StepLabels:
    """The labels of each step from its counts (``successes[i]`` of ``rollouts[i]``) and its origin.

    - ``"rollout"`` / ``"tree"`` (N policy samples from the prefix): hard = 1[k > 0], soft = k/N,
      ER = ER(k, N, η); N must be >= 1.
    - ``"early_stop"`` (drawn until the first success): hard = 1[k > 0]; soft and ER null (biased counts).
    - ``"estimated"`` (binary-search rule): hard = ``given_hard[i]``, the bisection's verdict; soft and ER
      null (no sample behind the label; the counts are whatever the tree gave).
    - ``"final"`` (the whole solution): hard = ``given_hard[i]``, the outcome (final answer right); soft =
      ER = that outcome as 0.0/1.0. Its counts are not read.
    - ``"truth"`` (the toy world's exact checker; the truth labeller): as ``"final"``, with the checker's
      verdict on the step as ``given_hard[i]``.

    ``given_hard`` is read only for ``"estimated"``, ``"final"`` and ``"truth"`` steps (entries for other steps may be
    None or anything). Raises ValueError naming the step (``step i: ...``) for an unknown origin, a
    sampled step with N < 1, a missing given label, or counts outside 0 <= k <= N; and for η <= 0.
    """
    eta = _check_eta(eta)
    k = np.asarray(successes, dtype=np.int64).reshape(-1)
    n = np.asarray(rollouts, dtype=np.int64).reshape(-1)
    origin = np.asarray(origins, dtype=object).reshape(-1)
    if not len(k) == len(n) == len(origin):
        raise ValueError(f"successes, rollouts and origins differ in length: {len(k)}, {len(n)} and {len(origin)}")
    if given_hard is None:
        given_hard = [None] * len(k)
    given = np.asarray(given_hard)
    if given.dtype != np.bool_:  # entries may be None (steps whose hard label comes from the counts)
        given = np.asarray(given_hard, dtype=object)
    given = given.reshape(-1)
    if len(given) != len(k):
        raise ValueError(f"given_hard has {len(given)} entries for {len(k)} steps")
    known = np.isin(origin, list(STEP_ORIGINS))
    if not known.all():
        i = int(np.argmin(known))
        raise ValueError(f"step {i}: unknown step origin {origin[i]!r}; expected one of {sorted(STEP_ORIGINS)}")
    bad_counts = (k < 0) | (k > n)
    if bad_counts.any():
        i = int(np.argmax(bad_counts))
        raise ValueError(f"step {i}: need 0 <= k <= N, got (k, N) = ({k[i]}, {n[i]})")
    sampled = np.isin(origin, list(SAMPLED_ORIGINS))
    empty = sampled & (n < 1)
    if empty.any():
        i = int(np.argmax(empty))
        raise ValueError(f"step {i}: a {origin[i]!r} step needs rollouts >= 1, got {n[i]} (N policy samples)")
    needs_given = np.isin(origin, list(GIVEN_HARD_ORIGINS))
    missing = needs_given & np.array([g is None for g in given], dtype=bool) if given.dtype == object else None
    if missing is not None and missing.any():
        i = int(np.argmax(missing))
        raise ValueError(f"step {i}: a {origin[i]!r} step needs its given hard label (outcome or rule verdict)")

    hard = k > 0
    hard[needs_given] = given[needs_given].astype(bool)
    final = np.isin(origin, list(EXACT_ORIGINS))
    soft = np.full(len(k), np.nan)
    er = np.full(len(k), np.nan)
    soft[final] = er[final] = hard[final].astype(np.float64)
    if sampled.any():
        soft[sampled] = soft_label(k[sampled], n[sampled])
        er[sampled] = er_label(k[sampled], n[sampled], eta)
    return StepLabels(hard=hard, soft=soft, er=er, valued=sampled | final)
