"""Trained-PRM figures of issue 13: toy-ruler step AUROC and best-of-N per selector, SmolLM2 ProcessBench F1.

Each ``--run NAME=RUN:DATASET`` is a finished ``prm-factory train`` run and the dataset it was trained on
(checked to share no problem with the ruler); it is evaluated on the full toy ruler (step AUROC/accuracy
against the exact truth, best-of-N accuracy for min-step, last-step, majority vote and random). The oracle
and constant reference scorers are evaluated beside them. ``--smollm2-run RUN`` evaluates a SmolLM2-backbone
PRM on ProcessBench at ``--limit`` per subset; with ``--smollm2-train DATASET`` the script first trains it
(configs/toy.yaml with the ``train:`` overrides in SMOLLM2_TRAIN, recorded in the JSON) if RUN has no model.

    python benchmarks/bench_prm.py --run toy=/tmp/h13c/prm-toy:/tmp/h13c/toy \\
        --run toy-512=/tmp/h13c/prm-toy512:/tmp/h13c/toy512 \\
        --smollm2-run /tmp/h13c/prm-smollm2 --smollm2-train /tmp/h13c/toy \\
        --processbench ../shared/data/processbench --limit 20 --json-out benchmarks/results/prm_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from prm_factory import set_offline_env  # noqa: E402 - before anything reads the environment

set_offline_env()

# The SmolLM2 PRM: one worker (two 135M replicas on 2 cores only add a gloo all-reduce of 0.5 GB per step),
# backbone fine-tuned at a small-model lr, one epoch; 1024 tokens keep most ProcessBench samples whole.
SMOLLM2_TRAIN = {"epochs": 1, "num_workers": 1, "cpus_per_worker": 2.0, "batch_size": 4, "lr": 1e-4,
                 "max_length": 1024, "num_heads": 8, "head_hidden": [128, 128]}


def _train_summary(run: Path) -> dict:
    path = run / "train_summary.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no train_summary.json (not a finished `prm-factory train` run)")
    s = json.loads(path.read_text())
    return {"run_dir": str(run), "dataset_version": s["dataset_version"], "global_step": s["global_step"],
            "epochs": s["epochs"], "train_seconds": s["seconds"],
            "last_epoch": {k: v for k, v in s["last_eval"].items() if not isinstance(v, list | dict)}}


def _dataset_info(dataset: Path) -> dict:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return {"dir": str(dataset), "version": manifest.get("dataset_version"), "rows": manifest.get("num_rows"),
            "config_hash": manifest.get("config_hash"), "name": manifest.get("extra", {}).get("name"),
            "problems": manifest.get("extra", {}).get("problems")}


def ruler_row(scorer, name: str, ruler, ns: list[int]) -> dict:
    from tasks.evaluation.ruler import evaluate_ruler

    t0 = time.time()
    report = evaluate_ruler(scorer, ruler, ns)
    return {"scorer": name, **report, "eval_seconds": round(time.time() - t0, 1)}


def train_smollm2(run: Path, dataset: Path) -> dict:
    """Train the SmolLM2-backbone PRM on ``dataset`` unless RUN already holds a finished model."""
    from cluster.train import train_on_ray
    from configs.schema import load_config, parse_config, resolve_path
    from tasks.smollm2 import prepare_smollm2

    smoke = load_config(REPO / "configs" / "gsm8k-smollm2-smoke.yaml", check_paths=False)
    backbone = prepare_smollm2(resolve_path(smoke.policy.model_path))
    raw = json.loads(load_config(REPO / "configs" / "toy.yaml").model_dump_json())
    raw["name"] = "prm-smollm2-toy"
    raw["train"] = {**raw["train"], **SMOLLM2_TRAIN, "model_path": str(backbone)}
    cfg = parse_config(raw)
    if not (run / "train_summary.json").is_file():
        train_on_ray(cfg, dataset, run)
    return {"config": "configs/toy.yaml with train: " + json.dumps(SMOLLM2_TRAIN), "backbone": str(backbone)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN:DATASET (repeatable)")
    ap.add_argument("--ruler", default="assets/toy-ruler")
    ap.add_argument("--bon", default="1,2,4,8,16")
    ap.add_argument("--smollm2-run", type=Path, default=None)
    ap.add_argument("--smollm2-train", type=Path, default=None, help="dataset to train the SmolLM2 PRM on")
    ap.add_argument("--processbench", type=Path, default=REPO.parent / "shared" / "data" / "processbench")
    ap.add_argument("--limit", type=int, default=20, help="ProcessBench samples per subset")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from tasks.evaluation.processbench import evaluate_processbench
    from tasks.evaluation.reference_scorers import ConstantScorer, OracleScorer
    from tasks.evaluation.ruler import check_disjoint, dataset_problem_ids, load_ruler
    from tasks.prm.model import load_prm

    torch.set_num_threads(2)
    ns = [int(x) for x in args.bon.split(",")]
    ruler = load_ruler(REPO / args.ruler)
    load = os.getloadavg()
    results: dict = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_at_start": [round(x, 1) for x in load]},
        "ruler": {k: ruler.manifest[k] for k in ("ruler_version", "spec_hash", "content_hash", "problems",
                                                 "trajectories", "steps", "correct_steps", "final_correct")},
        "reference": [ruler_row(OracleScorer(), "oracle", ruler, ns),
                      ruler_row(ConstantScorer(), "constant", ruler, ns)],
        "prms": [],
    }
    for spec in args.run:
        name, _, paths = spec.partition("=")
        run, _, dataset = paths.partition(":")
        run_dir, data_dir = Path(run), Path(dataset)
        check_disjoint(ruler, dataset_problem_ids(data_dir), f"dataset {data_dir}")
        prm = load_prm(run_dir)
        row = ruler_row(prm, name, ruler, ns)
        row.update({"dataset": _dataset_info(data_dir), "train": _train_summary(run_dir),
                    "prm_config": {k: prm.config[k] for k in ("backbone", "num_heads", "head_hidden", "target",
                                                              "max_length")}})
        results["prms"].append(row)
        print(f"{name}: step AUROC {row['steps']['step_auroc']:.3f}", file=sys.stderr)
    if args.smollm2_run is not None:
        extra = {}
        if args.smollm2_train is not None:
            extra = train_smollm2(args.smollm2_run, args.smollm2_train)
            extra["dataset"] = _dataset_info(args.smollm2_train)
        prm = load_prm(args.smollm2_run)
        t0 = time.time()
        pb = evaluate_processbench(prm, args.processbench, limit=args.limit, format_prompt=prm.format_prompt)
        results["smollm2_processbench"] = {**extra, "train": _train_summary(args.smollm2_run), **pb,
                                           "eval_seconds": round(time.time() - t0, 1)}
        print(f"smollm2 ProcessBench mean F1 {pb['mean_f1']}", file=sys.stderr)
    results["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1) + "\n")
    else:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
