"""ProcessBench's official metric (arXiv 2412.06559) for any step scorer.

The predicted label of a sample is the index of the first step whose score is below the threshold (0.5), else
-1. Per subset: accuracy on the erroneous samples (exact index match), accuracy on the correct ones (predicted
-1), F1 = their harmonic mean; in percent, as the official script and the published tables report them.
(`tasks.sources.loaders.load_processbench` reads the same files as problems for a build; this module reads them
as labelled samples for evaluation.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.evaluation.scorers import DEFAULT_THRESHOLD, EvaluationError, StepScorer

PROCESSBENCH_SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")
PROCESSBENCH_FIELDS = ("id", "generator", "problem", "steps", "final_answer_correct", "label")


@dataclass(frozen=True)
class ProcessBenchSample:
    """One ProcessBench row: `label` is the first wrong step's index, -1 when every step is right."""

    id: str
    generator: str
    problem: str
    steps: list[str]
    final_answer_correct: bool
    label: int


def read_processbench_subset(path: str | Path) -> list[ProcessBenchSample]:
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
                          limit: int | None = None, threshold: float = DEFAULT_THRESHOLD, batch_size: int = 16,
                          format_prompt: Callable[[str], str] | None = None) -> dict:
    """Score every (limited) subset and apply the metric; returns per-subset rows and their mean F1.

    The scorer sees each sample in the format it was trained on (``training_format``): the problem through
    `format_prompt` (a PRM's own training template), each step ended by a newline. A truncated sample is
    predicted from the steps that were scored (its later steps count as unjudged).
    """
    rows = []
    for subset in subsets:
        samples = balanced_limit(read_processbench_subset(Path(data_dir) / f"{subset}.json"), limit)
        formatted = [training_format(s, format_prompt) for s in samples]
        scores = scorer.score([p for p, _ in formatted], [steps for _, steps in formatted], batch_size=batch_size)
        if len(scores) != len(samples):
            raise EvaluationError(f"scorer returned {len(scores)} results for {len(samples)} samples ({subset})")
        preds = [first_error_index(sc.mean, threshold) for sc in scores]
        rows.append(processbench_metric(subset, [s.label for s in samples], preds,
                                        truncated=sum(bool(sc.truncated) for sc in scores)))
    f1s = [r.f1 for r in rows if r.f1 is not None]
    return {"threshold": threshold, "limit": limit, "subsets": [asdict(r) for r in rows],
            "mean_f1": sum(f1s) / len(f1s) if len(f1s) == len(rows) and rows else None}


def training_format(sample: ProcessBenchSample, format_prompt: Callable[[str], str] | None = None
                    ) -> tuple[str, list[str]]:
    """A ProcessBench sample as a training row looks: the prompt rendered by `format_prompt` (the PRM's training
    template; the bare problem without one) and steps that each end in a newline, as the factory's rows cut at
    newlines do (ProcessBench stores its steps without one). The text is then ``prompt + "".join(steps)``."""
    prompt = format_prompt(sample.problem) if format_prompt is not None else sample.problem
    return prompt, [s if s.endswith("\n") else s + "\n" for s in sample.steps]
