"""The truth labeller (the learner's ceiling) on toy problems with a real engine (transformers, in process)."""

from __future__ import annotations

import pytest

from configs.schema import REPO_ROOT, ConfigError, parse_config
from tasks.labelling.label_rule import step_labels
from tasks.labelling.labellers import make_labeller
from tasks.labelling.truth_labeller import TruthLabeller
from tasks.sources.toy_world import generate_problems, prefix_is_correct
from tasks.store.dataset import rows_to_table

POLICY = REPO_ROOT / "assets" / "toy-policy"


def _config(**labels) -> dict:
    return {
        "name": "truth-test",
        "sources": [{"kind": "toy", "num_problems": 6, "seed": 78, "min_steps": 2, "max_steps": 5}],
        "policy": {"model_path": str(POLICY), "backend": "transformers", "max_model_len": 256},
        "partition": {"method": "newline", "entropy_source": "exact"},
        "rollouts": {"max_new_tokens": 96},
        "labels": {"labeller": "truth", "truth_samples": 4, **labels},
    }


@pytest.fixture(scope="module")
def labelled():
    from transformers import AutoTokenizer

    from cluster.hf_engine import HFEngine

    cfg = parse_config(_config())
    problems = generate_problems(cfg.sources[0])
    labeller = make_labeller(cfg, HFEngine(str(POLICY)), AutoTokenizer.from_pretrained(str(POLICY)))
    assert isinstance(labeller, TruthLabeller)
    return cfg, problems, labeller.label(problems)


def test_every_step_is_labelled_by_the_exact_checker(labelled):
    cfg, problems, result = labelled
    by_id = {p.problem_id: p for p in problems}
    assert len(result.rows) + len(result.rejected) == 6 * 4
    wrong_steps = 0
    for row in result.rows:
        problem = by_id[row["problem_id"]]
        steps = row["completions"]
        assert all(s.endswith("\n") for s in steps[:-1])  # newline cuts
        expected = [prefix_is_correct(problem, "".join(steps[: i + 1])) for i in range(len(steps) - 1)]
        assert row["labels"] == [*expected, row["final_correct"]]
        assert row["step_origin"] == ["truth"] * (len(steps) - 1) + ["final"]
        assert row["soft_labels"] == row["er_labels"] == [float(v) for v in row["labels"]]
        wrong_steps += row["labels"].count(False)
    assert wrong_steps > 0, "the policy's T=1 slips should give some wrong steps among 24 samples"
    rows_to_table([{**r, "shard": 0} for r in result.rows])  # the dataset row checks (label rule too) pass


def test_the_only_cost_is_the_samples(labelled):
    _, _, result = labelled
    assert result.cost.branch_tokens == result.cost.rollout_tokens == 0
    assert result.cost.generate_tokens == sum(r["completion_tokens"] for r in result.rows) > 0
    assert result.cost.requests == 6


def test_truth_labels_follow_the_label_rule_for_any_eta():
    labels = step_labels([1, 0, 1], [1, 1, 1], ["truth", "truth", "final"], 3.0, [True, False, True])
    assert labels.hard_list() == [True, False, True]
    assert labels.er_list() == labels.soft_list() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="needs its given hard label"):
        step_labels([1], [1], ["truth"], 1.0, [None])


def test_truth_is_refused_for_sources_without_exact_truth():
    data = _config()
    data["sources"] = [{"kind": "jsonl", "path": "x.jsonl"}]
    with pytest.raises(ConfigError, match="labels.labeller 'truth' needs the exact step truth"):
        parse_config(data, check_paths=False)


def test_the_tree_labeller_default_keeps_every_hash():
    tree = parse_config({**_config(), "labels": {"eta": 1.0}})
    explicit = parse_config({**_config(), "labels": {"eta": 1.0, "labeller": "tree", "truth_samples": 9}})
    assert tree.labelling_hash() == explicit.labelling_hash() and tree.config_hash() == explicit.config_hash()
    assert parse_config(_config()).labelling_hash() != tree.labelling_hash()
