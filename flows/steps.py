"""The Prefect tasks the flows are made of: the Prefect executor of the build pipeline of tasks/build.py.

``prepare_task`` -> ``label_shard_task`` (one per shard) -> ``finalize_task`` run the stages ``prepare`` ->
``run_shard`` -> ``finalize`` of tasks/build.py, the same functions the CLI's local loop (``tasks.build.build``)
runs; the refresh tasks wrap tasks/store/versions.py, the report task tasks/store/report.py.

Tasks receive small references (config path, output directory, shard index and key), never problems or
rows, so Prefect can hash their inputs for caching and the API never carries data: a stage reads what the
stage before it wrote (``problems.parquet``, the shards). The engines live in
named, detached Ray actors (cluster/actors.py): a shard task attaches to them by name (starting them if
they are not there), sends its shard's requests and writes its Parquet shard. The pool enforces the
per-request timeouts; Prefect's task timeouts are not used.

Why a thread pool and not ``prefect_ray.RayTaskRunner``: a shard task is a thin client that waits on
the engine actors, which are already Ray's to schedule. Running the task itself as a Ray task would take
a CPU slot from the engines (on a 2-core machine, half the cluster), ship the task's Prefect context to a
Ray worker, and with an ephemeral API start one Prefect server per Ray worker. Threads in the flow-run
process cost nothing and the engine pool already provides backpressure; the flow keeps at most
``cluster.num_engines`` shards in flight.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.futures import PrefectFuture, as_completed

from cluster.engines import ray_dashboard_url, start_policy_engines
from configs.schema import FactoryConfig, load_config, resolve_path
from tasks.cost import ShardCost, total_cost

SHARD_CACHE = INPUTS + TASK_SOURCE


@dataclass(frozen=True)
class ShardRef:
    """What a shard task needs to find its work: small, hashable, JSON-able."""

    config_path: str
    out_dir: str
    index: int
    key: str


# -- per-process state shared by the shard tasks of one flow run (threads) ---------------------------

_lock = threading.Lock()
_engines: dict[tuple[str, str], tuple[Any, Any]] = {}  # (flow run, config) -> (pool, tokenizer)


def _labeller(cfg: FactoryConfig):
    """A new ShardLabeller for one shard, over the config's engine pool (attached or started once per flow run).

    The pool and the tokenizer are shared by the shard threads (the pool is thread-safe); the labeller is not:
    its partitioner keeps per-call state (``EntropyPartitioner.capped``), so each shard gets its own.
    """
    from prefect.runtime import flow_run

    from tasks.build import load_tokenizer
    from tasks.labelling.labellers import make_labeller

    key = (str(flow_run.id), cfg.config_hash())
    with _lock:
        if key not in _engines:
            log = get_run_logger()
            t0 = time.perf_counter()
            log.info("placing engine actors for '%s'; each loads the model%s", cfg.name,
                     " (vLLM: ~45 s on 2 CPU cores)" if cfg.policy.backend == "vllm" else "")
            pool = start_policy_engines(cfg, wait=False)
            health = pool.wait_ready()
            waited = time.perf_counter() - t0
            started = [h for h in health if h.get("started_at", 0) >= time.time() - waited - 1]
            _engines[key] = (pool, load_tokenizer(cfg))
            log.info("engine pool ready after %.1f s (%d started, %d already running): %s; Ray dashboard: %s",
                     waited, len(started), len(health) - len(started),
                     ", ".join(f"{h['engine']} ({h.get('backend', '?')})" for h in health),
                     ray_dashboard_url() or "(not available)")
        pool, tokenizer = _engines[key]
    return make_labeller(cfg, pool, tokenizer)


def default_root(config_path: str) -> str:
    """Where a config's versions live when no root is given: `datasets/` beside its dataset.out_dir."""
    return str(resolve_path(load_config(config_path).dataset.out_dir).parent / "datasets")


def artifact_key(config_name: str, kind: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]", "-", f"{config_name}-{kind}".lower())


# -- tasks ---------------------------------------------------------------------------------------------


@task(name="validate-config")
def validate_config(config_path: str) -> dict[str, str]:
    """Consumes a YAML path; produces the config's name and hashes, or fails naming each bad field."""
    cfg = load_config(config_path)
    return {"name": cfg.name, "config_hash": cfg.config_hash(), "labelling_hash": cfg.labelling_hash()}


@task(name="prepare")
def prepare_task(config_path: str, out_dir: str, staged: str | None = None) -> list[ShardRef]:
    """Consumes the config's sources (or a staged ingest); produces the output dir (problems.parquet, quarantine,
    ingest counts) and one ref per shard. The only task that reads the sources."""
    from tasks.build import prepare

    cfg = load_config(config_path)
    prepared = prepare(cfg, out_dir, staged=staged)
    get_run_logger().info("%d problems (%d quarantined) in %d shards -> %s", prepared.problems,
                          prepared.quarantined, len(prepared.plans), out_dir)
    return [ShardRef(config_path, str(out_dir), p.index, p.key) for p in prepared.plans]


@task(name="start-engines")
def start_engines_task(config_path: str, refs: Sequence[ShardRef]) -> dict[str, Any]:
    """Consumes the shard refs; starts (or attaches to) the engine pool when a shard still needs labelling.

    Its own task so that the flow's timeline shows engine start-up as such, not inside the first shard.
    """
    from tasks.store.dataset import shard_done

    todo = [r.index for r in refs if not shard_done(r.out_dir, r.index)]
    if not todo:
        return {"started": False, "shards_to_label": 0}
    t0 = time.perf_counter()
    _labeller(load_config(config_path))
    return {"started": True, "shards_to_label": len(todo), "seconds": round(time.perf_counter() - t0, 1)}


@task(name="label-shard", retries=2, retry_delay_seconds=2, cache_policy=SHARD_CACHE, persist_result=True,
      task_run_name="shard-{index:05d}")
def label_shard_task(config_path: str, out_dir: str, index: int, key: str) -> dict[str, Any]:
    """Consumes one shard reference and problems.parquet; produces `shards/part-<index>.parquet` (skipped when
    already done) via ``tasks.build.run_shard``.

    Idempotent: a done shard returns at once, and a shard is written whole or not at all, so retries and
    re-runs after a crash never duplicate rows. Returns the shard's status, rows and engine cost.
    """
    from cluster.engine_metrics import record_anchors
    from tasks.build import read_plan, run_shard

    started = time.perf_counter()
    cfg = load_config(config_path)
    outcome = run_shard(cfg, out_dir, read_plan(cfg, out_dir, index, key), lambda: _labeller(cfg))
    if outcome.reason is not None:
        get_run_logger().warning("shard %d: the file on disk was not reused (%s); rebuilt it", index, outcome.reason)
    record_anchors(outcome.cost.anchors)  # Ray metrics are emitted here, by the layer that owns Ray, not the labeller
    return {"index": index, "status": outcome.status, "rows": outcome.rows,
            "cost": outcome.cost.to_dict() if outcome.status != "skipped" else {},
            "seconds": time.perf_counter() - started}


def label_shards(refs: Sequence[ShardRef], max_in_flight: int,
                 progress_key: str | None = None) -> list[dict[str, Any]]:
    """Run `label_shard_task` for each ref, at most `max_in_flight` at once; results in ref order.

    With `progress_key`, a Prefect progress artifact under that key follows the run: percent of shards
    finished, and in its description the shard counts by status and the tokens generated so far. Each
    finished shard also gets a line in the flow-run log.

    Results persist in Prefect's local result storage (``$PREFECT_HOME/storage``; `serve` puts PREFECT_HOME
    under runs/prefect). A cache entry is only trusted while the shard it vouches for is on disk: a
    missing shard (a deleted dataset) refreshes its entry instead of returning a stale "done".
    """
    from tasks.store.dataset import shard_done

    results: dict[int, dict[str, Any]] = {}
    pending: list[PrefectFuture] = []
    progress = ShardProgress(len(refs), progress_key)

    def collect(future: PrefectFuture) -> None:
        result = future.result()
        if future.state.name == "Cached":
            result = {**result, "status": "cached", "cost": {}}
        results[result["index"]] = result
        progress.shard_done(result)

    for ref in refs:
        shard_task = label_shard_task.with_options(refresh_cache=not shard_done(ref.out_dir, ref.index, ref.key))
        if len(pending) >= max_in_flight:
            done = next(as_completed(pending))
            pending.remove(done)
            collect(done)
        pending.append(shard_task.submit(ref.config_path, ref.out_dir, ref.index, ref.key))
    for future in pending:
        collect(future)
    return [results[ref.index] for ref in refs]


class ShardProgress:
    """Shard counts and tokens so far, pushed to a Prefect progress artifact and the flow-run log."""

    def __init__(self, total: int, key: str | None):
        self.total = total
        self.by_status: dict[str, int] = {}
        self.tokens = 0
        self.started = time.perf_counter()
        self.artifact_id = None
        if key is not None:
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(0.0, key=key, description=self.describe())

    def describe(self) -> str:
        done = sum(self.by_status.values())
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(self.by_status.items())) or "none yet"
        return (f"**{done} of {self.total} shards** finished ({statuses}); **{self.tokens:,} tokens** generated "
                f"so far; {time.perf_counter() - self.started:,.0f} s since the first shard was sent.")

    def shard_done(self, result: dict[str, Any]) -> None:
        self.by_status[result["status"]] = self.by_status.get(result["status"], 0) + 1
        tokens = ShardCost.from_dict(result.get("cost", {})).generated_tokens
        self.tokens += tokens
        done = sum(self.by_status.values())
        get_run_logger().info("shard %05d %s: %s rows, %s tokens; %d/%d shards done, %s tokens so far",
                              result["index"], result["status"], result.get("rows"), f"{tokens:,}", done,
                              self.total, f"{self.tokens:,}")
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=100.0 * done / max(1, self.total),
                                     description=self.describe())


@task(name="write-manifest")
def finalize_task(config_path: str, out_dir: str, parents: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """Consumes the finished shards and problems.parquet; produces manifest.json (row counts, sha256 per shard,
    parents, lineage) via ``tasks.build.finalize``."""
    from tasks.build import finalize

    return finalize(load_config(config_path), out_dir, parents=parents, extra=extra)


@task(name="publish-report")
def publish_report(dataset_dir: str, run: dict[str, Any], artifact_key: str,
                   write_files: bool = True) -> dict[str, Any]:
    """Consumes a dataset dir and this run's figures; produces reports/*.png, reports/report.md and artifacts.

    `write_files=False` leaves the directory untouched (an "up to date" refresh never writes into a version).
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.store.report import build_report

    report = build_report(dataset_dir, run=run, embed_images=True, write_files=write_files)
    create_markdown_artifact(report.markdown, key=artifact_key, description=f"dataset report: {dataset_dir}")
    create_table_artifact(report.table_rows(), key=f"{artifact_key}-shards",
                          description="per shard: rows, labelled steps, generated tokens, cost per labelled step")
    get_run_logger().info("report: %s", report.markdown_path)
    return {"markdown": str(report.markdown_path), "images": [str(p) for p in report.images.values()],
            "stats": {k: v for k, v in report.stats.items() if k != "entropies"}}


def run_summary(results: Sequence[dict[str, Any]], started: float, **extra: Any) -> dict[str, Any]:
    """This run's figures from the shard results: shards built / skipped, tokens spent per stage."""
    cost = total_cost(r.get("cost", {}) for r in results).to_dict()
    by_status: dict[str, int] = {}
    for r in results:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return {"shards_by_status": by_status, "cost": cost, "seconds": round(time.perf_counter() - started, 2),
            "ray_dashboard": ray_dashboard_url(), **extra}


# -- refresh: versions under a dataset root --------------------------------------------------------------


@task(name="plan-refresh")
def plan_refresh(config_path: str, root: str, staging_dir: str) -> dict[str, Any]:
    """Consumes the current sources and LATEST; produces which shards to reuse and which to label.

    Writes only into `staging_dir` (the ingest, which `prepare_task(staged=...)` then moves into the new
    version, so the sources are read once per refresh).
    """
    from tasks.build import stage_ingest
    from tasks.store.versions import next_version_id, plan_reuse, read_latest, version_dir

    cfg = load_config(config_path)
    keys = [p.key for p in stage_ingest(cfg, staging_dir)]
    parent = read_latest(root)
    reuse = plan_reuse(parent, version_dir(root, parent) if parent else None, keys)
    if reuse.up_to_date:  # nothing will be prepared: the staged ingest has no use
        shutil.rmtree(staging_dir)
    plan = {
        "parent": parent,
        "up_to_date": reuse.up_to_date,
        "version": None if reuse.up_to_date else next_version_id(root, keys + [cfg.config_hash()]),
        "shards": len(keys),
        "reuse": [{"index": r.index, "parent_index": r.parent_index, "key": r.key, "parent_path": str(r.parent_path),
                   "sha256": r.sha256} for r in reuse.reuse],
        "label": reuse.label,
    }
    get_run_logger().info("refresh plan: parent %s, %d shards: %d reusable, %d to label%s", parent, len(keys),
                          len(reuse.reuse), len(reuse.label), " (up to date)" if reuse.up_to_date else "")
    return plan


@task(name="reuse-shards")
def reuse_shards(out_dir: str, reuse: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consumes the parent's shards with unchanged keys; produces them in `out_dir` (hard link, sha256-checked)."""
    from tasks.store.dataset import shard_done
    from tasks.store.versions import ReusableShard, VersionError, link_shard

    done = []
    for r in reuse:
        if shard_done(out_dir, r["index"], r["key"]):  # a resumed refresh linked it already
            done.append({**r, "how": "present"})
            continue
        shard = ReusableShard(r["index"], r["key"], r["parent_index"], Path(r["parent_path"]), r["sha256"])
        try:
            done.append({**r, "how": link_shard(shard, out_dir)})
        except VersionError as err:  # a parent file that does not match its manifest is relabelled instead
            get_run_logger().warning("%s", err)
    return done


@task(name="point-latest")
def point_latest(root: str, version: str, record: dict[str, Any]) -> dict[str, Any]:
    """Consumes a complete version; produces LATEST pointing at it and a line in refresh.jsonl."""
    from tasks.store.versions import append_refresh_log, write_latest

    if version:
        write_latest(root, version)
    return append_refresh_log(root, record)
