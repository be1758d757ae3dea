"""What a step scorer is: the protocol every scorer implements, and the error type of every evaluation.

A scorer is the trained PRM (`tasks.prm.model.LoadedPRM`) or a reference scorer of `tasks.evaluation.ruler`
(an oracle from the exact toy truth, a constant), which check the evaluation code independently of any training.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

DEFAULT_THRESHOLD = 0.5  # a step scoring below this is judged wrong (ProcessBench's convention)


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
