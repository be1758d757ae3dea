"""The active run's directory: what it is pinned to, the pool file, the finished rounds' log and the resume checks.

One run lives in one output directory::

    OUT/active.json              what the run is pinned to (config name and hashes); another config is refused
    OUT/pool/pool.parquet        the pool: one policy solution per problem, cut into steps, no rollouts
    OUT/pool/pool.json           its ids, sha256 and the tokens its generation cost
    OUT/labels/versions/<id>/    the labels bought so far, one dataset version per round (tasks/store/versions.py):
    OUT/labels/LATEST            shard r holds round r's rows; version r links shards 0..r-1 from version r-1
    OUT/rounds/round-RRR/        selection.json (written before labelling) and prm/ (the Ray Train run dir)
    OUT/rounds.jsonl             one line per finished round: the round's figures and hashes
    OUT/summary.json             the last run's stop reason and totals

The loop that fills it is tasks/active/loop.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from configs.env import __version__
from configs.schema import FactoryConfig
from tasks.store.dataset import MANIFEST_NAME, atomic_write_bytes, read_manifest, sha256_file
from tasks.store.versions import content_id, versions_dir

log = logging.getLogger(__name__)

PIN_FILE = "active.json"
POOL_DIR = "pool"
LABELS_DIR = "labels"
ROUNDS_DIR = "rounds"
ROUNDS_LOG = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
SELECTION_FILE = "selection.json"
CALIBRATION_FILE = "calibration.json"
PRM_DIR = "prm"


class ActiveError(RuntimeError):
    """An active run that cannot start or go on (empty pool, budget too small, another config's directory)."""


@dataclass(frozen=True)
class PoolItem:
    """One unlabelled pool trajectory: the policy's own solution to a problem, cut into steps."""

    problem_id: str
    source: str
    prompt: str
    completions: list[str]
    completion_tokens: int
    finish_reason: str


def write_json(path: Path, payload: Any) -> None:
    """`payload` as indented, sorted JSON at `path`, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def pin_payload(cfg: FactoryConfig) -> dict[str, Any]:
    """What an output directory is pinned to: what its pool and its bought labels mean.

    A resume may change how far the loop goes and how it picks from now on (rounds, budget, thresholds, the cap per
    round, the ruler size) and where the pool is scored (the scorer: the same scores); not the pool, the labeller,
    the trainer, the selector, round 0 or the warm start.
    """
    active = cfg.active.model_dump(mode="json", exclude={"rounds", "label_token_budget", "selection",
                                                         "max_selected", "ruler_problems", "scorer"})
    for name, default in _LATER_ACTIVE_DEFAULTS.items():  # pinned only when set: older runs keep their pin
        if active.get(name) == default:
            active.pop(name)
    return {"name": cfg.name, "labelling_hash": cfg.labelling_hash(), "train_hash": cfg.train.train_hash(),
            "sources": [s.model_dump(mode="json") for s in cfg.sources],
            **{f"active.{k}": v for k, v in active.items()}}


_LATER_ACTIVE_DEFAULTS = {"schedule": "rounds", "batch_size": 64}


def check_out_dir(out: Path, cfg: FactoryConfig) -> bool:
    """Pin OUT to this config (or check the pin); True when OUT already holds this run (a resume)."""
    pin = pin_payload(cfg)
    path = out / PIN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in pin if old.get(k) != pin[k]]
        if changed:
            raise ActiveError(f"{out} holds an active run of another config ({', '.join(changed)} differ); "
                              "use a new --out, or delete it")
        return True
    if out.exists() and any(out.iterdir()):
        raise ActiveError(f"{out} exists and is not an active-run directory; choose an empty or new --out")
    write_json(path, {**pin, "code_version": __version__})
    return False


def read_rounds(out: Path) -> list[dict[str, Any]]:
    """The finished rounds' records, in order (a torn last line, from a kill mid-write, is ignored)."""
    path = out / ROUNDS_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: ignoring a torn line (a kill while it was written)", path)
    for i, r in enumerate(records):
        if r.get("round") != i:
            raise ActiveError(f"{path}: line {i + 1} is round {r.get('round')}, expected {i}")
    return records


def append_round(out: Path, record: dict[str, Any]) -> None:
    """One finished round's record, appended to rounds.jsonl (atomically; a torn last line is dropped first)."""
    path = out / ROUNDS_LOG
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):  # a torn line from a kill: drop it before appending
        text = text[: text.rfind("\n") + 1]
    atomic_write_bytes(path, (text + json.dumps(record, sort_keys=True, default=str) + "\n").encode())


def write_pool(out: Path, items: Sequence[PoolItem], meta: dict[str, Any]) -> dict[str, Any]:
    """pool.parquet (atomically) and pool.json with its ids, sha256 and cost."""
    table = pa.Table.from_pylist([asdict(i) for i in items], schema=pa.schema([
        ("problem_id", pa.string()), ("source", pa.string()), ("prompt", pa.string()),
        ("completions", pa.list_(pa.string())), ("completion_tokens", pa.int64()), ("finish_reason", pa.string())]))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    path = out / POOL_DIR / "pool.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    record = {**meta, "trajectories": len(items), "sha256": hashlib.sha256(data).hexdigest(),
              "problem_ids": [i.problem_id for i in items]}
    write_json(out / POOL_DIR / "pool.json", record)
    return record


def read_pool(out: Path, labelling_hash: str) -> tuple[list[PoolItem], dict[str, Any]] | None:
    """The pool written before (None when absent, or written for another labelling config, or damaged)."""
    meta_path, path = out / POOL_DIR / "pool.json", out / POOL_DIR / "pool.parquet"
    if not meta_path.is_file() or not path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("labelling_hash") != labelling_hash or sha256_file(path) != meta.get("sha256"):
        log.warning("%s is stale or damaged: generating the pool again", path)
        return None
    items = [PoolItem(**row) for row in pq.read_table(path).to_pylist()]
    return items, meta


def complete_version(root: Path, keys: Sequence[str]) -> str | None:
    """A finished version of exactly this plan (a killed run wrote its manifest before its round record)."""
    suffix = content_id(keys)
    for d in sorted(versions_dir(root).glob(f"*-{suffix}")) if versions_dir(root).is_dir() else []:
        if (d / MANIFEST_NAME).is_file() and read_manifest(d).get("extra", {}).get("shard_keys") == list(keys):
            return d.name
    return None
