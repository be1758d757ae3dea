"""Flow: ActPRM active labelling, one task run per round (the `active-learning` deployment).

validate config -> prepare (budget guard, pool generated once) -> round 0, 1, ...: select (random seed set,
then the uncertain trajectories under the last PRM) -> label (EDU tree + ER-PRM rollouts, a new dataset version)
-> train on Ray Train (warm start) -> held-out AUROC -> table artifact; after the last round: report with the
label-efficiency curve.

Resumable after a crash at any round: the loop's own records (OUT/rounds.jsonl, tasks/active/run_dir.py) say which
rounds are finished, so a new flow run on the same OUT returns them at once and starts at the first unfinished round,
buying no label twice. Prefect's result cache is not needed for that.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prefect import flow, get_run_logger, task

from cluster.engines import ray_dashboard_url
from configs.schema import load_config, resolve_path
from flows.steps import artifact_key, validate_config

_lock = threading.Lock()
_loops: dict[tuple[str, str], Any] = {}  # (flow run, out dir) -> ActiveLoop: engines start once per flow run


def _loop(config_path: str, out_dir: str, local: bool):
    """The flow run's ActiveLoop (engines attached lazily, when the pool or a label needs them)."""
    from prefect.runtime import flow_run

    from cluster.active_run import default_eval_fn, pool_scorer, ray_train_fn
    from cluster.engines import engine_factory
    from tasks.active.loop import ActiveLoop

    key = (str(flow_run.id), out_dir)
    with _lock:
        if key not in _loops:
            cfg = load_config(config_path)
            log = get_run_logger()
            train = ray_train_fn(cfg, on_epoch=lambda r: log.info("  epoch %d: train loss %.4f", r["epoch"],
                                                                  r["train_loss"]))
            _loops[key] = ActiveLoop(cfg, out_dir, engine_factory(cfg, local=local), train, default_eval_fn(cfg),
                                     scorer_factory=pool_scorer(cfg))
        return _loops[key]


@task(name="active-prepare")
def prepare_active(config_path: str, out_dir: str, local: bool) -> dict[str, Any]:
    """Consumes the config; produces the pool (OUT/pool, generated once) and how many rounds are finished.

    Fails before any engine starts on an empty pool, a budget below one problem's cost, or another config's OUT.
    """
    state = _loop(config_path, out_dir, local).prepare()
    get_run_logger().info("pool: %d trajectories (%s tokens); %d rounds already finished in %s",
                          state["pool"]["trajectories"], f"{state['pool'].get('pool_tokens', 0):,}",
                          state["rounds_done"], out_dir)
    return {"rounds_done": state["rounds_done"], "trajectories": state["pool"]["trajectories"],
            "pool_tokens": state["pool"].get("pool_tokens")}


@task(name="active-round", task_run_name="round-{r:03d}")
def active_round(config_path: str, out_dir: str, r: int, local: bool) -> dict[str, Any]:
    """Consumes round r-1's PRM and the pool; produces round r's dataset version, PRM run and record.

    A round finished before (this or an earlier flow run) returns its record without any work.
    """
    from tasks.active.loop import format_round_line

    record = _loop(config_path, out_dir, local).run_round(r)
    log = get_run_logger()
    if "stop" in record:
        log.info("stop before round %d: %s", r, record["message"])
    else:
        log.info("%s (Ray dashboard: %s)", format_round_line(record), ray_dashboard_url() or "n/a")
    return record


@task(name="publish-active-report")
def publish_active_report(config_path: str, out_dir: str, stop: str, message: str, key: str) -> dict[str, Any]:
    """Consumes the finished rounds; produces OUT/report.md, OUT/label_efficiency.png and the Prefect artifacts."""
    from pathlib import Path

    from prefect.artifacts import create_markdown_artifact

    from tasks.active.report import curve_png, data_uri, report_markdown

    loop = _loop(config_path, out_dir, False)
    result = loop.finish(stop, message)
    title = f"Active labelling: {loop.cfg.name} ({loop.cfg.active.selector})"
    png = curve_png(result.rounds, title)
    out = Path(out_dir)
    (out / "label_efficiency.png").write_bytes(png)
    (out / "report.md").write_text(report_markdown(title, result.rounds, stop, message, "label_efficiency.png"))
    create_markdown_artifact(report_markdown(title, result.rounds, stop, message, data_uri(png)), key=key,
                             description=f"active run {out_dir}: rounds and the label-efficiency curve")
    return result.to_dict()


def _round_table(name: str, records: list[dict[str, Any]], key: str) -> None:
    from prefect.artifacts import create_table_artifact

    from tasks.active.report import round_rows

    create_table_artifact(round_rows(records), key=key,
                          description=f"{name}: the active loop's rounds so far (one new version per round)")


@flow(name="active-learning", log_prints=True)
def active_learning(config_path: str = "configs/toy-active.yaml", out_dir: str | None = None,
                    local: bool = False) -> dict[str, Any]:
    """Run (or resume) the config's active loop in ``out_dir`` (default runs/<name>/active); ``local``: the engine
    in the flow-run process instead of Ray actors."""
    started = time.perf_counter()
    validate_config(config_path)
    cfg = load_config(config_path)
    out = str(resolve_path(out_dir or f"runs/{cfg.name}/active"))
    _loop(config_path, out, local)  # made here, so its epoch lines go to the flow run's log
    state = prepare_active(config_path, out, local)
    records: list[dict[str, Any]] = []
    r = 0
    while True:
        outcome = active_round(config_path, out, r, local)
        if "stop" in outcome:
            break
        records.append(outcome)
        if r >= state["rounds_done"]:  # a new version of the table after every round this flow run did
            _round_table(cfg.name, records, artifact_key(cfg.name, "active-rounds"))
        r += 1
    summary = publish_active_report(config_path, out, outcome["stop"], outcome["message"],
                                    artifact_key(cfg.name, "active"))
    with _lock:
        from prefect.runtime import flow_run

        _loops.pop((str(flow_run.id), out), None)
    return {**summary, "rounds_resumed": state["rounds_done"], "seconds": round(time.perf_counter() - started, 2)}


if __name__ == "__main__":
    import sys

    active_learning(*sys.argv[1:])
