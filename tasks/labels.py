"""Step labels from rollout counts: hard, soft and ER-PRM's entropy-regularized label.

From a step prefix, N rollouts are sampled and k of them reach the right answer (r_i in {0, 1}):

- hard  = 1[k > 0]                                  (Math-Shepherd hard estimation)
- soft  = k / N                                     (Math-Shepherd soft estimation)
- ER(η) = (1/η) ln(mean_i exp(η r_i)) = (1/η) ln(1 - k/N + (k/N) e^η)   (ER-PRM, arXiv 2412.11006)

ER(η) lies in [0, 1] and moves from soft (η -> 0) to hard (η -> ∞); the paper's default is η = 1.
Only k and N are stored with the dataset, so any η can be recomputed later without new rollouts.
Every function takes scalars (returns Python bool/float) or numpy arrays (returns arrays, broadcast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def step_labels(
    successes: Sequence[int], rollouts: Sequence[int], eta: float, final_correct: bool | None
) -> dict[str, list]:
    """Per-step labels of one solution from its per-step rollout counts.

    ``successes[i]`` of ``rollouts[i]`` rollouts from the prefix ending with step i reached the right
    answer. Returns ``{"hard": list[bool], "soft": list[float], "er": list[float], "origin": list[str]}``,
    one entry per step, where origin is ``"rollout"`` (label from the counts) or ``"final"``.

    When ``final_correct`` is given, the LAST step's labels are the final answer's correctness instead of
    a rollout estimate: hard = ``final_correct``, soft = er = ``float(final_correct)``, origin "final" (the
    last prefix is the whole solution, so its value is known, not estimated). Its counts are then not
    used, and ``rollouts[-1]`` may be 0 (no rollouts were spent on it). With ``final_correct=None`` every
    step, the last included, is labelled from its counts. Every counted step needs N >= 1.
    """
    if len(successes) != len(rollouts):
        raise ValueError(f"successes and rollouts differ in length: {len(successes)} and {len(rollouts)}")
    _check_eta(eta)
    n_steps = len(successes)
    if n_steps == 0:
        return {"hard": [], "soft": [], "er": [], "origin": []}
    counted = n_steps - 1 if final_correct is not None else n_steps
    k = np.asarray(successes[:counted], dtype=np.int64)
    n = np.asarray(rollouts[:counted], dtype=np.int64)
    hard = [bool(x) for x in hard_label(k, n)] if counted else []
    soft = [float(x) for x in soft_label(k, n)] if counted else []
    er = [float(x) for x in er_label(k, n, eta)] if counted else []
    origin = ["rollout"] * counted
    if final_correct is not None:
        hard.append(bool(final_correct))
        soft.append(float(final_correct))
        er.append(float(final_correct))
        origin.append("final")
    return {"hard": hard, "soft": soft, "er": er, "origin": origin}


# -- which steps get which labels ------------------------------------------------------------------------
#
# One rule, used when rows are labelled (tasks/labelling.py) and when they are relabelled for a new η
# (tasks/dataset.py): soft and ER labels are k/N statistics, so they exist only where (k, N) are N policy
# samples drawn from the step prefix with a fixed N. Every step keeps a hard label (TRL trains on it).

SAMPLED_ORIGINS = frozenset({"rollout", "tree"})  # k of N completions sampled from this exact prefix
FINAL_ORIGIN = "final"  # the whole solution: its label is the outcome (final answer right)
# Counts real but not a fixed-size sample (early stop) or no sample behind the label (binary-search rule):
# the hard label is kept, soft and ER are null.
UNSAMPLED_ORIGINS = frozenset({"early_stop", "estimated"})
STEP_ORIGINS = SAMPLED_ORIGINS | UNSAMPLED_ORIGINS | {FINAL_ORIGIN}


def origin_soft_er(k: int, n: int, origin: str, hard: bool, eta: float) -> tuple[float | None, float | None]:
    """(soft, ER) of one step by the rule above: from (k, N) for sampled origins, the outcome for the final
    step, ``(None, None)`` for early-stop and rule-estimated steps."""
    if origin in SAMPLED_ORIGINS:
        return soft_label(k, n), er_label(k, n, eta)
    if origin == FINAL_ORIGIN:
        return float(hard), float(hard)
    if origin in UNSAMPLED_ORIGINS:
        return None, None
    raise ValueError(f"unknown step origin {origin!r}; expected one of {sorted(STEP_ORIGINS)}")
