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

This is the trust rule of the reference code (sail-sg/ActivePRM, ``ActiveSFTTrainer.compute_loss``): its pseudo
labels are ``mean >= 0.5``, masked after the first 0; a trajectory is trusted when every unmasked step has
``std <= delta_std`` and a mean beyond ``delta_pred`` either way. Two differences, both of the setting: the
reference gates rows that are labelled already (its label mask also hides unlabelled steps), ours gates before any
label, so every step counts; and its std is torch's default (Bessel-corrected, E - 1), ours the population std
(E), smaller by sqrt((E - 1) / E) (0.935 for 8 heads), so a given delta_std is slightly looser here.

**Gate figures** (``gate_stats``): the trusted share, and the reference's ``pseudo_label_acc``: of the trusted
trajectories whose step truth is known, the share whose pseudo labels are right. The reference compares pseudo
labels with labels that are masked after the true first error, so a trusted trajectory is right exactly when its
first predicted error is its true first error (or it has neither): ``pseudo_labels_correct``.

**Does the ranking pay** (``selection_diagnostics``): the error share among the selected against the scored
pool's, and the AUROC of std for a misclassified step within bins of the mean's margin.

**A gate that can fire** (``calibrate_thresholds``): with the paper's thresholds a small ensemble trusts almost
nothing, and the gate degenerates into a ranking. Calibration puts delta_pred and delta_std at the same quantile
of a score set's per-trajectory needs (the least margin |mean - 0.5| and the largest std over the steps that
matter), the smallest quantile that trusts the target share.

**Picks** (``draw_uncertain``): a seeded draw among the uncertain (uniform, or weighted by the largest std over
the steps that matter, or by that std per expected labelling token), at most ``per_group`` per problem, instead of
the deterministic most-uncertain-first top-k, which is a biased sample of the pool. When everything is uncertain
the uniform draw is the random baseline.

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


def pseudo_labels(means: Sequence[float], threshold: float = ERROR_THRESHOLD) -> list[int | None]:
    """The ensemble's own step labels: 1 (mean >= threshold), 0, None after the first 0 (and on NaN steps)."""
    first = first_predicted_error(means, threshold)
    return [None if math.isnan(m) or (first is not None and i > first) else int(m >= threshold)
            for i, m in enumerate(means)]


def pseudo_labels_correct(means: Sequence[float], truth: Sequence[bool | None],
                          threshold: float = ERROR_THRESHOLD) -> bool:
    """True iff, over the steps whose truth is known (not None), the first predicted error is the first true error
    (or neither has one): the reference's pseudo labels equal its labels, both masked after their first error."""
    if len(means) != len(truth):
        raise ValueError(f"{len(means)} means but {len(truth)} truth values")
    known = [i for i, t in enumerate(truth) if t is not None]
    predicted = next((i for i in known if not math.isnan(means[i]) and means[i] < threshold), None)
    actual = next((i for i in known if not truth[i]), None)
    return predicted == actual


# Under this trusted share the gate picks (nearly) everything: it is not selecting, whatever ranks the picks.
NOT_SELECTING_SHARE = 0.05


@dataclass(frozen=True)
class GateStats:
    """What the gate did on a set of scored trajectories (the reference logs trust_percentage, pseudo_label_acc)."""

    scored: int
    trusted: int
    checked: int      # trusted trajectories whose truth was known
    correct: int      # of those, how many had right pseudo labels

    @property
    def trusted_share(self) -> float | None:
        return self.trusted / self.scored if self.scored else None

    @property
    def pseudo_label_acc(self) -> float | None:
        return self.correct / self.checked if self.checked else None

    @property
    def note(self) -> str | None:
        """"gate is not selecting" when it trusts under 5% of what it saw."""
        share = self.trusted_share
        if share is not None and share < NOT_SELECTING_SHARE:
            return (f"gate is not selecting: it trusts {share:.1%} of {self.scored} trajectories (under "
                    f"{NOT_SELECTING_SHARE:.0%}), so nearly everything is labelled")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"scored": self.scored, "trusted": self.trusted, "trusted_share": self.trusted_share,
                "pseudo_label_checked": self.checked, "pseudo_label_correct": self.correct,
                "pseudo_label_acc": self.pseudo_label_acc, "gate_note": self.note}


def gate_stats(scores: Sequence[StepScoresLike], params: SelectionParams,
               truths: Sequence[Sequence[bool | None] | None] | None = None) -> GateStats:
    """The trusted count of `scores` and, where `truths` (same order; None: unknown) is given, the pseudo-label
    accuracy on the trusted ones."""
    if truths is not None and len(truths) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(truths)} truths")
    trusted = checked = correct = 0
    for i, s in enumerate(scores):
        if not trajectory_confident(s.mean, s.std, params):
            continue
        trusted += 1
        truth = truths[i] if truths is not None else None
        if truth is not None:
            checked += 1
            correct += pseudo_labels_correct(s.mean, truth, params.error_threshold)
    return GateStats(len(scores), trusted, checked, correct)


# Margin bins |mean - 0.5| for what std adds beyond the mean (``selection_diagnostics``).
MARGIN_BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def selection_diagnostics(scores: Sequence[StepScoresLike], truths: Sequence[Sequence[bool | None] | None],
                          selected: Sequence[bool], threshold: float = ERROR_THRESHOLD) -> dict[str, Any]:
    """Does the gate's ranking pay? Over the trajectories whose step truth is known (``truths``, same order as
    ``scores``; None: unknown):

    - ``error_share_selected`` / ``error_share_scored``: the share of trajectories with a wrong step among the
      selected, and among all scored (what a random pick gets in expectation);
    - ``std_auroc_within_margin``: the AUROC of the ensemble std for "this step is misclassified" (mean on the wrong
      side of ``threshold``), within bins of the mean's margin |mean - 0.5| (``MARGIN_BINS``), averaged over the
      bins holding both kinds of step, weighted by their steps. The mean's margin already says how sure the
      ensemble is; this is what its spread adds. 0.5: nothing. Steps after the first true error count too (the
      PRM is judged on them as well); NaN steps do not.
    """
    from tasks.evaluation.metrics import auroc

    if not (len(scores) == len(truths) == len(selected)):
        raise ValueError(f"{len(scores)} scores, {len(truths)} truths and {len(selected)} selection flags")
    known = [i for i, t in enumerate(truths) if t is not None]
    wrong = {i: not all(t for t in truths[i] if t is not None) for i in known}
    picked = [i for i in known if selected[i]]
    bins: list[tuple[list[float], list[bool]]] = [([], []) for _ in MARGIN_BINS[1:]]
    for i in known:
        for m, sd, t in zip(scores[i].mean, scores[i].std, truths[i], strict=False):
            if t is None or math.isnan(m) or math.isnan(sd):
                continue
            margin = abs(m - 0.5)
            b = min(sum(margin >= edge for edge in MARGIN_BINS[1:-1]), len(bins) - 1)
            bins[b][0].append(sd)
            bins[b][1].append((m >= threshold) != t)
    weighted, steps, per_bin = 0.0, 0, []
    for (lo, hi), (stds, miss) in zip(zip(MARGIN_BINS[:-1], MARGIN_BINS[1:], strict=True), bins, strict=True):
        a = auroc(stds, miss) if stds else float("nan")
        per_bin.append({"margin": [lo, hi], "steps": len(stds), "misclassified": sum(miss),
                        "std_auroc": None if math.isnan(a) else a})
        if not math.isnan(a):
            weighted, steps = weighted + a * len(stds), steps + len(stds)
    return {"truth_known": len(known),
            "error_share_selected": sum(wrong[i] for i in picked) / len(picked) if picked else None,
            "error_share_scored": sum(wrong.values()) / len(known) if known else None,
            "std_auroc_within_margin": weighted / steps if steps else None, "std_auroc_by_margin": per_bin}


def trust_needs(means: Sequence[float], stds: Sequence[float],
                threshold: float = ERROR_THRESHOLD) -> tuple[float, float] | None:
    """(least |mean - 0.5|, largest std) over the steps that matter: the trajectory is trusted iff
    delta_pred - 0.5 <= the first and delta_std >= the second. None: never trusted (nothing scored, or NaN)."""
    n = steps_that_matter(means, threshold)
    head_mean, head_std = list(means[:n]), list(stds[:n])
    if n == 0 or any(math.isnan(v) for v in head_mean + head_std):
        return None
    return min(abs(m - 0.5) for m in head_mean), max(head_std)


@dataclass(frozen=True)
class Calibration:
    """Thresholds calibrated to a target trusted share, and the share they give on the set they were fitted on."""

    params: SelectionParams
    target_share: float
    trusted_share: float
    scored: int

    def to_dict(self) -> dict[str, Any]:
        return {"delta_pred": self.params.delta_pred, "delta_std": self.params.delta_std,
                "target_share": self.target_share, "trusted_share": self.trusted_share, "scored": self.scored}


def calibrate_thresholds(scores: Sequence[StepScoresLike], target_share: float,
                         error_threshold: float = ERROR_THRESHOLD) -> Calibration:
    """delta_pred and delta_std at the same quantile of the set's trust needs (see the module docstring): the
    k-th largest least-margin and the k-th smallest largest-std, with k the smallest that trusts at least
    ``ceil(target_share x len(scores))`` trajectories. Ties can trust more than the target, never fewer.

    ValueError when the target is outside (0, 1), or the set cannot reach it (too few scorable trajectories).
    """
    if not 0.0 < target_share < 1.0:
        raise ValueError(f"the target trusted share must be in (0, 1), got {target_share}")
    needs = [trust_needs(s.mean, s.std, error_threshold) for s in scores]
    usable = [n for n in needs if n is not None]
    want = math.ceil(target_share * len(scores))
    if want > len(usable):
        raise ValueError(f"cannot calibrate to a trusted share of {target_share}: only {len(usable)} of "
                         f"{len(scores)} trajectories are scored on every step that matters")
    margins = sorted((m for m, _ in usable), reverse=True)
    stds = sorted(s for _, s in usable)
    for k in range(1, len(usable) + 1):
        margin, std = margins[k - 1], stds[k - 1]
        if sum(1 for m, s in usable if m >= margin and s <= std) >= want:
            break
    # A hair inside each bound, so a trajectory exactly at them stays trusted despite rounding in 0.5 + margin.
    delta_pred = min(max(0.5 + margin - 1e-9, 0.5), 1.0)
    params = SelectionParams(delta_pred, min(std + 1e-12, 0.5), error_threshold)
    trusted = sum(trajectory_confident(s.mean, s.std, params) for s in scores)
    return Calibration(params, target_share, trusted / len(scores), len(scores))


def draw_uncertain(ids: Sequence[str], scores: Sequence[StepScoresLike], params: SelectionParams,
                   k: int | None, seed: int, weight: str = "uniform",
                   groups: Sequence[str] | None = None, per_group: int | None = None,
                   costs: Sequence[float] | None = None) -> Selection:
    """A seeded draw of at most `k` (None: all) of the uncertain trajectories, without replacement.

    ``weight``: ``uniform``, ``std`` (chance proportional to the largest std over the steps that matter; an
    unscorable trajectory weighs as the largest weight seen), ``std_per_token`` (that std divided by the
    trajectory's expected labelling cost, ``costs``, same order as ids, positive: expected gain per expected
    token) or ``inverse_cost`` (1 / cost alone, the std ignored: the control that tells how much of
    ``std_per_token`` is the std and how much the cheaper problems). ``groups`` (same order as ids: each
    trajectory's problem) with ``per_group``: at most that many per problem. The draw depends on the seed and the
    set of (id, score) pairs, never on their order (weighted keys u ** (1 / w), Efraimidis-Spirakis, over sorted
    ids, compared as log(u) / w: a small weight cannot underflow every key to 0).
    """
    if weight not in ("uniform", "std", "std_per_token", "inverse_cost"):
        raise ValueError(f"weight must be 'uniform', 'std', 'std_per_token' or 'inverse_cost', got {weight!r}")
    if (weight in ("std_per_token", "inverse_cost")) != (costs is not None):
        raise ValueError("costs go with weight 'std_per_token' or 'inverse_cost', and only with them")
    if costs is not None and (len(costs) != len(ids) or not all(c > 0 for c in costs)):
        raise ValueError("costs must be positive, one per id")
    if len(ids) != len(scores) or (groups is not None and len(groups) != len(ids)):
        raise ValueError("ids, scores and groups must have the same length")
    if len(set(ids)) != len(ids):
        raise ValueError("trajectory ids must be unique")
    group_of = dict(zip(ids, groups, strict=True)) if groups is not None else {}
    weights: dict[str, float | None] = {}
    for pid, s in zip(ids, scores, strict=True):
        if trajectory_confident(s.mean, s.std, params):
            continue
        needs = trust_needs(s.mean, s.std, params.error_threshold)
        weights[pid] = None if needs is None else needs[1]
    known = [w for w in weights.values() if w is not None and w > 0]
    top = max(known, default=1.0)
    cost_of = dict(zip(ids, costs, strict=True)) if costs is not None else {}
    rng = random.Random(seed)
    keyed = []
    for pid in sorted(weights):
        u = rng.random()
        if weight in ("uniform", "inverse_cost"):
            w = 1.0
        else:
            w = top if weights[pid] is None else max(weights[pid], 1e-12)
        if cost_of:
            w /= cost_of[pid]
        keyed.append((-(math.log(u) / w if u > 0 else -math.inf), pid))  # log of u ** (1 / w): no underflow
    keyed.sort()
    chosen: list[str] = []
    taken: dict[str, int] = {}
    for _, pid in keyed:
        if k is not None and len(chosen) >= k:
            break
        g = group_of.get(pid, pid)
        if per_group is not None and taken.get(g, 0) >= per_group:
            continue
        taken[g] = taken.get(g, 0) + 1
        chosen.append(pid)
    return Selection(tuple(chosen), len(weights), len(ids) - len(weights), params)


def selection_params(cfg: Any) -> SelectionParams:
    """The thresholds of an ``active.selection`` config section: its explicit values, else its preset's."""
    if cfg.delta_pred is not None and cfg.delta_std is not None:
        return SelectionParams(cfg.delta_pred, cfg.delta_std, cfg.error_threshold)
    preset = PRESETS[cfg.preset]
    return SelectionParams(preset.delta_pred, preset.delta_std, cfg.error_threshold)
