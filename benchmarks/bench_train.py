"""Ray Train PRM trainer: samples/s in one process vs Ray Train with 1 and 2 workers, scoring throughput,
checkpoint and resume cost, held-out step AUROC vs toy truth.

    python benchmarks/bench_train.py --dataset DIR --json-out benchmarks/results/train.json

DIR is a finished toy dataset version (e.g. `prm-factory build --config configs/toy.yaml --local --out DIR`).
All runs share one local Ray (2 CPUs, workers at 0.5 CPU each so Ray Data keeps a core). Per run: the config's
`train:` section with the overrides below. The in-process run is the same loop (tasks/prm/fit.py's epoch loop
over the same training rows, one torch thread like a worker) without Ray, side by side in this run;
scoring throughput is the 2-worker model scoring the toy ruler's first 64 problems (1,024 trajectories).
samples/s is the median over epochs after the first (epoch 0 pays
for the data pipeline start and first-touch costs); the held-out AUROC is the 2-worker run's final model
scored on the held-out problems against the exact toy truth (`tasks.sources.toy_world.prefix_is_correct`) and
against the dataset's own hard labels.

Strategies (``--strategies``): DDP, FSDP and FSDP with activation checkpointing side by side in one run, each a
2-worker Ray Train run (gloo) of the same config, seed and rows: per-worker state (bytes of parameters, gradients
and AdamW states each worker holds, from its local shards), peak resident memory per worker, samples/s (epoch 1,
after the first epoch's start-up) and the loss after every epoch. Backbone: SmolLM2-135M-Instruct when prepared
(scripts/prepare_smollm2.py), else the shipped toy policy (the JSON says which); without --dataset a 12-problem
toy dataset is built first (transformers engine, ~30 s).

    python benchmarks/bench_train.py --strategies --json-out benchmarks/results/train_strategies.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from prm_factory import set_offline_env

set_offline_env()


def _cfg(base: str, **train):
    from configs.schema import load_config, parse_config

    data = load_config(base).model_dump(mode="json")
    data["train"].update(train)
    return parse_config(data)


def _median_rate(history: list[dict]) -> float:
    later = [h["samples_per_s"] for h in history[1:]] or [history[0]["samples_per_s"]]
    return statistics.median(later)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=None, help="a finished dataset version (required unless --strategies)")
    ap.add_argument("--strategies", action="store_true", help="DDP vs FSDP vs FSDP + activation checkpointing")
    ap.add_argument("--backbone", default=None, help="--strategies: the backbone (default: SmolLM2-135M if "
                    "prepared, else assets/toy-policy)")
    ap.add_argument("--config", default="configs/toy.yaml")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--skip-resume", action="store_true", help="leave out the checkpoint/resume measurement")
    args = ap.parse_args()
    if args.strategies:
        _strategies(args)
        return
    if args.dataset is None:
        ap.error("--dataset is required (or give --strategies)")

    import ray

    from cluster.connect import start_own
    from cluster.train import train_on_ray
    from tasks.prm.training import TrainError, dataset_shards

    start_own(namespace="prm-factory", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    shards, version = dataset_shards(args.dataset)
    out: dict = {"dataset": str(args.dataset), "dataset_version": version, "epochs": args.epochs,
                 "batch_size_per_worker": args.batch_size, "runs": {}}

    out["runs"]["in_process"] = _in_process(_cfg(args.config, epochs=args.epochs, batch_size=args.batch_size),
                                            shards)
    print(f"in process: {out['runs']['in_process']['samples_per_s_median']} samples/s", flush=True)
    for workers in (1, 2):
        cfg = _cfg(args.config, num_workers=workers, cpus_per_worker=0.5, epochs=args.epochs,
                   batch_size=args.batch_size)
        t0 = time.perf_counter()
        res = train_on_ray(cfg, args.dataset, tmp / f"run-{workers}w")
        wall = time.perf_counter() - t0
        out["runs"][f"{workers}_workers"] = {
            "wall_s": round(wall, 1), "global_step": res.global_step,
            "samples_per_s_median": round(_median_rate(res.history), 2),
            "samples_per_s_by_epoch": [round(h["samples_per_s"], 2) for h in res.history],
            "train_loss_by_epoch": [round(h["train_loss"], 4) for h in res.history],
            "eval_auroc_vs_labels_by_epoch": [round(h.get("eval_auroc", float("nan")), 4) for h in res.history],
            "checkpoint_write_s": [h.get("checkpoint_seconds") for h in res.history]}
        print(f"{workers} worker(s): {out['runs'][f'{workers}_workers']['samples_per_s_median']} samples/s, "
              f"{wall:.0f}s wall", flush=True)
        if workers == 2:
            cfg2, model_run = cfg, tmp / "run-2w"
    one, two = out["runs"]["1_workers"], out["runs"]["2_workers"]
    out["speedup_2_vs_1"] = round(two["samples_per_s_median"] / one["samples_per_s_median"], 3)
    out["ray_1_worker_vs_in_process"] = round(one["samples_per_s_median"]
                                              / out["runs"]["in_process"]["samples_per_s_median"], 3)
    out["scoring"] = _scoring_rate(model_run)
    if args.skip_resume:
        _finish(out, shards, cfg2, model_run, args)
        return

    # Checkpoint + resume: fail early in epoch 1 (after the epoch 0 checkpoint), start again with the same run dir.
    run = tmp / "run-resume"
    t0 = time.perf_counter()
    try:
        train_on_ray(cfg2, args.dataset, run, fault_after_epoch=0)
    except TrainError as err:
        assert "injected fault" in str(err), err
    to_fault = time.perf_counter() - t0
    t0 = time.perf_counter()
    resumed = train_on_ray(cfg2, args.dataset, run)
    resume_wall = time.perf_counter() - t0
    trained = sum(h["train_seconds"] for h in resumed.history[1:])
    out["resume"] = {"wall_to_fault_s": round(to_fault, 1), "resumed_run_wall_s": round(resume_wall, 1),
                     "resumed_epochs": [h["epoch"] for h in resumed.history[1:]],
                     "resumed_from_epoch": resumed.resumed_from_epoch,
                     "restore_s": resumed.history[1].get("restore_seconds"),
                     "resumed_run_overhead_s": round(resume_wall - trained, 1),
                     "global_step": resumed.global_step, "uninterrupted_global_step": two["global_step"]}

    _finish(out, shards, cfg2, model_run, args)


def _finish(out: dict, shards: list, cfg2, model_run: Path, args) -> None:
    """Held-out quality of the 2-worker model, against the exact toy truth and the hard labels; write out."""
    import ray

    from tasks.prm.model import load_prm
    from tasks.prm.report import held_out_metrics
    from tasks.prm.training import held_out_rows

    prm = load_prm(model_run)
    rows = held_out_rows([str(p) for p in shards], cfg2.train.target, cfg2.train.eval_fraction, cfg2.train.seed)
    metrics = held_out_metrics(rows, prm.score([r["prompt"] for r in rows], [r["completions"] for r in rows]),
                               cfg2.train.target, cfg2.policy.prompt_template)
    out["held_out"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
                       if k != "calibration"}
    out["held_out"]["calibration"] = metrics["calibration"]
    ray.shutdown()
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")



def _in_process(cfg, shards: list) -> dict:
    """The trainer in this process, no Ray (`tasks.prm.fit`): the rows the workers train on, in shard order, the same
    epochs."""
    import pyarrow.parquet as pq
    import torch

    from tasks.prm.fit import fit
    from tasks.prm.training import READ_COLUMNS, batch_rows, is_held_out

    train = cfg.train
    torch.set_num_threads(1)
    rows = [r for path in shards
            for r in batch_rows(pq.read_table(path, columns=sorted({*READ_COLUMNS, train.target})), train.target)
            if not is_held_out(r["problem_id"], train.eval_fraction, train.seed)]
    fitted = fit(train.model_copy(update={"shuffle": False}), rows, train.seed, dataset_version="bench")
    rates = [h["samples_per_s"] for h in fitted.history]
    return {"samples_per_s_median": round(_median_rate([{"samples_per_s": r} for r in rates]), 2),
            "samples_per_s_by_epoch": [round(r, 2) for r in rates], "rows": len(rows)}


def _scoring_rate(model_run: Path) -> dict:
    """Trajectories/s of a trained PRM scoring the ruler's first 64 problems (batch 16, this process)."""
    from tasks.evaluation.ruler import load_ruler
    from tasks.prm.model import load_prm

    ruler = load_ruler().limited(64)
    prm = load_prm(model_run)
    prompts = [r["prompt"] for r in ruler.rows]
    steps = [r["completions"] for r in ruler.rows]
    prm.score(prompts[:16], steps[:16])  # warm-up
    t0 = time.perf_counter()
    prm.score(prompts, steps, batch_size=16)
    seconds = time.perf_counter() - t0
    return {"trajectories": len(prompts), "seconds": round(seconds, 2),
            "trajectories_per_s": round(len(prompts) / seconds, 1)}


# -- DDP vs FSDP vs FSDP + activation checkpointing ----------------------------------------------------------

STRATEGY_RUNS = {"ddp": {"strategy": "ddp"}, "fsdp": {"strategy": "fsdp"},
                 "fsdp_ac": {"strategy": "fsdp", "activation_checkpointing": True}}
# 12 toy problems, newline steps, N=4 rollouts: the trainer tests' dataset (tests/conftest.py TOY_PRM_DATASET)
BENCH_DATASET = {
    "name": "bench-train-strategies", "seed": 0,
    "sources": [{"kind": "toy", "num_problems": 12, "seed": 2024, "min_steps": 2, "max_steps": 4}],
    "policy": {"model_path": "assets/toy-policy", "backend": "transformers", "max_model_len": 256},
    "partition": {"method": "newline", "entropy_source": "exact"}, "tree": {"enabled": False},
    "rollouts": {"n": 4, "max_new_tokens": 64}, "dataset": {"problems_per_shard": 4},
}


def _strategies(args) -> None:
    import platform

    import ray

    from cluster.connect import start_own
    from cluster.hf_engine import HFEngine
    from cluster.train import train_on_ray
    from configs.schema import REPO_ROOT, parse_config
    from tasks.build import build
    from tasks.smollm2 import default_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-strategies-"))
    dataset = Path(args.dataset) if args.dataset else tmp / "dataset"
    if args.dataset is None:
        t0 = time.perf_counter()
        build(parse_config(BENCH_DATASET), dataset, lambda: HFEngine(str(REPO_ROOT / "assets" / "toy-policy")))
        print(f"dataset: {time.perf_counter() - t0:.0f} s", flush=True)
    smollm2 = default_model_dir()
    backbone = args.backbone or (str(smollm2) if (smollm2 / "config.json").is_file() else "assets/toy-policy")
    train = {"model_path": backbone, "num_workers": 2, "cpus_per_worker": 0.5, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": 1e-5, "eval_fraction": 0.25}
    start_own(namespace="prm-factory", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out: dict = {"backbone": backbone, "dataset": str(dataset), "workers": 2, "epochs": args.epochs,
                 "batch_size_per_worker": args.batch_size, "device": "cpu (gloo)", "cpus": os.cpu_count(),
                 "machine": platform.machine(), "runs": {}}
    for name, overrides in STRATEGY_RUNS.items():
        cfg = parse_config({**BENCH_DATASET, "train": {**train, **overrides}})
        t0 = time.perf_counter()
        res = train_on_ray(cfg, dataset, tmp / f"run-{name}")
        wall = time.perf_counter() - t0
        last = res.history[-1]
        out["runs"][name] = {
            **overrides, "wall_s": round(wall, 1), "global_step": res.global_step,
            "state_bytes_per_worker": last["state_bytes_per_worker"],
            "state_gib_per_worker": round(last["state_bytes_per_worker"] / 2**30, 3),
            "peak_rss_mb_per_worker": max(h["peak_rss_mb"] for h in res.history),
            "samples_per_s": round(last["samples_per_s"], 3),
            "samples_per_s_by_epoch": [round(h["samples_per_s"], 3) for h in res.history],
            "train_loss_by_epoch": [round(h["train_loss"], 5) for h in res.history],
            "checkpoint_write_s": [h.get("checkpoint_seconds") for h in res.history],
            "consolidate_s": res.consolidate_seconds}
        print(f"{name}: {json.dumps(out['runs'][name])}", flush=True)
    ddp, fsdp = out["runs"]["ddp"], out["runs"]["fsdp"]
    out["fsdp_state_vs_ddp"] = round(fsdp["state_bytes_per_worker"] / ddp["state_bytes_per_worker"], 4)
    out["fsdp_samples_per_s_vs_ddp"] = round(fsdp["samples_per_s"] / ddp["samples_per_s"], 3)
    out["fsdp_ac_samples_per_s_vs_ddp"] = round(out["runs"]["fsdp_ac"]["samples_per_s"] / ddp["samples_per_s"], 3)
    out["targets"] = {"fsdp_state_le_0.55_ddp": out["fsdp_state_vs_ddp"] <= 0.55,
                      "fsdp_samples_per_s_ge_0.8_ddp": out["fsdp_samples_per_s_vs_ddp"] >= 0.8}
    ray.shutdown()
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
