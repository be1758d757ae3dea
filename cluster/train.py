"""Distributed PRM training with Ray Train: ``TorchTrainer`` (gloo on CPU, NCCL on GPU) over Ray Data, the model held
by DDP or FSDP2 (``train.strategy``; tasks/prm/distributed.py).

The driver never loads the dataset: it checks that the dataset version exists, lists its Parquet shards from
the manifest and hands ``ray.data.read_parquet`` to the trainer; each worker reads its own streaming split
(``ray.train.get_dataset_shard("train")``, in a fixed order: the same rows reach the same step every run, so a
resumed run trains as an uninterrupted one). Problems are held out by a hash of ``problem_id`` (the same split
every run and every worker), so the eval rows never reach the optimizer. Before Ray starts, the driver also
checks that the backbone can be trained as configured (FSDP needs its decoder layers; a meta-device build from
config.json, no weights).

One optimizer step sums ``train.grad_accum_steps`` batches of ``train.batch_size`` rows on each worker (the epoch
loop is tasks/prm/fit.py's ``train_epoch``, the one a run in one process trains with): the global batch,
``batch_size x num_workers x grad_accum_steps``, is pinned in RUN/run.json.

The run directory RUN is Ray Train's experiment directory (``storage_path`` = RUN's parent, ``name`` = RUN's
name). Every epoch a checkpoint is written and reported through ``ray.train.report``, with ``train_state.json``
(the epoch, global step and loss history) and ``eval_scores.json`` (the held-out scores):

- ddp: rank 0 writes model and optimizer as safetensors;
- fsdp: every rank writes its own shard of model and optimizer (``sharded/``, torch.distributed.checkpoint) and
  reports it; Ray Train puts the shards into the one epoch directory. No rank gathers the whole model.

Started again with the same RUN, Ray Train V2 finds its checkpoint snapshot there and
``ray.train.get_checkpoint()`` returns the last one: the loop continues at the next epoch with the same
optimizer state and step counter. RUN/run.json pins the train config, global batch and dataset version, so a RUN
is never resumed under another config. When training ends, the last (or best) checkpoint's model is written to
RUN/model as one model.safetensors (an fsdp checkpoint is consolidated there, tensor by tensor), which is what
``prm-factory score --checkpoint RUN`` loads.

A non-finite loss stops the run at once (``NaNLossError``, naming epoch, step, rank and the batch's problem
ids). The run shows in the Ray dashboard's Train view like any Ray Train run.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.connect import connect
from configs.models import ModelNotFoundError, resolve_model
from configs.schema import FactoryConfig
from tasks.prm.fit import train_epoch
from tasks.prm.training import (
    READ_COLUMNS,
    TrainError,
    batch_rows,
    check_strategy,
    dataset_shards,
    evaluate_held_out,
    held_out_rows,
    is_held_out,
    load_model,
    make_optimizer,
    optimizer_tensors,
    restore_optimizer,
    run_prm_config,
    score_rows_sharded,
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
    global_batch: int | None = None
    strategy: str = "ddp"
    precision: str = "fp32"
    consolidate_seconds: float | None = None  # fsdp: writing RUN/model from the shards

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "model_dir": str(self.model_dir), "global_step": self.global_step,
                "epochs": self.epochs, "history": self.history, "resumed_from_epoch": self.resumed_from_epoch,
                "seconds": round(self.seconds, 2), "dataset_version": self.dataset_version,
                "prm_config_hash": self.prm_config_hash, "last_eval": self.last_eval,
                "global_batch": self.global_batch, "strategy": self.strategy, "precision": self.precision,
                "consolidate_seconds": self.consolidate_seconds}


def _check_run_dir(run_dir: Path, pinned: dict[str, Any]) -> bool:
    """Pin (or check) RUN/run.json; True when RUN already holds a run of this config (a resume)."""
    path = run_dir / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if "global_batch" in old and old["global_batch"] != pinned.get("global_batch"):
            raise TrainError(f"{run_dir} holds a run with a global batch of {old['global_batch']} trajectories "
                             f"({_batch_formula(old.get('train', {}))}), this config's is "
                             f"{pinned.get('global_batch')} ({_batch_formula(pinned.get('train', {}))}): resuming "
                             "would change the optimizer's step under it; give another --out or delete it")
        for key in ("train_hash", "config_hash", "dataset_version", "init_from"):
            if old.get(key) != pinned.get(key):
                raise TrainError(f"{run_dir} holds a run with another {key} ({old.get(key)} vs {pinned.get(key)}); "
                                 "give another --out or delete it")
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pinned, indent=2, sort_keys=True) + "\n")
    return False


def _batch_formula(train: dict[str, Any]) -> str:
    return (f"batch_size {train.get('batch_size')} x {train.get('num_workers')} workers x grad_accum_steps "
            f"{train.get('grad_accum_steps', 1)}")


# -- the per-worker loop ------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build or restore the PRM, train the remaining epochs, checkpoint each one."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from tasks.prm.distributed import (
        SHARDED_DIR,
        load_sharded,
        local_state_bytes,
        make_scaler,
        save_sharded,
        unwrap,
        wrap_model,
    )
    from tasks.prm.model import load_state_into, save_checkpoint, save_checkpoint_files

    prm_config, train = config["prm_config"], config["train"]
    target, max_length = prm_config["target"], prm_config["max_length"]
    strategy, precision = train.get("strategy", "ddp"), train.get("precision", "fp32")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train["seed"])
    torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    device = str(ray.train.torch.get_device())
    sharded = strategy == "fsdp"

    model, tokenizer = load_model(prm_config, config["backbone_path"], train)
    stack = contextlib.ExitStack()
    reported = ray.train.get_checkpoint()
    reported_dir = Path(stack.enter_context(reported.as_directory())) if reported is not None else None
    checkpoint = _resume_dir(Path(config["run_dir"]) if config.get("run_dir") else None, reported_dir)
    if checkpoint is not None and checkpoint != reported_dir and rank == 0:
        print(f"[train] resuming from {checkpoint}: a complete checkpoint written after the last one Ray Train "
              f"registered ({reported_dir}); the run stopped before the controller took its report", flush=True)
    if checkpoint is None and config.get("init_from"):  # warm start: another run's weights, this run's own optimizer
        load_state_into(model, load_file(str(Path(config["init_from"]) / "model.safetensors")), config["init_from"])
    model = wrap_model(model, strategy, precision, bool(train.get("activation_checkpointing")), device)
    bare = unwrap(model)
    optimizer = make_optimizer(model, train)
    scaler = make_scaler(model, precision, device)

    start_epoch, global_step, history, resumed_from = 0, 0, [], None
    restore_seconds = None
    if checkpoint is not None:
        restore_started = time.perf_counter()
        d = checkpoint
        with stack:
            state = json.loads((d / STATE_FILE).read_text())
            if state["config_hash"] != prm_config["config_hash"] or state["train_hash"] != prm_config["train_hash"]:
                raise RuntimeError(f"checkpoint {d} is from another config ({state['config_hash']})")
            if (d / SHARDED_DIR).is_dir():  # every rank reads its part (resharded if the layout changed)
                load_sharded(model, optimizer, d / SHARDED_DIR)
            else:
                load_state_into(bare, load_file(str(d / "model.safetensors")), str(d))
                restore_optimizer(optimizer, load_file(str(d / OPTIM_FILE)))
        start_epoch, global_step, history = state["epoch"] + 1, state["global_step"], state["history"]
        resumed_from = state["epoch"]
        restore_seconds = round(time.perf_counter() - restore_started, 3)

    fault = config.get("fault") or {}

    def reduce(values: list[float], op: Any = None) -> Any:
        t = torch.tensor(values, dtype=torch.float64)
        if world > 1 and dist.is_initialized():  # NCCL reduces device tensors only
            t = t.to(device)
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.cpu()

    def epoch_batches(epoch: int) -> Any:
        """This worker's batches of an epoch as rows, in the split's fixed order (shuffled by a seed per epoch);
        the tests' injected fault fires before the second."""
        shard = ray.train.get_dataset_shard("train")
        shuffle = {"local_shuffle_buffer_size": 4096, "local_shuffle_seed": train["seed"] * 1000 + epoch
                   } if train["shuffle"] else {}
        for batch_index, batch in enumerate(shard.iter_batches(batch_size=train["batch_size"],
                                                                batch_format="pyarrow", **shuffle)):
            if fault and epoch == fault["after_epoch"] + 1 and batch_index == 1:
                if fault.get("kind") == "kill":
                    if rank == world - 1:  # one worker dies as a killed process does: no exception, no cleanup
                        import os
                        import signal

                        os.kill(os.getpid(), signal.SIGKILL)
                else:
                    raise RuntimeError(f"injected fault in epoch {epoch} (after the epoch {fault['after_epoch']} "
                                       "checkpoint)")
            yield batch_rows(batch, target)

    for epoch in range(start_epoch, train["epochs"]):
        model.train()
        if train.get("learning_probability", 1.0) < 1.0:
            # The heads' data masks (train_step) come from torch's global RNG: seeded per epoch, so a resumed run
            # draws the masks an uninterrupted one does, and per rank, so the workers do not mask their rows alike.
            torch.manual_seed((train["seed"] * 1000 + epoch) * 1024 + rank)
        started = time.perf_counter()

        def where(step: int, batch: int, epoch: int = epoch, first: int = global_step) -> str:
            return f"epoch {epoch}, global step {first + step}, rank {rank} batch {batch}"

        done = train_epoch(model, optimizer, tokenizer, epoch_batches(epoch), train, max_length, device, where,
                           scaler=scaler)
        global_step += done.steps
        steps, batches, truncated = done.steps, done.batches, done.truncated
        sums = reduce([done.loss, done.bce, done.pull, done.samples])
        train_seconds = time.perf_counter() - started
        per_worker_steps = max(1, steps)
        state_bytes = local_state_bytes(model, optimizer)
        peaks = reduce([state_bytes["total"], _peak_rss_bytes(), _peak_device_bytes(device)], dist.ReduceOp.MAX)
        record = {"epoch": epoch, "global_step": global_step, "batches_per_worker": batches,
                  "train_loss": float(sums[0] / (per_worker_steps * world)),
                  "train_bce": float(sums[1] / (per_worker_steps * world)),
                  "train_pull": float(sums[2] / (per_worker_steps * world)),
                  "samples": int(sums[3]), "train_seconds": round(train_seconds, 3),
                  "samples_per_s": float(sums[3]) / train_seconds if train_seconds > 0 else math.nan,
                  "truncated": truncated, "world_size": world,
                  "state_bytes_per_worker": int(peaks[0]), "peak_rss_mb": round(float(peaks[1]) / 2**20, 1)}
        if peaks[2] > 0:
            record["peak_gpu_mb"] = round(float(peaks[2]) / 2**20, 1)
        if restore_seconds is not None and epoch == start_epoch:
            record["restore_seconds"] = restore_seconds
        eval_rows = held_out_rows(config["shards"], target, train["eval_fraction"], train["seed"])
        ev: dict[str, Any] = {}
        if sharded and eval_rows:  # an FSDP forward needs every rank: each scores its share
            scores = score_rows_sharded(model, tokenizer, eval_rows, max_length, device)
            if rank == 0:
                ev = evaluate_held_out(model, tokenizer, eval_rows, target, max_length, device, scores=scores)
        elif rank == 0 and eval_rows:
            ev = evaluate_held_out(bare, tokenizer, eval_rows, target, max_length, device)
        record.update({k: v for k, v in ev.items() if k != "scores"})
        history = [*history, record]
        tmp = Path(tempfile.mkdtemp(prefix="prm-ckpt-"))
        write_started = time.perf_counter()
        if sharded:  # every rank writes its own shard of model and optimizer
            save_sharded(model, optimizer, tmp / SHARDED_DIR)
        if rank == 0:
            if sharded:
                save_checkpoint_files(bare.backbone.config, prm_config, tmp, tokenizer)
            else:
                save_checkpoint(bare, prm_config, tmp, tokenizer)
                save_file({k: v.contiguous() for k, v in optimizer_tensors(optimizer).items()},
                          str(tmp / OPTIM_FILE))
            record["checkpoint_seconds"] = round(time.perf_counter() - write_started, 3)  # local write, before upload
            (tmp / STATE_FILE).write_text(json.dumps({
                "epoch": epoch, "global_step": global_step, "history": history, "resumed_from": resumed_from,
                "config_hash": prm_config["config_hash"], "train_hash": prm_config["train_hash"],
                "dataset_version": prm_config["dataset_version"]}, indent=2))
            (tmp / EVAL_FILE).write_text(json.dumps(ev.get("scores", [])))
        metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
        if rank == 0 or sharded:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"epoch-{epoch:04d}")
        else:
            ray.train.report(metrics)
        shutil.rmtree(tmp, ignore_errors=True)


def _resume_dir(run_dir: Path | None, reported: Path | None) -> Path | None:
    """The checkpoint a (re)started run continues from: the latest complete epoch checkpoint, whether Ray Train
    registered it (``reported``) or not. A worker killed right after its report can take the report with it
    before the controller polls it; the checkpoint is on disk all the same, and training it again would break
    the resume promise's "no epoch twice". Complete: its train_state.json reads, and its weights are all there
    (every shard a ``.metadata`` points to; or the safetensors files whole)."""
    candidates: dict[Path, int] = {}
    for path in ([reported] if reported is not None else []) + (sorted(run_dir.glob("epoch-*")) if run_dir else []):
        epoch = _complete_epoch(path)
        if epoch is not None:
            candidates[path] = epoch
    if not candidates:
        return None
    best = max(candidates.values())
    # Ray's own when it is the latest; else the first (by name) of the latest epoch's directories
    return reported if candidates.get(reported) == best else min(p for p, e in candidates.items() if e == best)


def _complete_epoch(path: Path) -> int | None:
    """The epoch of a complete checkpoint directory, None for an incomplete or unreadable one."""
    from safetensors import safe_open

    from tasks.prm.distributed import SHARDED_DIR, sharded_complete

    try:
        epoch = int(json.loads((path / STATE_FILE).read_text())["epoch"])
        if (path / SHARDED_DIR).is_dir():
            return epoch if sharded_complete(path / SHARDED_DIR) else None
        for name in ("model.safetensors", OPTIM_FILE):
            with safe_open(str(path / name), framework="pt") as f:
                f.keys()
        return epoch
    except Exception:  # noqa: BLE001 - whatever cannot be read (a SafetensorError too) is not a checkpoint to resume
        return None


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _peak_device_bytes(device: str) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else 0


# -- the driver ---------------------------------------------------------------------------------------------


def _failure_line(err: BaseException) -> str:
    """The worker's own error line out of Ray's wrapped traceback (a NaN loss first, then the last error)."""
    text = "\n".join(str(e) for e in _chain(err))
    for pattern in (r"NaNLossError: (.+)", r"RuntimeError: (injected fault.+)"):
        found = re.findall(pattern, text)
        if found:
            return found[0].strip()
    # A worker whose process died (killed, out of memory, a crash): the others then fail in a collective, whose
    # error says less than the death does.
    died = re.search(r"\[Rank (\d+) Error Snippet\]:\s*A worker health check failed.*?pid=(\d+).*?"
                     r"The actor is dead because its worker process has died", text, re.S)
    if died:
        return (f"worker rank {died.group(1)} (pid {died.group(2)}) died: its process exited without an error "
                "(killed, out of memory, or crashed)")
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
              fault_after_epoch: int | None = None, fault_kind: str = "raise",
              init_from: str | Path | None = None) -> TrainResult:
    """Train (or resume) the PRM of ``cfg.train`` on a dataset version; returns the finished run.

    Everything that can be checked without Ray is checked first (dataset exists, target column present,
    RUN belongs to this config and global batch, the backbone fits ``train.strategy``). ``on_epoch`` is called
    from a watcher thread with each new epoch record.
    ``init_from`` (a checkpoint or run dir of a PRM with the same model config): warm start, i.e. the weights
    (backbone, heads, and the heads' initial weights that the pull penalty aims at) start from it, in a fresh
    RUN with its own optimizer and epoch count (the active loop's rounds); a resumed RUN continues from its own
    checkpoint instead.
    ``fault_after_epoch`` (tests only) makes the workers fail early in the epoch after that checkpoint: every
    worker raises (``fault_kind="raise"``), or the last worker's process is killed with SIGKILL (``"kill"``).
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
    check_strategy(train, backbone)
    prm_config = {**run_prm_config(train, backbone, version, cfg.policy.prompt_template, cfg.policy.system_prompt),
                  "factory_config": {"name": cfg.name, "config_hash": cfg.config_hash()}}
    init_dir = _warm_start_dir(init_from, prm_config) if init_from is not None else None
    _check_run_dir(run, {"train_hash": train.train_hash(), "config_hash": prm_config["config_hash"],
                                    "dataset_version": version, "dataset_dir": str(Path(dataset_dir).resolve()),
                                    "train": train.model_dump(mode="json"), "init_from": init_dir,
                                    "global_batch": train.global_batch})

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
    # In the shards' order, split the same way every run (preserve_order): a resumed run gives each step the rows
    # the uninterrupted run gave it.
    context = ray.data.DataContext.get_current()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        source = ray.data.read_parquet([str(p) for p in shards], columns=sorted({*READ_COLUMNS, train.target}))
        train_ds = source.filter(lambda row: not is_held_out(row["problem_id"], fraction, seed)).materialize()
    finally:
        context.execution_options.preserve_order = ordered
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    if train_ds.count() < train.num_workers:
        raise TrainError(f"{dataset_dir}: {train_ds.count()} training rows for {train.num_workers} workers")
    loop_config = {"prm_config": prm_config, "train": train.model_dump(mode="json"),
                   "backbone_path": str(backbone), "init_from": init_dir, "run_dir": str(run),
                   "fault": None if fault_after_epoch is None else {"after_epoch": fault_after_epoch,
                                                                    "kind": fault_kind},
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
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    started = time.perf_counter()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_epochs, args=(run, stop, on_epoch), daemon=True) if on_epoch else None
    if watcher:
        watcher.start()
    # Ray Train's fit, on the main thread, installs a SIGINT handler whose closure holds the run's controller handle
    # and never removes it: the controller, and on a failed run its worker group's placement group (CPUs or GPUs),
    # would live until the next fit. Restoring the caller's handler afterwards releases them.
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; report the worker's own line
        line = _failure_line(err)
        # The finished frames of the error's tracebacks hold Ray Train's controller handle: while anything keeps the
        # error (a caller, a test), the controller, its worker group and their placement group (CPUs or GPUs) would
        # stay. Clearing those frames lets Ray stop them now.
        for e in _chain(err):
            if e.__traceback__ is not None:
                traceback.clear_frames(e.__traceback__)
        raise TrainError(f"training failed: {line} (checkpoints, if any, are in {run})") from err
    finally:
        if sigint is not None:  # None: a handler not installed from Python, left as it is
            signal.signal(signal.SIGINT, sigint)
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
        consolidate_seconds = _write_model_dir(Path(chosen or d), model_dir)
    from tasks.prm.model import TRAINING_PROBLEMS_NAME

    problem_ids = sorted({pid for path in shards for pid in pq.read_table(path, columns=["problem_id"])
                          .column("problem_id").to_pylist()})
    (model_dir / TRAINING_PROBLEMS_NAME).write_text(json.dumps({"dataset_version": version,
                                                                "problem_ids": problem_ids}) + "\n")
    state = json.loads((model_dir / STATE_FILE).read_text())
    kept = state["history"][-1] if state["history"] else {}
    summary = TrainResult(run, model_dir, last["global_step"], len(history), history,
                          last.get("resumed_from"), time.perf_counter() - started, version,
                          prm_config["config_hash"], kept, train.global_batch, train.strategy, train.precision,
                          consolidate_seconds)
    (run / "train_summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _write_model_dir(checkpoint: Path, model_dir: Path) -> float | None:
    """RUN/model from an epoch checkpoint, whole or not at all (written beside it, then renamed): its files less
    the optimizer, the weights one model.safetensors. An fsdp checkpoint's shards are consolidated into it tensor
    by tensor; returns the seconds that took (None for a ddp checkpoint, copied as it is)."""
    from tasks.prm.distributed import SHARDED_DIR, consolidate_sharded
    from tasks.prm.model import PRM_CONFIG_NAME, WEIGHTS_NAME, weights_metadata

    tmp = model_dir.parent / f".{model_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns(OPTIM_FILE, SHARDED_DIR))
    seconds = None
    if (checkpoint / SHARDED_DIR).is_dir():
        started = time.perf_counter()
        prm_config = json.loads((tmp / PRM_CONFIG_NAME).read_text())
        consolidate_sharded(checkpoint / SHARDED_DIR, tmp / WEIGHTS_NAME, weights_metadata(prm_config))
        seconds = round(time.perf_counter() - started, 3)
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    return seconds


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
