"""Flow: train a PRM on one dataset version, score its held-out problems, publish the report.

validate config -> find the dataset version (given, or LATEST of the config's refresh root) -> train on Ray
Train (resumes when the run dir already holds this run) -> score the held-out problems with the saved
checkpoint -> evaluate it on the toy ruler (toy datasets) -> markdown artifact (loss curve, tables, calibration plot).
A refresh that produced a new version starts this flow through its deployment (``trigger_training``).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task

from cluster.engines import ray_dashboard_url
from configs.schema import load_config, resolve_path
from flows.steps import artifact_key, default_root, validate_config
from tasks.evaluation.summary import ruler_markdown

DEPLOYMENT = "train-prm/train-prm"


@task(name="find-dataset-version")
def find_dataset(config_path: str, dataset_dir: str | None) -> str:
    """Consumes a dataset dir (or None: the LATEST version of the config's refresh root); produces its path."""
    from tasks.store.versions import read_latest, version_dir

    if dataset_dir:
        return str(resolve_path(dataset_dir))
    root = default_root(config_path)
    latest = read_latest(root)
    if latest is None:
        raise FileNotFoundError(f"no dataset version under {root} (run a refresh first, or pass dataset_dir)")
    return str(version_dir(root, latest))


@task(name="train-prm-ray")
def train(config_path: str, dataset_dir: str, run_dir: str) -> dict[str, Any]:
    """Consumes a config and a dataset version; trains on Ray Train into run_dir; produces the run summary."""
    from cluster.train import train_on_ray

    log = get_run_logger()
    cfg = load_config(config_path)
    result = train_on_ray(cfg, dataset_dir, run_dir, on_epoch=lambda r: log.info(
        "epoch %d: train loss %.4f, held-out loss %.4f, AUROC %.3f", r["epoch"], r["train_loss"],
        r.get("eval_loss", float("nan")), r.get("eval_auroc", float("nan"))))
    log.info("Ray Train run %s (dashboard: %s)", run_dir, ray_dashboard_url())
    return result.to_dict()


@task(name="score-held-out")
def score_held_out(config_path: str, dataset_dir: str, run_dir: str) -> dict[str, Any]:
    """Consumes the saved checkpoint and the dataset's held-out problems; produces loss, AUROC and calibration."""
    from tasks.prm.model import load_prm
    from tasks.prm.report import held_out_metrics
    from tasks.prm.training import dataset_shards, held_out_rows

    cfg = load_config(config_path)
    shards, _ = dataset_shards(dataset_dir)
    rows = held_out_rows([str(p) for p in shards], cfg.train.target, cfg.train.eval_fraction, cfg.train.seed)
    prm = load_prm(run_dir)
    scores = prm.score([r["prompt"] for r in rows], [r["completions"] for r in rows])
    return held_out_metrics(rows, scores, cfg.train.target, cfg.policy.prompt_template)


@task(name="evaluate-on-ruler")
def evaluate_on_ruler(dataset_dir: str, run_dir: str, ruler_problems: int | None) -> dict[str, Any]:
    """Consumes the saved checkpoint; produces step AUROC/accuracy against the exact toy truth on the held-out
    toy ruler and best-of-N accuracy per selector (refuses a dataset that shares a problem with the ruler)."""
    from tasks.evaluation.ruler import check_disjoint, dataset_problem_ids, evaluate_ruler, load_ruler
    from tasks.prm.model import load_prm

    ruler = load_ruler().limited(ruler_problems)
    check_disjoint(ruler, dataset_problem_ids(dataset_dir), f"dataset {dataset_dir}")
    return evaluate_ruler(load_prm(run_dir), ruler)


@task(name="publish-training-report")
def publish_training_report(title: str, summary: dict[str, Any], metrics: dict[str, Any], key: str,
                            extra_markdown: str = "") -> str:
    """Consumes the run summary and held-out metrics; produces RUN/report.md and a markdown artifact."""
    from pathlib import Path

    from prefect.artifacts import create_markdown_artifact

    from tasks.prm.report import render_training_report

    markdown, pngs = render_training_report(title, summary, metrics)
    markdown += ("\n" + extra_markdown) if extra_markdown else ""
    run = Path(summary["run_dir"])
    for name, data in pngs.items():
        (run / f"{name}.png").write_bytes(data)
    (run / "report.md").write_text(markdown)
    create_markdown_artifact(markdown, key=key, description=f"PRM training report: {run}")
    return str(run / "report.md")


@task(name="trigger-training")
def trigger_training(config_path: str, dataset_dir: str) -> str:
    """Consumes a new dataset version; starts the train-prm deployment on it (does not wait); produces its run id."""
    from prefect.deployments import run_deployment

    run = run_deployment(DEPLOYMENT, parameters={"config_path": config_path, "dataset_dir": dataset_dir},
                         timeout=0, as_subflow=False)
    return str(run.id)


@flow(name="train-prm", log_prints=True)
def train_prm(config_path: str = "configs/toy.yaml", dataset_dir: str | None = None,
              run_dir: str | None = None, ruler_problems: int | None = None) -> dict[str, Any]:
    """Train the config's PRM on a dataset version (default: the latest), score its held-out set, evaluate it on
    the toy ruler (toy datasets; ``ruler_problems`` limits it to the first K problems), report."""
    started = time.perf_counter()
    validate_config(config_path)
    cfg = load_config(config_path)
    dataset = find_dataset(config_path, dataset_dir)
    from tasks.store.dataset import read_manifest

    version = read_manifest(dataset).get("dataset_version", "unversioned")
    run = str(resolve_path(run_dir or f"runs/{cfg.name}/prm/{version}"))

    summary = train(config_path, dataset, run)
    held_out = score_held_out(config_path, dataset, run)
    ruler = None
    if all(src.kind == "toy" for src in cfg.sources):  # the ruler's truth is the toy world's
        ruler = evaluate_on_ruler(dataset, run, ruler_problems)
    report = publish_training_report(f"PRM training: {cfg.name} on {version}", summary, held_out,
                                     key=artifact_key(cfg.name, "prm"),
                                     extra_markdown=ruler_markdown(ruler) if ruler else "")
    get_run_logger().info("PRM %s: held-out AUROC vs labels %.3f (truth %s), report %s", run,
                          held_out["auroc_vs_labels"], held_out.get("auroc_vs_truth"), report)
    return {"run_dir": run, "dataset_dir": dataset, "dataset_version": version, "train": summary,
            "held_out": {k: v for k, v in held_out.items() if k != "calibration"}, "ruler": ruler, "report": report,
            "seconds": round(time.perf_counter() - started, 2)}


if __name__ == "__main__":
    import sys

    train_prm(*sys.argv[1:])
