"""The build pipeline, defined once: prepare -> label shard -> finalize. Two executors run it.

Each stage reads what the stage before it wrote in the output directory, as datatrove's pipeline steps read
files, so a stage can run in another process (a Prefect task) with nothing but the directory and a shard
reference:

- ``prepare(cfg, out)``: the only stage that reads the sources. Checks the output directory, ingests every
  source once, writes ``problems.parquet`` (the kept problems, in ingest order), ``quarantine.jsonl`` (every
  row not kept, with its reason) and ``ingest.json`` (counts per source), and plans the shards from them.
- ``run_shard(cfg, out, plan, labeller)``: one shard: skipped when done, else its problems are read back from
  ``problems.parquet`` and labelled; its rows are written atomically, then its completion record (key and
  sha256 of the bytes written), and its rejects to ``rejected/``.
- ``finalize(cfg, out)``: the manifest over every planned shard (all must be done), totals from
  ``ingest.json`` and the shards' provenance.

Executors: ``build`` below runs the stages in one process, shard after shard (the CLI's ``build``);
flows/build_dataset.py and flows/refresh.py run each stage as a Prefect task and the shards in parallel on
the Ray engine pool.

A shard is done only while its record names the key planned now (same labelling config, same problems) and
its file still hashes to the recorded sha256: a crashed build resumes where it stopped, a finished build
re-run does no engine work at all, and a shard that went stale (the source changed before the resume: the
resume's ``prepare`` reads the sources again and plans new keys) or was corrupted on disk is rebuilt, with a
warning and its reason in ``BuildReport.rebuilt``. The engine is started only when some shard still needs
labelling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.env import __version__
from configs.schema import FactoryConfig
from tasks.cost import ShardCost, total_cost
from tasks.generation import Engine
from tasks.io import (
    REJECTED_DIR,
    atomic_write_json,
    atomic_write_lines,
    read_provenance,
    reject_path,
    sha256_file,
    shard_path,
    writer_lock,
)
from tasks.labelling.labellers import make_labeller
from tasks.labelling.tree_labeller import Rejected, ShardLabeller, ShardResult
from tasks.sources.loaders import QuarantineRow
from tasks.sources.problems import Problem
from tasks.sources.prompts import render_prompt
from tasks.store.dataset import (
    BUILD_MARKER,
    INGEST_REPORT,
    NOT_WRITTEN,
    PROBLEMS_FILE,
    PROBLEMS_SHA256,
    SCHEMA_VERSION,
    check_shard,
    shard_info,
    write_manifest,
    write_shard,
)

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.jsonl"
INGEST_FILES = (PROBLEMS_FILE, QUARANTINE_FILE, INGEST_REPORT)


class BuildError(RuntimeError):
    """The output directory cannot take this build (e.g. it holds a dataset from another config)."""


@dataclass
class IngestResult:
    """The kept problems (in source order), every row not kept, and per source: kind, path, counts, reasons."""

    problems: list[Problem]
    quarantined: list[QuarantineRow]
    per_source: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ShardPlan:
    """A slice of problems that becomes one Parquet shard. `key` changes iff its problems or config do.

    Its problems are rows ``start .. start + len(problem_ids)`` of ``problems.parquet``.
    """

    index: int
    problem_ids: tuple[str, ...]
    key: str
    start: int = 0


@dataclass(frozen=True)
class Prepared:
    """What `prepare` wrote: the shard plans and the counts of kept and quarantined problems."""

    out_dir: Path
    plans: list[ShardPlan]
    problems: int
    quarantined: int


@dataclass(frozen=True)
class ShardOutcome:
    """One shard's run: ``skipped`` (done already), ``built``, or ``rebuilt`` (with why its old file was not used)."""

    index: int
    status: str
    rows: int
    cost: ShardCost
    reason: str | None = None


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


# -- ingest: the sources, read once per build ----------------------------------------------------------


def ingest(cfg: FactoryConfig) -> IngestResult:
    """Every configured source's problems, with the rows that could not be used and why.

    Problems without a gold answer (ProcessBench samples) cannot be labelled by rollouts: quarantined, with
    the reason ``no_gold_answer``. Raises ``tasks.sources.loaders.SourceError`` for a source that cannot be read.
    """
    from tasks.sources.loaders import load_sources, raw_row

    problems: list[Problem] = []
    quarantined: list[QuarantineRow] = []
    per_source: list[dict[str, Any]] = []
    for i, (src, result) in enumerate(load_sources(cfg.sources)):
        path = str(getattr(src, "path", "") or "")
        bad = list(result.quarantined)
        for p in result.problems:
            if p.answer.strip():
                problems.append(p)
            else:
                bad.append(QuarantineRow(src.kind, 0, "no_gold_answer", raw_row(p.to_dict()),
                                         f"problem {p.problem_id}: rollout labelling needs a gold answer to check "
                                         "completions against", path))
        quarantined.extend(bad)
        per_source.append({"index": i, "kind": src.kind, "path": path, "kept": len(result.problems) + len(
            result.quarantined) - len(bad), "quarantined": len(bad),
            "reasons": dict(Counter(q.reason for q in bad).most_common())})
    return IngestResult(problems, quarantined, per_source)


def write_ingest(cfg: FactoryConfig, ingested: IngestResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``problems.parquet`` and ``quarantine.jsonl`` (each atomically) into `out_dir`; their paths."""
    from tasks.sources.loaders import write_problems, write_quarantine

    out = Path(out_dir)
    problems = write_problems(ingested.problems, out / PROBLEMS_FILE,
                              provenance={"config": cfg.name, "config_hash": cfg.config_hash()})
    return problems, write_quarantine(ingested.quarantined, out / QUARANTINE_FILE)


def stage_ingest(cfg: FactoryConfig, staging_dir: str | Path) -> list[ShardPlan]:
    """Ingest into `staging_dir` (problems, quarantine, counts) and plan the shards, for `prepare(staged=...)`.

    A refresh needs the shard keys before it knows which version directory to prepare: it stages the
    ingest, plans from it, and `prepare` then moves the staged files into the version instead of reading
    the sources a second time.
    """
    staging = Path(staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    ingested = ingest(cfg)
    problems_path, _ = write_ingest(cfg, ingested, staging)
    # The problems file's sha256 as written: `prm-factory verify` checks the file against it (its rows are
    # what the shards were labelled from, and a refresh plans from them).
    atomic_write_json(staging / INGEST_REPORT, {"per_source": ingested.per_source,
                                                 "problems": len(ingested.problems),
                                                 "quarantined": len(ingested.quarantined),
                                                 PROBLEMS_SHA256: sha256_file(problems_path)})
    return plan_shards([p.problem_id for p in ingested.problems], cfg)


def shard_key(labelling_hash: str, problem_ids: Sequence[str]) -> str:
    """The key of a shard: what decides its rows (the config's labelling hash and its problems, in order). A
    build's shard and an active round's shard are keyed alike."""
    return hashlib.sha256("\x1f".join((labelling_hash, *problem_ids)).encode()).hexdigest()[:16]


def plan_shards(problem_ids: Sequence[str], cfg: FactoryConfig) -> list[ShardPlan]:
    """Consecutive slices of `problems_per_shard` problem ids, in ingest order."""
    size = cfg.dataset.problems_per_shard
    cfg_hash = cfg.labelling_hash()
    plans = []
    for index, start in enumerate(range(0, len(problem_ids), size)):
        ids = tuple(problem_ids[start:start + size])
        plans.append(ShardPlan(index, ids, shard_key(cfg_hash, ids), start))
    return plans


# -- what prepare wrote, read back by the later stages -------------------------------------------------

_tables_lock = threading.Lock()
_tables: dict[tuple[str, int, int, int], Any] = {}  # problems.parquet by (path, inode, size, mtime): one read


def _problems_table(out_dir: str | Path) -> tuple[tuple[str, int, int, int], Any]:
    """The ``problems.parquet`` of `out_dir` as a pyarrow table, read once per file version in this process;
    returned with the file version's key.

    The shard tasks of one flow run are threads of one process: they share one read, not one per shard.
    A file rewritten by a resumed `prepare` is a new inode (atomic rename), hence a new read.
    """
    import pyarrow.parquet as pq

    path = Path(out_dir) / PROBLEMS_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BuildError(f"{path} is missing: run prepare (the build) first") from None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _tables_lock:
        if key not in _tables:
            _tables.clear()  # only the latest version of a file is read again
            _tables[key] = pq.read_table(path)
        return key, _tables[key]


_plans: dict[tuple, list[ShardPlan]] = {}  # (file version, labelling hash, shard size) -> plans


def read_plans(cfg: FactoryConfig, out_dir: str | Path) -> list[ShardPlan]:
    """The shard plans of the problems `prepare` wrote into `out_dir` (planned once per file version)."""
    file_key, table = _problems_table(out_dir)
    key = (file_key, cfg.labelling_hash(), cfg.dataset.problems_per_shard)
    with _tables_lock:
        if key not in _plans:
            if len(_plans) > 8:  # a flow run plans one directory; keep the cache from growing in a long process
                _plans.clear()
            _plans[key] = plan_shards(table.column("problem_id").to_pylist(), cfg)
        return list(_plans[key])


def read_plan(cfg: FactoryConfig, out_dir: str | Path, index: int, key: str) -> ShardPlan:
    """Shard `index` as planned from `out_dir`'s problems; BuildError when its key is not `key` any more."""
    plans = read_plans(cfg, out_dir)
    if index >= len(plans) or plans[index].key != key:
        now = plans[index].key if index < len(plans) else "no such shard"
        raise BuildError(f"shard {index}: the problems changed since planning (key {now}, expected {key})")
    return plans[index]


def read_problems(out_dir: str | Path, plan: ShardPlan) -> list[Problem]:
    """The problems of one shard, read back from ``problems.parquet`` (meta decoded from its JSON string)."""
    rows = _problems_table(out_dir)[1].slice(plan.start, len(plan.problem_ids)).to_pylist()
    problems = [Problem(r["problem_id"], r["source"], r["question"], r["answer"], r["split"], json.loads(r["meta"]))
                for r in rows]
    if tuple(p.problem_id for p in problems) != plan.problem_ids:
        raise BuildError(f"shard {plan.index}: {PROBLEMS_FILE} no longer holds its problems; run prepare again")
    return problems


def read_ingest_report(out_dir: str | Path) -> dict[str, Any]:
    """``ingest.json``: counts of kept and quarantined problems, per source and in total."""
    return json.loads((Path(out_dir) / INGEST_REPORT).read_text())


# -- the stages ------------------------------------------------------------------------------------------


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
    atomic_write_json(marker, {"name": cfg.name, "config_hash": cfg.config_hash(), "code_version": __version__,
                                "config": cfg.model_dump(mode="json")})


def load_tokenizer(cfg: FactoryConfig):
    from transformers import AutoTokenizer

    from configs.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(cfg.policy.model_path, offline=cfg.offline,
                                                           tokenizer_only=True)))


def prepare(cfg: FactoryConfig, out_dir: str | Path, staged: str | Path | None = None) -> Prepared:
    """Stage 1: check the output directory, ingest the sources into it (problems, quarantine, counts), plan shards.

    `staged`: a directory `stage_ingest` wrote for this config; its files are moved in instead of reading the
    sources again (the directory is removed).
    """
    out = Path(out_dir)
    _check_out_dir(out, cfg)
    if staged is None:
        stage_ingest(cfg, out)
    else:
        staged = Path(staged)
        for name in INGEST_FILES:
            os.replace(staged / name, out / name)  # same file system: the version directory's root holds both
        staged.rmdir()
    (out / REJECTED_DIR).mkdir(exist_ok=True)
    report = read_ingest_report(out)
    return Prepared(out, read_plans(cfg, out), int(report["problems"]), int(report["quarantined"]))


def label_shard(cfg: FactoryConfig, out_dir: str | Path, plan: ShardPlan, labeller: ShardLabeller) -> ShardCost:
    """Label one shard's problems (read from ``problems.parquet``) and write its rows (atomically) and rejects."""
    out = Path(out_dir)
    fits, too_long = split_by_context(cfg, read_problems(out, plan), labeller.tok)
    result = labeller.label(fits) if fits else ShardResult([], ShardCost())
    write_labelled_shard(cfg, out, plan.index, plan.key, result, problems=len(plan.problem_ids), rejected=too_long)
    return result.cost


def write_labelled_shard(cfg: FactoryConfig, out_dir: str | Path, index: int, key: str, result: ShardResult, *,
                         problems: int, rejected: Sequence[Rejected] = (),
                         provenance: dict[str, Any] | None = None) -> None:
    """The factory's one shard writer (a build's shards, the active loop's round shards): the problems that
    produced no row go to ``rejected/part-<index>.jsonl`` with their reason, then the rows are written, atomically,
    with their provenance (config and code versions, the shard key, the cost record; `provenance` adds keys).

    The shard file is written last: its existence, with its completion record, is what marks the shard done.
    """
    rejects = [*rejected, *result.rejected]
    path = reject_path(out_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_lines(path, [json.dumps(r.__dict__) for r in rejects])
    write_shard(out_dir, index, result.rows, {
        "name": cfg.name, "config_hash": cfg.config_hash(), "code_version": __version__,
        "schema_version": SCHEMA_VERSION, "shard_key": key, "labelling_hash": cfg.labelling_hash(),
        "problems": problems, "cost": result.cost.to_dict(), "rejected": len(rejects), **(provenance or {}),
    })


def write_version_manifest(cfg: FactoryConfig, out_dir: str | Path, indices: Sequence[int], keys: Sequence[str], *,
                           problems: int, parents: Sequence[str] = (),
                           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest over shards `indices` (keys `keys`) of `out_dir`, for a build's finalize and an active round.

    The shard hashes come from the completion records written with the shards, never from the files as they are
    now (callers check the shards first); the cost is the sum of the shards' cost records (tasks.cost).
    """
    out = Path(out_dir)
    cost = total_cost(read_provenance(shard_path(out, i)).get("cost", {}) for i in indices)
    return write_manifest(out, schema_version=SCHEMA_VERSION, config_hash=cfg.config_hash(),
                          code_version=__version__, shards=[shard_info(out, i) for i in indices],
                          parents=list(parents),
                          extra={"name": cfg.name, "policy_model": cfg.policy.model_path, "shard_keys": list(keys),
                                 "problems": problems, **(extra or {}), "cost": cost.to_dict()})


def run_shard(cfg: FactoryConfig, out_dir: str | Path, plan: ShardPlan,
              labeller: Callable[[], ShardLabeller]) -> ShardOutcome:
    """Stage 2, one shard: skip it when done (same key, intact), else label it with ``labeller()`` and write it.

    `labeller` is called only when the shard needs labelling, so a finished build starts no engine.
    """
    reason = check_shard(out_dir, plan.index, plan.key)
    if reason is None:
        return ShardOutcome(plan.index, "skipped", shard_info(out_dir, plan.index).rows, ShardCost())
    status = "built"
    if reason != NOT_WRITTEN:
        status = "rebuilt"
        log.warning("shard %d: the file on disk is not reused (%s); rebuilding it", plan.index, reason)
    cost = label_shard(cfg, out_dir, plan, labeller())
    return ShardOutcome(plan.index, status, shard_info(out_dir, plan.index).rows, cost,
                        reason if status == "rebuilt" else None)


def split_by_context(cfg: FactoryConfig, problems: Sequence[Problem], tokenizer: Any
                     ) -> tuple[list[Problem], list[Rejected]]:
    """The problems whose prompt leaves room for a solution in the policy's context, and the rest, rejected.

    An engine refuses a prompt that fills its context, and it refuses the whole batch: one over-long question
    would otherwise end the build. Such a problem produces no row and is recorded with its reason. The prompt
    is measured as the labeller renders and encodes it (``render_prompt``: a chat template with its system
    prompt), so what is checked here is what the engine is sent.
    """
    pol = cfg.policy
    limit = pol.max_model_len
    fits: list[Problem] = []
    too_long: list[Rejected] = []
    for p in problems:
        prompt = render_prompt(pol.prompt_template, p.question, tokenizer, pol.system_prompt)
        n = len(tokenizer.encode(prompt, add_special_tokens=False))
        if n >= limit:
            too_long.append(Rejected(p.problem_id, p.source, f"prompt_too_long: the prompt is {n} tokens, the "
                                     f"policy's context (policy.max_model_len) is {limit}"))
        else:
            fits.append(p)
    return fits, too_long


def finalize(cfg: FactoryConfig, out_dir: str | Path, parents: Sequence[str] = (),
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 3: the manifest over every shard planned from `out_dir`'s problems (all must be done).

    `parents` names the versions this one derives from; `extra` adds keys (e.g. a refresh's lineage).
    """
    out = Path(out_dir)
    plans = read_plans(cfg, out)
    not_done = {p.index: reason for p in plans if (reason := check_shard(out, p.index, p.key)) is not None}
    if not_done:
        raise BuildError(f"cannot write the manifest: shards not done: {not_done}")
    counts = read_ingest_report(out)
    return write_version_manifest(cfg, out, [p.index for p in plans], [p.key for p in plans],
                                  problems=int(counts["problems"]), parents=parents,
                                  extra={"quarantined": int(counts["quarantined"]), **(extra or {})})


def build(cfg: FactoryConfig, out_dir: str | Path, engine_factory: Callable[[], Engine],
          *, progress: Callable[[str, int], None] | None = None,
          on_plan: Callable[[Sequence[ShardPlan]], None] | None = None,
          on_shard: Callable[[ShardPlan, str], None] | None = None, wait: bool = False,
          on_wait: Callable[[str], None] | None = None) -> BuildReport:
    """The local executor: build (or resume) the dataset for `cfg` in `out_dir`, one shard after the other.

    `engine_factory` is called at most once, when the first shard needs labelling. `on_plan` gets the shard
    plans once prepared, `on_shard` each shard and its status as it finishes. One writer per `out_dir`
    (``tasks.io.writer_lock``): another live build there is named in an ``OutputLockedError``, or with `wait`
    waited for (`on_wait` gets the line saying so).
    """
    with writer_lock(out_dir, wait=wait, on_wait=on_wait):
        return _build(cfg, Path(out_dir), engine_factory, progress, on_plan, on_shard)


def _build(cfg: FactoryConfig, out: Path, engine_factory: Callable[[], Engine],
           progress: Callable[[str, int], None] | None, on_plan: Callable[[Sequence[ShardPlan]], None] | None,
           on_shard: Callable[[ShardPlan, str], None] | None) -> BuildReport:
    prepared = prepare(cfg, out)
    if on_plan:
        on_plan(prepared.plans)
    labeller: ShardLabeller | None = None

    def get_labeller() -> ShardLabeller:
        nonlocal labeller
        if labeller is None:
            labeller = make_labeller(cfg, engine_factory(), load_tokenizer(cfg), progress)
        return labeller

    rebuilt: dict[int, str] = {}
    by_status: Counter[str] = Counter()
    outcomes = []
    for plan in prepared.plans:
        outcome = run_shard(cfg, out, plan, get_labeller)
        outcomes.append(outcome)
        by_status[outcome.status] += 1
        if outcome.reason is not None:
            rebuilt[plan.index] = outcome.reason
        if on_shard:
            on_shard(plan, outcome.status)
    manifest = finalize(cfg, out)
    rejected = sum(len(path.read_text().splitlines()) for p in prepared.plans
                   if (path := reject_path(out, p.index)).exists())
    return BuildReport(out, len(prepared.plans), by_status["built"] + by_status["rebuilt"], by_status["skipped"],
                       manifest["num_rows"], total_cost(o.cost for o in outcomes), prepared.quarantined, rejected,
                       manifest, rebuilt)
