"""ActPRM uncertainty selection (arXiv 2504.10559): which unlabelled trajectories are worth labelling.

The PRM's ensemble of E heads scores each step of a trajectory; per step ``mean`` and ``std`` are the mean and
the population std of the E head probabilities (``tasks.prm.model.StepScores``). The rules, as pure functions:

- a step is **confident** iff ``std <= delta_std`` and (``mean >= delta_pred`` or ``mean <= 1 - delta_pred``);
- a trajectory's **first predicted error** is its first step with ``mean < error_threshold`` (0.5, the
  ProcessBench convention of tasks.evaluation.scorers); a trajectory with none has no predicted error;
- a trajectory is **confident** iff every step up to and including its first predicted error is confident
  (every step, when there is none). Steps after the first predicted error do not matter: a PRM judges a
  solution by its first wrong step, so whatever it says later decides nothing.

Only uncertain trajectories are labelled. Two parameter sets ship (``PRESETS``): the paper's
(delta_pred 0.95, delta_std 0.005) and the ActPRM code's (0.9, 0.01).

Choices of ours, documented here because the paper does not fix them:
- a step whose score is NaN (cut off by the PRM's token cap, see tasks/prm/model.py) is not confident: the
  ensemble said nothing about it. It counts only where it falls at or before the first predicted error;
  a trajectory with no scored step at all is uncertain.
- when more trajectories are uncertain than a round may label, the most uncertain go first: ranked by the
  largest ``std`` over the steps that matter (ties: the mean closest to 0.5, then the trajectory id), so
  the order is total and a re-run picks the same ones.
- the random baseline (``random_selection``) draws with a seeded ``random.Random`` from the ids sorted, so it
  depends only on the seed and the set of ids, never on their order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# A step with mean score below this is a predicted error (tasks.evaluation.scorers.DEFAULT_THRESHOLD).
ERROR_THRESHOLD = 0.5


@dataclass(frozen=True)
class SelectionParams:
    """The ActPRM confidence thresholds: ``delta_pred`` on the ensemble mean, ``delta_std`` on its std."""

    delta_pred: float
    delta_std: float
    error_threshold: float = ERROR_THRESHOLD

    def __post_init__(self) -> None:
        if not 0.5 <= self.delta_pred <= 1.0:
            raise ValueError(f"delta_pred must be in [0.5, 1] (a mean >= delta_pred is confidently correct, "
                             f"<= 1 - delta_pred confidently wrong), got {self.delta_pred}")
        if not 0.0 <= self.delta_std <= 0.5:
            raise ValueError(f"delta_std must be in [0, 0.5] (the std of probabilities is at most 0.5), "
                             f"got {self.delta_std}")
        if not 0.0 < self.error_threshold < 1.0:
            raise ValueError(f"error_threshold must be in (0, 1), got {self.error_threshold}")


# arXiv 2504.10559: the paper states delta_pred 0.95 / delta_std 0.005; the authors' released code uses 0.9 / 0.01.
PRESETS: dict[str, SelectionParams] = {
    "paper": SelectionParams(delta_pred=0.95, delta_std=0.005),
    "actprm_code": SelectionParams(delta_pred=0.9, delta_std=0.01),
}


class StepScoresLike(Protocol):
    """Per-step ensemble mean and std of one trajectory (tasks.prm.model.StepScores has this shape)."""

    mean: Sequence[float]
    std: Sequence[float]


def step_confident(mean: float, std: float, params: SelectionParams) -> bool:
    """True iff std <= delta_std and (mean >= delta_pred or mean <= 1 - delta_pred); NaN is never confident."""
    if math.isnan(mean) or math.isnan(std):
        return False
    return std <= params.delta_std and (mean >= params.delta_pred or mean <= 1.0 - params.delta_pred)


def first_predicted_error(means: Sequence[float], threshold: float = ERROR_THRESHOLD) -> int | None:
    """Index of the first step whose mean score is below `threshold` (NaN steps are skipped), or None."""
    for i, m in enumerate(means):
        if not math.isnan(m) and m < threshold:
            return i
    return None


def steps_that_matter(means: Sequence[float], threshold: float = ERROR_THRESHOLD) -> int:
    """How many leading steps decide a trajectory's confidence: up to and including the first predicted error."""
    first = first_predicted_error(means, threshold)
    return len(means) if first is None else first + 1


def trajectory_confident(means: Sequence[float], stds: Sequence[float], params: SelectionParams) -> bool:
    """True iff every step up to and including the first predicted error is confident (and there is a step)."""
    if len(means) != len(stds):
        raise ValueError(f"{len(means)} means but {len(stds)} stds")
    n = steps_that_matter(means, params.error_threshold)
    if n == 0:
        return False  # nothing scored: the ensemble has no opinion, so the trajectory is worth a label
    return all(step_confident(m, s, params) for m, s in zip(means[:n], stds[:n], strict=True))


def uncertainty_key(means: Sequence[float], stds: Sequence[float], params: SelectionParams) -> tuple[float, float]:
    """Sort key, most uncertain first: (-max std, |mean - 0.5|) over the steps that matter (NaN: most uncertain)."""
    n = steps_that_matter(means, params.error_threshold)
    if n == 0:
        return (-math.inf, 0.0)
    head_std, head_mean = list(stds[:n]), list(means[:n])
    if any(math.isnan(v) for v in head_std + head_mean):
        return (-math.inf, 0.0)
    return (-max(head_std), min(abs(m - 0.5) for m in head_mean))


@dataclass(frozen=True)
class Selection:
    """What a round keeps: the chosen ids (in selection order), how many were uncertain, and the params."""

    selected: tuple[str, ...]
    uncertain: int
    confident: int
    params: SelectionParams | None  # None for the random baseline

    def digest(self) -> str:
        """16 hex over the selected ids in order: a round's record names exactly what it bought."""
        return hashlib.sha256("\n".join(self.selected).encode()).hexdigest()[:16]


def select_uncertain(ids: Sequence[str], scores: Sequence[StepScoresLike], params: SelectionParams,
                     max_selected: int | None = None) -> Selection:
    """The uncertain trajectories among `ids` (scored by `scores`, same order), most uncertain first.

    ``max_selected`` caps how many are kept (None: all uncertain ones).
    """
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} ids but {len(scores)} scores")
    if len(set(ids)) != len(ids):
        raise ValueError("trajectory ids must be unique")
    uncertain = [(uncertainty_key(s.mean, s.std, params), pid) for pid, s in zip(ids, scores, strict=True)
                 if not trajectory_confident(s.mean, s.std, params)]
    uncertain.sort()
    chosen = [pid for _, pid in uncertain]
    if max_selected is not None:
        chosen = chosen[:max_selected]
    return Selection(tuple(chosen), len(uncertain), len(ids) - len(uncertain), params)


def random_selection(ids: Sequence[str], k: int, seed: int) -> Selection:
    """`k` ids drawn uniformly without replacement (all of them when k >= len(ids)); see the module docstring."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = sorted(set(ids))
    chosen = random.Random(seed).sample(pool, min(k, len(pool)))
    return Selection(tuple(chosen), 0, 0, None)


def selection_params(cfg: Any) -> SelectionParams:
    """The thresholds of an ``active.selection`` config section: its explicit values, else its preset's."""
    if cfg.delta_pred is not None and cfg.delta_std is not None:
        return SelectionParams(cfg.delta_pred, cfg.delta_std, cfg.error_threshold)
    preset = PRESETS[cfg.preset]
    return SelectionParams(preset.delta_pred, preset.delta_std, cfg.error_threshold)
