"""The cost record and its one sum (tasks/cost.py), on hand-made records."""

from __future__ import annotations

from tasks.cost import COST_STAGES, ShardCost, total_cost


def test_generated_tokens_are_the_stages_only_not_prompt_tokens():
    cost = ShardCost(generate_tokens=3, branch_tokens=4, rollout_tokens=5, prompt_tokens=100, requests=9)
    assert cost.generated_tokens == 12
    assert cost.to_dict()["generated_tokens"] == 12
    assert COST_STAGES == ("generate_tokens", "branch_tokens", "rollout_tokens")


def test_from_dict_reads_a_provenance_record_and_ignores_what_it_does_not_know():
    # a record written by to_dict round-trips; its derived total and unknown keys are not fields
    record = {"generate_tokens": 3, "rollout_tokens": 5, "prompt_tokens": 100, "generated_tokens": 8, "future": 1}
    cost = ShardCost.from_dict(record)
    assert (cost.generate_tokens, cost.branch_tokens, cost.rollout_tokens, cost.prompt_tokens) == (3, 0, 5, 100)
    assert cost.generated_tokens == 8
    assert ShardCost.from_dict({}).generated_tokens == 0
    assert ShardCost.from_dict(ShardCost(1, 2, 3, 4, 5, 6, 7, 8).to_dict()) == ShardCost(1, 2, 3, 4, 5, 6, 7, 8)


def test_total_cost_sums_objects_and_dicts_field_by_field():
    total = total_cost([ShardCost(generate_tokens=10, anchors=2), {"rollout_tokens": 7, "anchors": 1}, {}])
    assert total == ShardCost(generate_tokens=10, rollout_tokens=7, anchors=3)
    assert total.generated_tokens == 17
    assert total_cost([]) == ShardCost()
