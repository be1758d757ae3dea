"""The labelling procedure end to end on toy problems with a real engine (transformers, in process).

Checks the contracts the dataset relies on: EDU cuts sit at high-entropy tokens, counts add up to N,
the last step is the final answer's correctness, a shard labelled twice gives the same rows, and the
cost controls really spend fewer tokens.
"""

from __future__ import annotations

import json

import pytest

from configs.schema import REPO_ROOT, ToySource, parse_config
from tasks.labelling import ShardLabeller
from tasks.toy_world import check_solution, generate_problems, prefix_is_correct

POLICY = REPO_ROOT / "assets" / "toy-policy"


def _config(**overrides) -> dict:
    base = {
        "name": "label-test",
        "sources": [{"kind": "toy", "num_problems": 4, "seed": 77, "min_steps": 2, "max_steps": 4}],
        "policy": {"model_path": str(POLICY), "backend": "transformers", "max_model_len": 256},
        "partition": {"method": "edu", "tau": 0.3, "min_step_tokens": 3, "max_anchors": 4,
                      "entropy_source": "exact"},
        "tree": {"branch_width": 2, "max_depth": 2, "max_leaves": 6},
        "rollouts": {"n": 4, "max_new_tokens": 80},
        "labels": {"eta": 1.0},
    }
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return base


@pytest.fixture(scope="module")
def engine():
    from cluster.hf_engine import HFEngine

    return HFEngine(str(POLICY))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(POLICY))


@pytest.fixture(scope="module")
def problems():
    return generate_problems(ToySource(num_problems=4, seed=77, min_steps=2, max_steps=4))


def _label(engine, tokenizer, problems, **overrides):
    cfg = parse_config(_config(**overrides))
    return ShardLabeller(cfg, engine, tokenizer).label(problems), cfg


@pytest.fixture(scope="module")
def edu(engine, tokenizer, problems):
    return _label(engine, tokenizer, problems)


def test_edu_rows_are_consistent(edu, problems):
    result, cfg = edu
    by_id = {p.problem_id: p for p in problems}
    assert {r["problem_id"] for r in result.rows} == set(by_id)
    assert len(result.rows) > len(problems), "branching at anchors should give more than one leaf per problem"
    for row in result.rows:
        n_steps = len(row["completions"])
        for column in ("labels", "successes", "rollouts", "soft_labels", "er_labels", "step_entropies",
                       "step_origin"):
            assert len(row[column]) == n_steps, column
        solution = "".join(row["completions"])
        truth = check_solution(by_id[row["problem_id"]], solution)
        assert row["final_correct"] == truth.final_correct
        assert row["labels"][-1] == truth.final_correct and row["step_origin"][-1] == "final"
        for k, n, origin in zip(row["successes"][:-1], row["rollouts"][:-1], row["step_origin"][:-1], strict=True):
            assert 0 <= k <= n
            assert n >= cfg.rollouts.n, "tree leaves plus top-up rollouts make at least N outcomes"
            assert origin in ("rollout", "tree")
        # EDU: every cut after the first step sits at a token whose entropy reached tau.
        assert all(h >= cfg.partition.tau for h in row["step_entropies"][1:])
        assert len(row["completions"]) - 1 <= cfg.partition.max_anchors
        assert json.loads(row["partitioner_params"])["tau"] == cfg.partition.tau


def test_labels_track_the_truth(edu, problems):
    """Hard labels from rollouts should agree with the exact prefix truth far more often than chance."""
    result, _ = edu
    by_id = {p.problem_id: p for p in problems}
    agree = total = 0
    for row in result.rows:
        prefix = ""
        for step, label in zip(row["completions"][:-1], row["labels"][:-1], strict=True):
            prefix += step
            agree += label == prefix_is_correct(by_id[row["problem_id"]], prefix)
            total += 1
    assert total > 0
    assert agree / total >= 0.6


def test_same_shard_same_rows(edu, engine, tokenizer, problems):
    again, _ = _label(engine, tokenizer, problems)
    assert again.rows == edu[0].rows
    assert again.cost.to_dict() == edu[0].cost.to_dict()


def test_newline_baseline_cuts_at_newlines(engine, tokenizer, problems):
    result, cfg = _label(engine, tokenizer, problems, partition={"method": "newline"})
    assert len(result.rows) == len(problems), "no branching for the baseline: one trajectory per problem"
    assert result.cost.branch_tokens == 0
    for row in result.rows:
        assert all(step.endswith("\n") for step in row["completions"][:-1])
        assert all(n == cfg.rollouts.n for n in row["rollouts"][:-1])


def test_binary_search_spends_fewer_rollout_tokens(engine, tokenizer, problems):
    plain, _ = _label(engine, tokenizer, problems, partition={"method": "newline"}, rollouts={"n": 4})
    bisect, _ = _label(engine, tokenizer, problems, partition={"method": "newline"},
                       rollouts={"n": 4, "binary_search": True})
    assert bisect.cost.rollout_tokens < plain.cost.rollout_tokens
    origins = [o for row in bisect.rows for o in row["step_origin"][:-1]]
    assert "estimated" in origins
    for row in bisect.rows:
        labels = row["labels"][:-1]
        if row["final_correct"]:
            assert all(labels), "a trajectory that reached the answer is positive at every prefix"
        else:  # OmegaPRM rule: positive up to the first bad step, negative from it on
            first_bad = labels.index(False) if False in labels else len(labels)
            assert all(labels[:first_bad]) and not any(labels[first_bad:])


def test_early_stop_stops_at_first_success(engine, tokenizer, problems):
    full, _ = _label(engine, tokenizer, problems, partition={"method": "newline"}, rollouts={"n": 8})
    early, _ = _label(engine, tokenizer, problems, partition={"method": "newline"},
                      rollouts={"n": 8, "early_stop_hard": True})
    assert early.cost.rollout_tokens <= full.cost.rollout_tokens
    for row in early.rows:
        for k, n in zip(row["successes"][:-1], row["rollouts"][:-1], strict=True):
            assert n <= 8
            assert k > 0 or n == 8, "a prefix without success is rolled out to the full N"


class _EmptyThenRealEngine:
    """Engine double for one edge case: the first problem's root solution comes back empty (EOS at once)."""

    def __init__(self, engine, eos_id: int):
        self.engine, self.eos_id, self.calls = engine, eos_id, 0

    def generate(self, requests, stage="generate"):
        from cluster.engine import Sample

        results = self.engine.generate(requests, stage=stage)
        if self.calls == 0:
            results[0].samples[0] = Sample(token_ids=[self.eos_id], text="", finish_reason="stop", logprobs=[0.0],
                                           top_logprobs=[[(self.eos_id, 0.0)]], entropy=[0.0])
        self.calls += 1
        return results


def test_empty_generation_is_rejected_with_a_reason(engine, tokenizer, problems):
    cfg = parse_config(_config(partition={"method": "newline"}, tree={"enabled": False}))
    result = ShardLabeller(cfg, _EmptyThenRealEngine(engine, tokenizer.eos_token_id), tokenizer).label(problems)
    assert [r.problem_id for r in result.rejected] == [problems[0].problem_id]
    assert "empty generation" in result.rejected[0].reason
    assert {r["problem_id"] for r in result.rows} == {p.problem_id for p in problems[1:]}


def test_unfinished_solution_is_a_negative_final_step(engine, tokenizer, problems):
    """A policy cut off by max_new_tokens never reached an answer: kept, final label False."""
    cfg = parse_config(_config(partition={"method": "newline"}, tree={"enabled": False},
                               rollouts={"n": 2, "max_new_tokens": 6}))
    result = ShardLabeller(cfg, engine, tokenizer).label(problems)
    assert result.rows and not result.rejected
    for row in result.rows:
        assert row["final_correct"] is False and row["labels"][-1] is False
        assert row["completion_tokens"] <= 6
