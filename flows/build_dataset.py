"""Flow: build (or resume) one dataset directory from a config.

validate config -> prepare (ingest + plan shards) -> start the engine pool (when a shard needs it) -> label
each shard (one task per shard, on the Ray engine pool; a progress artifact follows) -> manifest -> report
artifacts. A re-run after a crash skips the shards already written. The stages are those of tasks/build.py
(the CLI's `build` runs the same ones in one process); flows/steps.py wraps each in a Prefect task.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger

from configs.schema import load_config, resolve_path
from flows.steps import (
    artifact_key,
    finalize_task,
    label_shards,
    prepare_task,
    publish_report,
    run_summary,
    start_engines_task,
    validate_config,
)
from tasks.io import writer_lock


@flow(name="build-dataset", log_prints=True)
def build_dataset(config_path: str = "configs/toy.yaml", out_dir: str | None = None, wait: bool = False) -> dict:
    """Build the Parquet dataset of `config_path` in `out_dir` (default: the config's dataset.out_dir).

    ``wait``: when another build or refresh is writing `out_dir`, wait for it instead of failing, naming it.
    """
    started = time.perf_counter()
    validate_config(config_path)
    cfg = load_config(config_path)
    out = str(resolve_path(out_dir or cfg.dataset.out_dir))

    with writer_lock(out, wait=wait, on_wait=get_run_logger().warning):  # one writer per dataset directory
        shards = prepare_task(config_path, out)
        start_engines_task(config_path, shards)
        results = label_shards(shards, max_in_flight=cfg.cluster.num_engines,
                               progress_key=artifact_key(cfg.name, "dataset-progress"))
        manifest = finalize_task(config_path, out, parents=[], extra={})

    summary = run_summary(results, started, dataset_dir=out, version=manifest["dataset_version"])
    publish_report(out, summary, artifact_key=artifact_key(cfg.name, "dataset"))
    get_run_logger().info("dataset %s: %d rows in %d shards (%s)", out, manifest["num_rows"],
                          manifest["num_shards"], summary["shards_by_status"])
    return summary


if __name__ == "__main__":
    import sys

    build_dataset(*sys.argv[1:])
