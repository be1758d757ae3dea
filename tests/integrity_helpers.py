"""Shared by the integrity and fault-injection tests: a tiny JSONL build config and a content hash over rows."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from configs.schema import REPO_ROOT, ToySource


def toy_questions(n: int, seed: int = 31) -> list[dict[str, str]]:
    """`n` two-step toy-world problems as user JSONL rows (`question`, `answer`): the shipped policy solves some."""
    from tasks.sources.toy_world import generate_problems

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
    """sha256 over the table's rows, sorted: equal iff the same multiset of rows (order and files ignored).

    Exact, floats included: engines must run with the same number of torch threads to compare (see
    `OneThreadEngine`), since a different summation order moves entropies in the 7th digit.
    """
    lines = sorted(json.dumps({k: _canonical(v) for k, v in row.items()}, sort_keys=True) for row in table.to_pylist())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def problem_counts(table: pa.Table) -> dict[str, int]:
    """Rows per problem id (a duplicated problem shows up as a count above its reference)."""
    counts: dict[str, int] = {}
    for pid in table.column("problem_id").to_pylist():
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def cli_on_faulty_disk(target: Path, fault: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with `target` read-only or full: a real read-only bind mount, or a 4 KiB tmpfs (full once
    build.json is written), in a private mount namespace when root (permission bits do not stop root); else
    chmod (read-only only)."""
    cmd = [sys.executable, "-m", "prm_factory.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "80"}
    if os.geteuid() == 0 and shutil.which("unshare"):
        mount = (f"mount --bind {target} {target} && mount -o remount,bind,ro {target}" if fault == "read-only"
                 else f"mount -t tmpfs -o size=4k tmpfs {target}")
        shell = f"{mount} && exec {' '.join(shlex.quote(c) for c in cmd)}"
        return subprocess.run(["unshare", "-m", "sh", "-c", shell], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300, env=env)
    if fault == "full" or os.geteuid() == 0:
        pytest.skip("a full disk needs a private tmpfs mount (root with unshare)")
    os.chmod(target, 0o555)
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    finally:
        os.chmod(target, 0o755)


class OneThreadEngine:
    """An in-process engine that computes with one torch thread, as an engine in a Ray actor with under one
    CPU does (Ray sets OMP_NUM_THREADS=1 there): the same tokens either way, and then the same float bits."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(self, requests: list, stage: str = "generate") -> list:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.engine.generate(requests, stage=stage)
        finally:
            torch.set_num_threads(before)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
