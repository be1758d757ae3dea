"""Distributed PRM training with Ray Train: ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU) over Ray Data.

The driver never loads the dataset: it checks that the dataset version exists, lists its Parquet shards from
the manifest and hands ``ray.data.read_parquet`` to the trainer; each worker reads its own streaming split
(``ray.train.get_dataset_shard("train")``). Problems are held out by a hash of ``problem_id`` (the same split
every run and every worker), so the eval rows never reach the optimizer.

The run directory RUN is Ray Train's experiment directory (``storage_path`` = RUN's parent, ``name`` = RUN's
name). Every epoch, rank 0 writes a checkpoint (model + optimizer as safetensors, ``train_state.json`` with
the epoch, global step and loss history, ``eval_scores.json`` with the held-out scores) and reports it through
``ray.train.report``. Started again with the same RUN, Ray Train V2 finds its checkpoint snapshot there and
``ray.train.get_checkpoint()`` returns the last one: the loop continues at the next epoch with the same
optimizer state and step counter. RUN/run.json pins the train config and dataset version, so a RUN is never
resumed under another config. When training ends, the last checkpoint's model is copied to RUN/model, which is
what ``prm-factory score --checkpoint RUN`` loads.

A non-finite loss stops the run at once (``NaNLossError``, naming epoch, step, rank and the batch's problem
ids). The run shows in the Ray dashboard's Train view like any Ray Train run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.connect import connect
from configs.models import ModelNotFoundError, resolve_model
from configs.schema import FactoryConfig
from tasks.prm.training import (
    READ_COLUMNS,
    TrainError,
    batch_rows,
    dataset_shards,
    evaluate_held_out,
    held_out_rows,
    is_held_out,
    optimizer_tensors,
    restore_optimizer,
    run_prm_config,
    start_model,
    train_step,
)

RUN_FILE = "run.json"
MODEL_DIR = "model"
STATE_FILE = "train_state.json"
EVAL_FILE = "eval_scores.json"
OPTIM_FILE = "optimizer.safetensors"


@dataclass
class TrainResult:
    """What a finished run produced: where, how many steps, the per-epoch history and the last eval."""

    run_dir: Path
    model_dir: Path
    global_step: int
    epochs: int
    history: list[dict[str, Any]]
    resumed_from_epoch: int | None
    seconds: float
    dataset_version: str | None
    prm_config_hash: str
    last_eval: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "model_dir": str(self.model_dir), "global_step": self.global_step,
                "epochs": self.epochs, "history": self.history, "resumed_from_epoch": self.resumed_from_epoch,
                "seconds": round(self.seconds, 2), "dataset_version": self.dataset_version,
                "prm_config_hash": self.prm_config_hash, "last_eval": self.last_eval}


def _check_run_dir(run_dir: Path, pinned: dict[str, Any]) -> bool:
    """Pin (or check) RUN/run.json; True when RUN already holds a run of this config (a resume)."""
    path = run_dir / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("train_hash", "config_hash", "dataset_version", "init_from"):
            if old.get(key) != pinned.get(key):
                raise TrainError(f"{run_dir} holds a run with another {key} ({old.get(key)} vs {pinned.get(key)}); "
                                 "give another --out or delete it")
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pinned, indent=2, sort_keys=True) + "\n")
    return False


# -- the per-worker loop ------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build or restore the PRM, train the remaining epochs, checkpoint each one."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from tasks.prm.model import load_state_into, save_checkpoint

    prm_config, train = config["prm_config"], config["train"]
    target, max_length = prm_config["target"], prm_config["max_length"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train["seed"])
    torch.set_num_threads(max(1, int(train["cpus_per_worker"])))

    model, tokenizer, optimizer = start_model(prm_config, config["backbone_path"], train)

    start_epoch, global_step, history, resumed_from = 0, 0, [], None
    checkpoint = ray.train.get_checkpoint()
    restore_seconds = None
    if checkpoint is not None:
        restore_started = time.perf_counter()
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            if state["config_hash"] != prm_config["config_hash"] or state["train_hash"] != prm_config["train_hash"]:
                raise RuntimeError(f"checkpoint {d} is from another config ({state['config_hash']})")
            load_state_into(model, load_file(str(Path(d) / "model.safetensors")), str(d))
            restore_optimizer(optimizer, load_file(str(Path(d) / OPTIM_FILE)))
        start_epoch, global_step, history = state["epoch"] + 1, state["global_step"], state["history"]
        resumed_from = state["epoch"]
        restore_seconds = round(time.perf_counter() - restore_started, 3)
    elif config.get("init_from"):  # warm start: another run's weights, this run's own optimizer and epochs
        load_state_into(model, load_file(str(Path(config["init_from"]) / "model.safetensors")), config["init_from"])

    model = ray.train.torch.prepare_model(model)
    device = str(ray.train.torch.get_device())
    bare = model.module if hasattr(model, "module") else model
    fault_after = config.get("fault_after_epoch")

    for epoch in range(start_epoch, train["epochs"]):
        model.train()
        started = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, bce, pull (all x batches), samples
        batches = 0
        truncated = 0
        shard = ray.train.get_dataset_shard("train")
        shuffle = {"local_shuffle_buffer_size": 4096, "local_shuffle_seed": train["seed"] * 1000 + epoch
                   } if train["shuffle"] else {}
        for batch_index, batch in enumerate(shard.iter_batches(batch_size=train["batch_size"],
                                                                batch_format="pyarrow", **shuffle)):
            if fault_after is not None and epoch == fault_after + 1 and batch_index == 1:
                raise RuntimeError(f"injected fault in epoch {epoch} (after the epoch {fault_after} checkpoint)")
            rows = batch_rows(batch, target)
            where = f"epoch {epoch}, global step {global_step + 1}, rank {rank} batch {batch_index}"
            loss, parts, cut = train_step(model, optimizer, tokenizer, rows, target, max_length, train["pull_lambda"],
                                          device, where, train["pull_reduction"])
            truncated += cut
            global_step += 1
            batches += 1
            sums += torch.tensor([loss, parts["bce"], parts["pull"], len(rows)], dtype=torch.float64)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        train_seconds = time.perf_counter() - started
        per_worker_batches = max(1, batches)
        record = {"epoch": epoch, "global_step": global_step, "batches_per_worker": batches,
                  "train_loss": float(sums[0] / (per_worker_batches * world)),
                  "train_bce": float(sums[1] / (per_worker_batches * world)),
                  "train_pull": float(sums[2] / (per_worker_batches * world)),
                  "samples": int(sums[3]), "train_seconds": round(train_seconds, 3),
                  "samples_per_s": float(sums[3]) / train_seconds if train_seconds > 0 else math.nan,
                  "truncated": truncated, "world_size": world}
        if restore_seconds is not None and epoch == start_epoch:
            record["restore_seconds"] = restore_seconds
        if rank == 0:
            eval_rows = held_out_rows(config["shards"], target, train["eval_fraction"], train["seed"])
            ev = evaluate_held_out(bare, tokenizer, eval_rows, target, max_length, device) if eval_rows else {}
            record.update({k: v for k, v in ev.items() if k != "scores"})
            tmp = Path(tempfile.mkdtemp(prefix="prm-ckpt-"))
            write_started = time.perf_counter()
            save_checkpoint(bare, prm_config, tmp, tokenizer)
            save_file({k: v.contiguous() for k, v in optimizer_tensors(optimizer).items()}, str(tmp / OPTIM_FILE))
            record["checkpoint_seconds"] = round(time.perf_counter() - write_started, 3)  # local write, before upload
            history = [*history, record]
            (tmp / STATE_FILE).write_text(json.dumps({
                "epoch": epoch, "global_step": global_step, "history": history, "resumed_from": resumed_from,
                "config_hash": prm_config["config_hash"], "train_hash": prm_config["train_hash"],
                "dataset_version": prm_config["dataset_version"]}, indent=2))
            (tmp / EVAL_FILE).write_text(json.dumps(ev.get("scores", [])))
            metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"epoch-{epoch:04d}")
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            history = [*history, record]
            ray.train.report({k: v for k, v in record.items() if isinstance(v, int | float)})


# -- the driver ---------------------------------------------------------------------------------------------


def _failure_line(err: BaseException) -> str:
    """The worker's own error line out of Ray's wrapped traceback (a NaN loss first, then the last error)."""
    text = "\n".join(str(e) for e in _chain(err))
    for pattern in (r"NaNLossError: (.+)", r"RuntimeError: (injected fault.+)"):
        found = re.findall(pattern, text)
        if found:
            return found[0].strip()
    found = re.findall(r"(\w+Error: .+)", text)
    return found[-1].strip() if found else (str(err).splitlines() or [type(err).__name__])[0]


def _chain(err: BaseException | None) -> list[BaseException]:
    out = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out




def train_on_ray(cfg: FactoryConfig, dataset_dir: str | Path, run_dir: str | Path, *,
              on_epoch: Callable[[dict[str, Any]], None] | None = None,
              fault_after_epoch: int | None = None, init_from: str | Path | None = None) -> TrainResult:
    """Train (or resume) the PRM of ``cfg.train`` on a dataset version; returns the finished run.

    Everything that can be checked without Ray is checked first (dataset exists, target column present,
    RUN belongs to this config). ``on_epoch`` is called from a watcher thread with each new epoch record.
    ``init_from`` (a checkpoint or run dir of a PRM with the same model config): warm start, i.e. the weights
    (backbone, heads, and the heads' initial weights that the pull penalty aims at) start from it, in a fresh
    RUN with its own optimizer and epoch count (the active loop's rounds); a resumed RUN continues from its own
    checkpoint instead.
    ``fault_after_epoch`` (tests only) makes the workers fail early in the epoch after that checkpoint.
    """
    import pyarrow.parquet as pq

    train = cfg.train
    shards, version = dataset_shards(dataset_dir)
    columns = set(pq.read_schema(shards[0]).names)
    missing = [c for c in {*READ_COLUMNS, train.target} if c not in columns]
    if missing:
        raise TrainError(f"{dataset_dir}: the shards lack column(s) {missing} needed to train on '{train.target}'")
    run = Path(run_dir).resolve()
    try:  # a hub id is fetched (or read from the cache when offline) here, before Ray starts
        backbone = resolve_model(train.model_path, offline=cfg.offline)
    except ModelNotFoundError as err:
        raise TrainError(f"train.model_path: {err}") from None
    prm_config = {**run_prm_config(train, backbone, version, cfg.policy.prompt_template, cfg.policy.system_prompt),
                  "factory_config": {"name": cfg.name, "config_hash": cfg.config_hash()}}
    init_dir = _warm_start_dir(init_from, prm_config) if init_from is not None else None
    _check_run_dir(run, {"train_hash": train.train_hash(), "config_hash": prm_config["config_hash"],
                                    "dataset_version": version, "dataset_dir": str(Path(dataset_dir).resolve()),
                                    "train": train.model_dump(mode="json"), "init_from": init_dir})

    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(cfg.cluster)
    fraction, seed = train.eval_fraction, train.seed
    ray.data.DataContext.get_current().enable_progress_bars = False  # one line per epoch is enough
    # Read once into the object store (on the cluster, not in this process): each epoch then streams the
    # materialized blocks instead of re-reading and re-filtering the Parquet files. The held-out rows are
    # few; rank 0 reads them straight from the shards (held_out_rows).
    source = ray.data.read_parquet([str(p) for p in shards], columns=sorted({*READ_COLUMNS, train.target}))
    train_ds = source.filter(lambda row: not is_held_out(row["problem_id"], fraction, seed)).materialize()
    if train_ds.count() < train.num_workers:
        raise TrainError(f"{dataset_dir}: {train_ds.count()} training rows for {train.num_workers} workers")
    loop_config = {"prm_config": prm_config, "train": train.model_dump(mode="json"),
                   "backbone_path": str(backbone), "fault_after_epoch": fault_after_epoch, "init_from": init_dir,
                   "shards": [str(p) for p in shards]}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker,
                                                           **({"GPU": 1} if train.use_gpu else {})}),
        run_config=RunConfig(name=run.name, storage_path=str(run.parent),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=None if train.keep == "best" else train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=train.max_failures)),
        datasets={"train": train_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    started = time.perf_counter()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_epochs, args=(run, stop, on_epoch), daemon=True) if on_epoch else None
    if watcher:
        watcher.start()
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; report the worker's own line
        raise TrainError(f"training failed: {_failure_line(err)} (checkpoints, if any, are in {run})") from err
    finally:
        stop.set()
        if watcher:
            watcher.join(timeout=5)
    if result.checkpoint is None:
        raise TrainError(f"training finished without a checkpoint in {run}")
    model_dir = run / MODEL_DIR
    with result.checkpoint.as_directory() as d:
        last = json.loads((Path(d) / STATE_FILE).read_text())  # its history: every epoch, this run's and before
        history = last["history"]
        chosen = _best_epoch_dir(run) if train.keep == "best" else None
        tmp = run / f".{MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(chosen or d, tmp, ignore=shutil.ignore_patterns(OPTIM_FILE))
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
    from tasks.prm.model import TRAINING_PROBLEMS_NAME

    problem_ids = sorted({pid for path in shards for pid in pq.read_table(path, columns=["problem_id"])
                          .column("problem_id").to_pylist()})
    (model_dir / TRAINING_PROBLEMS_NAME).write_text(json.dumps({"dataset_version": version,
                                                                "problem_ids": problem_ids}) + "\n")
    state = json.loads((model_dir / STATE_FILE).read_text())
    kept = state["history"][-1] if state["history"] else {}
    summary = TrainResult(run, model_dir, last["global_step"], len(history), history,
                          last.get("resumed_from"), time.perf_counter() - started, version,
                          prm_config["config_hash"], kept)
    (run / "train_summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _warm_start_dir(init_from: str | Path, prm_config: dict[str, Any]) -> str:
    """The checkpoint dir to warm-start from; TrainError when it is missing or was written for another model."""
    from tasks.prm.model import WEIGHTS_NAME, CheckpointError, find_checkpoint_dir, read_prm_config

    try:
        ckpt = find_checkpoint_dir(init_from)
        old = read_prm_config(ckpt)
    except CheckpointError as err:
        raise TrainError(f"warm start: {err}") from None
    if old.get("config_hash") != prm_config["config_hash"]:
        raise TrainError(f"warm start: {ckpt} is a PRM of another model config ({old.get('config_hash')} vs "
                         f"{prm_config['config_hash']}: backbone, heads, target, max_length or seed differ)")
    if not (ckpt / WEIGHTS_NAME).is_file():
        raise TrainError(f"warm start: {ckpt} has no {WEIGHTS_NAME}")
    return str(ckpt.resolve())


def _best_epoch_dir(run: Path) -> Path | None:
    """The epoch checkpoint in RUN whose held-out within-position AUROC is highest (the earliest on a tie)."""
    best, best_value = None, -math.inf
    for path in sorted(run.glob("epoch-*")):
        try:
            record = json.loads((path / STATE_FILE).read_text())["history"][-1]
        except (OSError, json.JSONDecodeError, KeyError, IndexError):
            continue
        value = record.get("eval_within_position_auroc")
        if isinstance(value, int | float) and not math.isnan(value) and value > best_value:
            best, best_value = path, value
    return best


def _watch_epochs(run: Path, stop: threading.Event, on_epoch: Callable[[dict[str, Any]], None]) -> None:
    """Report each epoch checkpoint as it appears in RUN (Ray Train writes them there)."""
    seen: set[str] = {p.name for p in run.glob("epoch-*")}
    while not stop.wait(1.0):
        for path in sorted(run.glob("epoch-*")):
            state = path / STATE_FILE
            if path.name not in seen and state.is_file():
                try:
                    record = json.loads(state.read_text())["history"][-1]
                except (json.JSONDecodeError, KeyError, IndexError):
                    continue  # still being written
                seen.add(path.name)
                on_epoch(record)
