"""Shared by the integrity and fault-injection tests: a tiny JSONL build config and a content hash over rows."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from configs.schema import REPO_ROOT, ToySource


def toy_questions(n: int, seed: int = 31) -> list[dict[str, str]]:
    """`n` two-step toy-world problems as user JSONL rows (`question`, `answer`): the shipped policy solves some."""
    from tasks.toy_world import generate_problems

    problems = generate_problems(ToySource(num_problems=n, seed=seed, min_steps=2, max_steps=2))
    return [{"question": p.question, "answer": p.answer} for p in problems]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_config(source: Path, name: str = "integrity", **overrides: Any) -> dict[str, Any]:
    """Cheapest real build: newline steps, no tree, N=1, 32 new tokens, 1 problem per shard, HF engine."""
    cfg = {
        "name": name,
        "seed": 3,
        "sources": [{"kind": "jsonl", "path": str(source)}],
        "policy": {"model_path": str(REPO_ROOT / "assets" / "toy-policy"), "backend": "transformers",
                   "max_model_len": 128},
        "partition": {"method": "newline"},
        "tree": {"enabled": False},
        "rollouts": {"n": 1, "max_new_tokens": 32},
        "dataset": {"problems_per_shard": 1},
    }
    cfg.update(overrides)
    return cfg


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def rows_digest(table: pa.Table) -> str:
    """sha256 over the table's rows, sorted: equal iff the same multiset of rows (order and files ignored)."""
    lines = sorted(json.dumps({k: _canonical(v) for k, v in row.items()}, sort_keys=True) for row in table.to_pylist())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def problem_counts(table: pa.Table) -> dict[str, int]:
    """Rows per problem id (a duplicated problem shows up as a count above its reference)."""
    counts: dict[str, int] = {}
    for pid in table.column("problem_id").to_pylist():
        counts[pid] = counts.get(pid, 0) + 1
    return counts
