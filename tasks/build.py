"""Build a dataset version: ingest -> shards of problems -> label each shard -> Parquet shards -> manifest.

A shard is a fixed slice of the ingested problems; its rows are written atomically, then its completion
record (key and sha256 of the bytes written). A shard is done only while its record names the key planned
now (same labelling config, same problems) and its file still hashes to the recorded sha256: a crashed
build resumes where it stopped, a finished build re-run does no engine work at all, and a shard that went
stale (the source changed before the resume) or was corrupted on disk is rebuilt, with a warning and its
reason in ``BuildReport.rebuilt``. The engine is started only when some shard still needs labelling.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import FactoryConfig
from prm_factory import __version__
from tasks.dataset import (
    NOT_WRITTEN,
    SCHEMA_VERSION,
    atomic_write_bytes,
    check_shard,
    read_manifest,
    shard_info,
    write_manifest,
    write_shard,
)
from tasks.problems import Problem
from tasks.tree_labeller import Generator, Rejected, ShardCost, ShardLabeller, ShardResult

log = logging.getLogger(__name__)

BUILD_MARKER = "build.json"


class BuildError(RuntimeError):
    """The output directory cannot take this build (e.g. it holds a dataset from another config)."""


@dataclass
class IngestResult:
    problems: list[Problem]
    quarantined: list[dict[str, Any]]
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardPlan:
    """A slice of problems that becomes one Parquet shard. `key` changes iff its problems or config do."""

    index: int
    problem_ids: tuple[str, ...]
    key: str


@dataclass
class BuildReport:
    out_dir: Path
    shards_total: int
    shards_built: int
    shards_skipped: int
    rows: int
    cost: ShardCost
    quarantined: int
    rejected: int
    manifest: dict[str, Any]
    rebuilt: dict[int, str] = field(default_factory=dict)  # shard index -> why its file on disk was not reused


def ingest(cfg: FactoryConfig) -> IngestResult:
    """Every configured source's problems, with the rows that could not be used and why.

    Problems without a gold answer (ProcessBench samples) cannot be labelled by rollouts: quarantined.
    """
    from tasks.loaders import load_sources

    problems: list[Problem] = []
    quarantined: list[dict[str, Any]] = []
    per_source: dict[str, dict[str, int]] = {}
    for i, (src, result) in enumerate(load_sources(cfg.sources)):
        bad = [q.to_dict() for q in result.quarantined]
        for p in result.problems:
            if p.answer.strip():
                problems.append(p)
            else:
                bad.append({"source": p.source, "problem_id": p.problem_id, "reason": "no_gold_answer",
                            "detail": "rollout labelling needs a gold answer to check completions against"})
        quarantined.extend(bad)
        per_source[f"{i}:{src.kind}"] = {"kept": len(result.problems) - (len(bad) - len(result.quarantined)),
                                         "quarantined": len(bad)}
    return IngestResult(problems, quarantined, per_source)


def plan_shards(problems: Sequence[Problem], cfg: FactoryConfig) -> list[ShardPlan]:
    """Consecutive slices of `problems_per_shard` problems, in ingest order."""
    size = cfg.dataset.problems_per_shard
    cfg_hash = cfg.labelling_hash()
    plans = []
    for index, start in enumerate(range(0, len(problems), size)):
        ids = tuple(p.problem_id for p in problems[start:start + size])
        key = hashlib.sha256(("\x1f".join((cfg_hash, *ids))).encode()).hexdigest()[:16]
        plans.append(ShardPlan(index, ids, key))
    return plans


def _write_json_atomic(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True).encode())


def _check_out_dir(out: Path, cfg: FactoryConfig) -> None:
    marker = out / BUILD_MARKER
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("config_hash") != cfg.config_hash():
            raise BuildError(
                f"{out} holds a build of config '{previous.get('name')}' (hash {previous.get('config_hash')}); "
                f"this config hashes to {cfg.config_hash()}. Use a new --out, or delete {out} to rebuild."
            )
        return
    if out.exists() and any(out.iterdir()):
        raise BuildError(f"{out} exists and is not a prm-factory build directory; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(marker, {"name": cfg.name, "config_hash": cfg.config_hash(), "code_version": __version__,
                                "config": cfg.model_dump(mode="json")})


def load_tokenizer(cfg: FactoryConfig):
    from transformers import AutoTokenizer

    from configs.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(cfg.policy.model_path, offline=cfg.offline,
                                                           tokenizer_only=True)))


def prepare(cfg: FactoryConfig, out_dir: str | Path) -> tuple[IngestResult, list[ShardPlan]]:
    """Check the output directory, ingest the sources (writing the quarantine) and plan the shards."""
    out = Path(out_dir)
    _check_out_dir(out, cfg)
    ingested = ingest(cfg)
    _write_json_atomic(out / "ingest.json", {"per_source": ingested.per_source,
                                             "problems": len(ingested.problems),
                                             "quarantined": len(ingested.quarantined)})
    _write_lines_atomic(out / "quarantine.jsonl", [json.dumps(row, default=str) for row in ingested.quarantined])
    (out / "rejected").mkdir(exist_ok=True)
    return ingested, plan_shards(ingested.problems, cfg)


def label_shard(cfg: FactoryConfig, out_dir: str | Path, plan: ShardPlan, problems: Sequence[Problem],
                labeller: ShardLabeller) -> ShardCost:
    """Label one shard's problems and write its rows (atomically) and its rejects. Returns its cost."""
    out = Path(out_dir)
    fits, too_long = split_by_context(cfg, problems, labeller.tok)
    result = labeller.label(fits) if fits else ShardResult([], ShardCost())
    for row in result.rows:
        row["shard"] = plan.index
    _write_lines_atomic(out / "rejected" / f"part-{plan.index:05d}.jsonl",
                        [json.dumps(r.__dict__) for r in too_long + result.rejected])
    # The shard file is written last: its existence is what marks the shard done.
    write_shard(out, plan.index, result.rows, {
        "name": cfg.name, "config_hash": cfg.config_hash(), "code_version": __version__,
        "schema_version": SCHEMA_VERSION, "shard_key": plan.key, "labelling_hash": cfg.labelling_hash(),
        "problems": len(plan.problem_ids),
        "cost": result.cost.to_dict(), "rejected": len(too_long) + len(result.rejected),
    })
    return result.cost


def split_by_context(cfg: FactoryConfig, problems: Sequence[Problem], tokenizer: Any
                     ) -> tuple[list[Problem], list[Rejected]]:
    """The problems whose prompt leaves room for a solution in the policy's context, and the rest, rejected.

    An engine refuses a prompt that fills its context, and it refuses the whole batch: one over-long question
    would otherwise end the build. Such a problem produces no row and is recorded with its reason.
    """
    limit = cfg.policy.max_model_len
    fits: list[Problem] = []
    too_long: list[Rejected] = []
    for p in problems:
        n = len(tokenizer.encode(cfg.policy.prompt_template.format(question=p.question), add_special_tokens=False))
        if n >= limit:
            too_long.append(Rejected(p.problem_id, p.source, f"prompt_too_long: the prompt is {n} tokens, the "
                                     f"policy's context (policy.max_model_len) is {limit}"))
        else:
            fits.append(p)
    return fits, too_long


def finalize(cfg: FactoryConfig, out_dir: str | Path, plans: Sequence[ShardPlan], ingested: IngestResult,
             parents: Sequence[str] = (), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest over every planned shard (all must be done); `extra` adds keys (e.g. lineage)."""
    out = Path(out_dir)
    not_done = {p.index: reason for p in plans if (reason := check_shard(out, p.index, p.key)) is not None}
    if not_done:
        raise BuildError(f"cannot write the manifest: shards not done: {not_done}")
    # The hashes come from the completion records written with the shards, never from the files as they are
    # now; check_shard just confirmed that the files still match them.
    infos = [shard_info(out, plan.index) for plan in plans]
    return write_manifest(out, schema_version=SCHEMA_VERSION, config_hash=cfg.config_hash(),
                          code_version=__version__, shards=infos, parents=list(parents),
                          extra={**_manifest_extra(cfg, out, plans, ingested), **(extra or {})})


def build(cfg: FactoryConfig, out_dir: str | Path, engine_factory: Callable[[], Generator],
          *, progress: Callable[[str, int], None] | None = None,
          on_shard: Callable[[ShardPlan, str], None] | None = None) -> BuildReport:
    """Build (or resume) the dataset for `cfg` in `out_dir`; `engine_factory` is called at most once."""
    out = Path(out_dir)
    ingested, plans = prepare(cfg, out)
    by_id = {p.problem_id: p for p in ingested.problems}
    labeller: ShardLabeller | None = None
    built = skipped = 0
    rebuilt: dict[int, str] = {}
    total_cost = ShardCost()
    for plan in plans:
        status = "skipped"
        reason = check_shard(out, plan.index, plan.key)
        if reason is None:
            skipped += 1
        else:
            status = "built"
            if reason != NOT_WRITTEN:
                status = "rebuilt"
                rebuilt[plan.index] = reason
                log.warning("shard %d: the file on disk is not reused (%s); rebuilding it", plan.index, reason)
            if labeller is None:
                labeller = ShardLabeller(cfg, engine_factory(), load_tokenizer(cfg), progress)
            total_cost.add(label_shard(cfg, out, plan, [by_id[pid] for pid in plan.problem_ids], labeller))
            built += 1
        if on_shard:
            on_shard(plan, status)
    manifest = finalize(cfg, out, plans, ingested)
    rejected = sum(len((out / "rejected" / f"part-{p.index:05d}.jsonl").read_text().splitlines())
                   for p in plans if (out / "rejected" / f"part-{p.index:05d}.jsonl").exists())
    return BuildReport(out, len(plans), built, skipped, manifest["num_rows"], total_cost,
                       len(ingested.quarantined), rejected, manifest, rebuilt)


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())


def _manifest_extra(cfg: FactoryConfig, out: Path, plans: list[ShardPlan], ingested: IngestResult) -> dict:
    """Totals for the manifest: cost per stage summed from every shard's provenance, keys per shard."""
    import pyarrow.parquet as pq

    cost = ShardCost()
    for plan in plans:
        meta = pq.read_schema(out / "shards" / f"part-{plan.index:05d}.parquet").metadata or {}
        prov = json.loads(meta.get(b"prm_factory", b"{}"))
        for name, value in prov.get("cost", {}).items():
            if name in cost.__dataclass_fields__:
                setattr(cost, name, getattr(cost, name) + int(value))
    return {
        "name": cfg.name,
        "policy_model": cfg.policy.model_path,
        "shard_keys": [plan.key for plan in plans],
        "problems": len(ingested.problems),
        "quarantined": len(ingested.quarantined),
        "cost": cost.to_dict(),
    }


def read_build_manifest(out_dir: str | Path) -> dict[str, Any]:
    return read_manifest(Path(out_dir))
