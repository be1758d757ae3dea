"""What labelling costs: tokens per stage of one shard, and the one sum over shards.

The cost that matters is generated tokens: the policy's root solutions (``generate``), the tree's branches
(``branch``) and the rollouts from step prefixes (``rollout``); prompt (prefill) tokens and the share of them
served from the prefix cache are counted beside them, not in ``generated_tokens``. Every shard records its
``ShardCost`` in its provenance (tasks/store/dataset.py); a dataset's total in its manifest, a report's per-stage
figures, a flow's progress and the benchmarks' token counts are all ``total_cost`` over those records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

COST_STAGES = ("generate_tokens", "branch_tokens", "rollout_tokens")  # the generated tokens, by stage


@dataclass
class ShardCost:
    """Generated tokens per stage for one shard (or a sum of shards): the cost that matters."""

    generate_tokens: int = 0
    branch_tokens: int = 0
    rollout_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    requests: int = 0
    anchors: int = 0
    capped_partitions: int = 0

    @property
    def generated_tokens(self) -> int:
        return sum(getattr(self, stage) for stage in COST_STAGES)

    def add(self, other: ShardCost) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict[str, int]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["generated_tokens"] = self.generated_tokens
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, object]) -> ShardCost:
        """A cost record as written by `to_dict` (a shard's provenance); keys it does not know are ignored,
        and a record written before a field existed counts that field as 0."""
        known = {f.name for f in fields(cls)}
        return cls(**{name: int(value) for name, value in record.items() if name in known})  # type: ignore[arg-type]


def total_cost(records: Iterable[ShardCost | Mapping[str, object]]) -> ShardCost:
    """The sum of cost records (ShardCost objects or their dicts), field by field."""
    total = ShardCost()
    for record in records:
        total.add(record if isinstance(record, ShardCost) else ShardCost.from_dict(record))
    return total
