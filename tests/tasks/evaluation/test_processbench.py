"""ProcessBench's metric on hand-made inputs: first-error index, F1, the balanced limit, reading subset files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tasks.evaluation.processbench import (
    ProcessBenchSample,
    balanced_limit,
    evaluate_processbench,
    first_error_index,
    processbench_metric,
    read_processbench_subset,
)
from tasks.evaluation.scorers import EvaluationError, StepScorer


def test_first_error_index_uses_strict_threshold():
    assert first_error_index([0.9, 0.5, 0.49, 0.1]) == 2  # 0.5 is not below 0.5
    assert first_error_index([0.9, 0.8]) == -1
    assert first_error_index([0.3, 0.9], threshold=0.2) == -1
    assert first_error_index([]) == -1


def test_processbench_metric_known_f1():
    # erroneous samples (label != -1): labels 2, 0, 1 -> predictions 2 (hit), 1 (miss), 1 (hit): 2/3
    # correct samples (label -1): predictions -1 (hit), 0 (miss): 1/2
    # F1 = 2 * (200/3) * 50 / (200/3 + 50) = 400/7 = 57.142857...
    r = processbench_metric("toy", [2, 0, -1, -1, 1], [2, 1, -1, 0, 1])
    assert (r.samples, r.erroneous, r.correct) == (5, 3, 2)
    assert r.error_acc == pytest.approx(200 / 3)
    assert r.correct_acc == pytest.approx(50.0)
    assert r.f1 == pytest.approx(400 / 7)


def test_processbench_metric_edge_cases():
    assert processbench_metric("s", [1, -1], [-1, 0]).f1 == 0.0  # both accuracies 0
    only_wrong = processbench_metric("s", [1, 2], [1, 1])
    assert only_wrong.error_acc == 50.0 and only_wrong.correct_acc is None and only_wrong.f1 is None
    with pytest.raises(EvaluationError, match="2 labels but 1 predictions"):
        processbench_metric("s", [1, 2], [1])


def _pb(i: int, label: int, n_steps: int = 3) -> ProcessBenchSample:
    return ProcessBenchSample(str(i), "g", f"problem {i}", [f"step {k}" for k in range(n_steps)], label == -1, label)


def test_balanced_limit_keeps_file_order_and_both_classes():
    samples = [_pb(0, 1), _pb(1, 0), _pb(2, 2), _pb(3, -1), _pb(4, 1), _pb(5, -1)]
    assert [s.id for s in balanced_limit(samples, 4)] == ["0", "1", "3", "5"]
    assert [s.id for s in balanced_limit(samples, 3)] == ["0", "1", "3"]  # ceil(3/2) erroneous first
    assert [s.id for s in balanced_limit(samples[:3] + samples[3:4], 3)] == ["0", "1", "3"]
    assert [s.id for s in balanced_limit(samples[:3], 2)] == ["0", "1"]  # no correct ones: topped up
    assert len(balanced_limit(samples, None)) == 6


@dataclass
class _Scores:
    mean: list[float]
    std: list[float]
    truncated: bool = False


class _ByTableScorer:
    """A scorer reading per-sample scores from a table keyed by the problem text (hand-made predictions)."""

    def __init__(self, table: dict[str, list[float]], truncate_to: int | None = None):
        self.table, self.truncate_to, self.calls = table, truncate_to, []

    def score(self, prompts, completions, batch_size=16):
        self.calls.append(len(prompts))
        out = []
        for p, steps in zip(prompts, completions, strict=True):
            s = self.table[p][: len(steps)]
            cut = self.truncate_to is not None and len(s) > self.truncate_to
            s = s[: self.truncate_to] if cut else s
            out.append(_Scores(s, [0.0] * len(s), cut))
        return out


def test_evaluate_processbench_end_to_end_on_files(tmp_path):
    rows = [
        {"id": "a", "generator": "g", "problem": "pa", "steps": ["x", "y", "z"], "final_answer_correct": False,
         "label": 1},
        {"id": "b", "generator": "g", "problem": "pb", "steps": ["x", "y"], "final_answer_correct": True, "label": -1},
        {"id": "c", "generator": "g", "problem": "pc", "steps": ["x", "y", "z"], "final_answer_correct": False,
         "label": 2},
        {"id": "d", "generator": "g", "problem": "pd", "steps": ["x"], "final_answer_correct": True, "label": -1},
    ]
    (tmp_path / "gsm8k.json").write_text(json.dumps(rows))
    (tmp_path / "math.json").write_text(json.dumps(rows[:2]))
    table = {"pa": [0.9, 0.2, 0.1], "pb": [0.9, 0.7], "pc": [0.9, 0.1, 0.1], "pd": [0.3]}
    scorer = _ByTableScorer(table)
    assert isinstance(scorer, StepScorer)
    rep = evaluate_processbench(scorer, tmp_path, subsets=("gsm8k", "math"))
    gsm, math_ = rep["subsets"]
    # gsm8k: a -> 1 (hit), c -> 1 (miss; label 2); b -> -1 (hit), d -> 0 (miss): 50 / 50 -> F1 50
    assert (gsm["error_acc"], gsm["correct_acc"], gsm["f1"]) == (50.0, 50.0, 50.0)
    assert (math_["error_acc"], math_["correct_acc"], math_["f1"]) == (100.0, 100.0, 100.0)
    assert rep["mean_f1"] == 75.0
    # limit 2 keeps a (erroneous) and b (correct); a scorer that reads only 1 step cuts both, and a's error at
    # index 1 is never seen -> predicted -1 (miss); b -> -1 (hit)
    rep = evaluate_processbench(_ByTableScorer(table, truncate_to=1), tmp_path, subsets=("gsm8k",), limit=2)
    row = rep["subsets"][0]
    assert (row["samples"], row["truncated"], row["error_acc"], row["correct_acc"], row["f1"]) == (2, 2, 0.0, 100.0,
                                                                                                  0.0)


def test_read_processbench_subset_bad_rows(tmp_path):
    bad = tmp_path / "gsm8k.json"
    bad.write_text(json.dumps([{"id": "a", "generator": "g", "problem": "p", "steps": ["x"],
                                "final_answer_correct": True, "label": 3}]))
    with pytest.raises(EvaluationError, match=r"row 0 \(id 'a'\): label 3 is not -1 or a step index below 1"):
        read_processbench_subset(bad)
    bad.write_text(json.dumps([{"id": "a", "steps": []}]))
    with pytest.raises(EvaluationError, match=r"row 0: missing field\(s\) \['generator', 'problem'"):
        read_processbench_subset(bad)
    with pytest.raises(EvaluationError, match="not found"):
        read_processbench_subset(tmp_path / "nope.json")


def test_shipped_processbench_files_load():
    from configs.schema import REPO_ROOT

    data = REPO_ROOT.parent / "shared" / "data" / "processbench"
    if not data.is_dir():
        pytest.skip("../shared/data/processbench is not on this machine")
    gsm = read_processbench_subset(data / "gsm8k.json")
    assert len(gsm) == 400 and sum(s.label == -1 for s in gsm) == 193
