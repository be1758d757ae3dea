"""The labelling procedure end to end on toy problems with a real engine (transformers, in process).

Checks the contracts the dataset relies on: EDU cuts sit at high-entropy tokens, counts are exactly N
policy samples from the prefix (the one tree leaf sampled from it plus fresh rollouts), the last step is
the final answer's correctness, a shard labelled twice gives the same rows, the cost controls really spend
fewer tokens and mark their steps (early stop, estimated) with real counts and null soft/ER labels.
Label quality against the toy truth is measured on the default build in tests/tasks/labelling/test_rollouts.py.
"""

from __future__ import annotations

import json
import math

import pytest

from configs.schema import REPO_ROOT, ToySource, parse_config
from tasks.labelling.tree_labeller import ShardLabeller, Trajectory, tree_value
from tasks.sources.toy_world import check_solution, generate_problems

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
        for column in ("labels", "successes", "rollouts", "soft_labels", "er_labels", "tree_value",
                       "step_entropies", "step_origin"):
            assert len(row[column]) == n_steps, column
        solution = "".join(row["completions"])
        truth = check_solution(by_id[row["problem_id"]], solution)
        assert row["final_correct"] == truth.final_correct
        assert row["labels"][-1] == truth.final_correct and row["step_origin"][-1] == "final"
        for k, n, origin, soft, tv in zip(row["successes"][:-1], row["rollouts"][:-1], row["step_origin"][:-1],
                                          row["soft_labels"][:-1], row["tree_value"][:-1], strict=True):
            assert 0 <= k <= n
            # Exactly N: the one leaf sampled from the prefix plus N - 1 fresh rollouts. Counting every leaf
            # under the prefix (forced branch tokens included) would make n > N on branched prefixes.
            assert n == cfg.rollouts.n
            assert origin == "rollout" and soft == k / n
            assert 0.0 <= tv <= 1.0
        # EDU: every cut after the first step sits at a token whose entropy reached tau.
        assert all(h >= cfg.partition.tau for h in row["step_entropies"][1:])
        assert len(row["completions"]) - 1 <= cfg.partition.max_anchors
        assert json.loads(row["partitioner_params"])["tau"] == cfg.partition.tau


def _leaf(tokens, logprobs, final, parent=None, anchor=0):
    return Trajectory(token_ids=tokens, entropy=[0.0] * len(tokens), top_alternatives=[[]] * len(tokens),
                      finish_reason="stop", branch_at=anchor + 1 if parent else 0, final_correct=final,
                      token_logprobs=logprobs, forced_at=(*parent.forced_at, anchor) if parent else (), parent=parent)


def test_forced_tokens_and_tree_value_on_a_hand_built_tree():
    """Root R samples token 3 at position 2 (p = 0.6); child C is forced to token 7 there (p = 0.3) and samples
    token 8 at position 3 (p = 0.8), where grandchild G is forced to token 6 (p = 0.2)."""
    ln = math.log
    root = _leaf([1, 2, 3, 4, 5], [ln(0.9), ln(0.9), ln(0.6), ln(0.9), ln(0.9)], True)
    child = _leaf([1, 2, 7, 8, 9], [ln(0.9), ln(0.9), ln(0.3), ln(0.8), ln(0.9)], False, root, 2)
    grand = _leaf([1, 2, 7, 6, 0], [ln(0.9), ln(0.9), ln(0.3), ln(0.2), ln(0.9)], True, child, 3)
    # A leaf is a sample from token_ids[:end] only when no forced token sits at or after `end`.
    assert [root.sampled_after(e) for e in (1, 2, 3)] == [True, True, True]
    assert [child.sampled_after(e) for e in (2, 3, 4)] == [False, True, True]
    assert [grand.sampled_after(e) for e in (3, 4)] == [False, True]
    children = {id(root): [child], id(child): [grand]}
    # v(C, 3) = (0.8 * 0 + 0.2 * 1) / 1.0 = 0.2; v(R, 0) = (0.6 * 1 + 0.3 * 0.2) / 0.9
    assert tree_value(child, 3, children) == pytest.approx(0.2)
    assert tree_value(root, 0, children) == pytest.approx((0.6 + 0.3 * 0.2) / 0.9)
    assert tree_value(root, 3, children) == 1.0  # past the last branch: the leaf's own outcome
    assert tree_value(grand, 4, children) == 1.0


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
    assert "estimated" in origins and set(origins) <= {"estimated", "rollout"}
    for row in bisect.rows:
        for k, n, origin, soft, er in zip(row["successes"][:-1], row["rollouts"][:-1], row["step_origin"][:-1],
                                          row["soft_labels"][:-1], row["er_labels"][:-1], strict=True):
            if origin == "estimated":  # labelled by rule: its only sample is the trajectory itself
                assert (k, n) == (int(row["final_correct"]), 1) and soft is None and er is None
            else:  # a bisection probe: N samples from the prefix
                assert n == 4 and soft == k / 4 and er is not None
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
    stopped = 0
    for row in early.rows:
        for k, n, origin, hard, soft, er in zip(row["successes"][:-1], row["rollouts"][:-1], row["step_origin"][:-1],
                                                row["labels"][:-1], row["soft_labels"][:-1], row["er_labels"][:-1],
                                                strict=True):
            assert origin == "early_stop" and soft is None and er is None and hard == (k > 0)
            assert 1 <= n <= 8
            assert k > 0 or n == 8, "a prefix without success is rolled out to the full N"
            # Waves of 1 (the trajectory itself), then 2, 2, 4 (N/4, N/4, the rest): a success stops it.
            assert n in (1, 3, 5, 8)
            stopped += n < 8
    assert stopped > 0, "some prefixes should stop early"


class _EmptyThenRealEngine:
    """Engine double for one edge case: the first problem's root solution comes back empty (EOS at once)."""

    def __init__(self, engine, eos_id: int):
        self.engine, self.eos_id, self.calls = engine, eos_id, 0

    def generate(self, requests, stage="generate"):
        from tasks.generation import Sample

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


def test_rollouts_get_a_generate_callable_not_the_labeller(engine, tokenizer, problems):
    """run_rollouts works from plain data: a generate(requests, stage) call, the config, eos ids and decode.
    Binary search's rule labels are keyed by (plan index, step), a key that outlives any object."""
    import ast
    import inspect
    from dataclasses import dataclass

    import tasks.labelling.rollouts as rollouts
    from tasks.cost import ShardCost
    from tasks.labelling.rollouts import LeafSteps, RolloutContext, run_rollouts

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(rollouts)))
                if isinstance(node, ast.ImportFrom)}
    assert "tasks.labelling.tree_labeller" not in imported  # the labeller imports rollouts, never the reverse

    cfg = parse_config(_config(partition={"method": "newline"}, rollouts={"n": 4, "binary_search": True}))
    labeller = ShardLabeller(cfg, engine, tokenizer)
    prompts, trees = labeller.grow_trees(problems, ShardCost())

    @dataclass(frozen=True)
    class WrongLeaf:  # plain data, no Trajectory: the real tokens, taken as a solution that ended wrong
        token_ids: list[int]
        final_correct: bool = False

    plans = [LeafSteps(p, WrongLeaf(leaf.token_ids), labeller.boundaries(leaf))
             for p in problems for leaf in trees[p.problem_id]]
    plans.append(LeafSteps(problems[0], WrongLeaf(trees[problems[0].problem_id][0].token_ids, True), plans[0].bounds))
    assert sum(plan.num_steps for plan in plans) >= 4  # there is something to bisect
    stats = {plan.prefix(s): [0, 0] for plan in plans for s in range(plan.num_steps)}
    stages: list[str] = []

    def generate(requests, stage):
        stages.append(stage)
        return engine.generate(requests, stage=stage)

    ctx = RolloutContext(generate=generate, config=cfg.rollouts, seed=cfg.seed,
                         eos_token_ids=[tokenizer.eos_token_id],
                         decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    ledger = run_rollouts(ctx, plans, prompts, stats)
    assert stages and set(stages) == {"rollout"}
    assert all(stats[key][1] == 4 for key in ledger.rolled)  # each probed prefix got exactly N samples
    assert {k for k, (_, n) in stats.items() if n} == ledger.rolled
    for i, plan in enumerate(plans):
        for step in range(plan.num_steps):
            # every step is either probed (its own counts label it) or labelled by the rule under (i, step)
            assert (plan.prefix(step) in ledger.rolled) != ((i, step) in ledger.forced) or plan.leaf.final_correct
        if plan.leaf.final_correct:
            assert all(ledger.forced[(i, s)] for s in range(plan.num_steps))
    assert set(ledger.forced) <= {(i, s) for i, plan in enumerate(plans) for s in range(plan.num_steps)}
