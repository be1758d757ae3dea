"""Flow: incremental refresh of a versioned dataset root (scheduled by the `refresh` deployment).

validate config -> plan (the current sources, ingested once into a staging dir, vs the LATEST version) -> if
nothing changed: record "up to date" and stop (no engine, no new version) -> else prepare a new version (the
staged ingest moves in) -> reuse unchanged shards from the parent (hard links, sha256-checked) -> label only new
or changed shards (the shard stage of tasks/build.py, as in build_dataset) -> manifest with parents and
lineage -> move LATEST -> report artifacts -> (train_after) start the train-prm deployment on it.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from configs.schema import load_config, resolve_path
from flows.steps import (
    artifact_key,
    default_root,
    finalize_task,
    label_shards,
    plan_refresh,
    point_latest,
    prepare_task,
    publish_report,
    reuse_shards,
    run_summary,
    start_engines_task,
    validate_config,
)
from flows.train_prm import trigger_training
from tasks.io import writer_lock
from tasks.store.versions import version_dir


@flow(name="refresh-dataset", log_prints=True)
def refresh(config_path: str = "configs/toy.yaml", root: str | None = None, train_after: bool = False,
            wait: bool = False) -> dict:
    """Bring the dataset root up to date with the config's sources, labelling only what changed.

    ``train_after``: when a new version was written, start the ``train-prm`` deployment on it (not awaited).
    ``wait``: when another refresh or build is writing `root`, wait for it instead of failing, naming it.
    """
    started = time.perf_counter()
    log = get_run_logger()
    validate_config(config_path)
    cfg = load_config(config_path)
    root = str(resolve_path(root or default_root(config_path)))
    key = artifact_key(cfg.name, "refresh")

    with writer_lock(root, wait=wait, on_wait=log.warning):  # one writer per dataset root
        plan = plan_refresh(config_path, root, staging_dir=str(Path(root) / f".ingest-{flow_run.id}"))
        if plan["up_to_date"]:
            summary = run_summary([], started, status="up_to_date", version=plan["parent"],
                                  dataset_dir=str(version_dir(root, plan["parent"])), engine_started=False)
            point_latest(root, "", {"status": "up_to_date", "version": plan["parent"], "shards": plan["shards"]})
            publish_report(summary["dataset_dir"], summary, artifact_key=key, write_files=False)
            log.info("up to date: version %s has every shard of the current sources", plan["parent"])
            return summary

        out = str(version_dir(root, plan["version"]))
        shards = prepare_task(config_path, out, staged=str(Path(root) / f".ingest-{flow_run.id}"))
        reused = reuse_shards(out, plan["reuse"])
        reused_at = {r["index"] for r in reused}
        to_label = [s for s in shards if s.index not in reused_at]
        start_engines_task(config_path, to_label)
        results = label_shards(to_label, max_in_flight=cfg.cluster.num_engines,
                               progress_key=artifact_key(cfg.name, "refresh-progress"))
        lineage = {"version": plan["version"], "parent": plan["parent"],
                   "reused_shards": [{k: r[k] for k in ("index", "parent_index", "key", "how")} for r in reused],
                   "labelled_shards": [r["index"] for r in results]}
        parents = [plan["parent"]] if plan["parent"] else []
        manifest = finalize_task(config_path, out, parents=parents, extra={"lineage": lineage})
        point_latest(root, plan["version"], {"status": "new_version", "version": plan["version"],
                                             "parents": parents, "reused": len(reused), "labelled": len(results)})

    summary = run_summary(results, started, status="new_version", version=plan["version"], dataset_dir=out,
                          dataset_version=manifest["dataset_version"], parents=parents, reused_shards=len(reused),
                          engine_started=any(r["status"] == "built" for r in results))
    publish_report(out, summary, artifact_key=key)
    log.info("version %s: %d shards reused from %s, %d labelled; LATEST -> %s", plan["version"], len(reused),
             plan["parent"], len(results), plan["version"])
    if train_after:
        summary["train_flow_run"] = trigger_training(config_path, out)
    return summary


if __name__ == "__main__":
    import sys

    refresh(*sys.argv[1:])
