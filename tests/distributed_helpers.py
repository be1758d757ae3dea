"""Two-rank gloo runs of the trainer's own pieces (tasks/prm/distributed.py, tasks/prm/training.py's train_step),
spawned straight from torch.multiprocessing: cheaper than Ray Train for the numerical comparisons of DDP and FSDP.

`spawn(experiments, out)` starts `world` processes that run each named experiment in turn over one gloo process
group; each rank writes `out/<experiment>.rank<r>.json` (numbers) and, where there are weights,
`out/<experiment>.rank<r>.safetensors`. The toy backbone is the shipped toy policy; the rows are toy-world problems
with their canonical solution cut at newlines and seeded random labels.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from configs.schema import REPO_ROOT

TOY = REPO_ROOT / "assets" / "toy-policy"
BATCH = 2  # rows per rank per step


def toy_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n toy problems, each with its canonical solution's lines as steps and random 0/1 labels."""
    from configs.schema import ToySource
    from tasks.sources.toy_world import canonical_solution, generate_problems

    rng = random.Random(seed)
    rows = []
    for p in generate_problems(ToySource(num_problems=n, seed=seed, min_steps=2, max_steps=5)):
        lines = canonical_solution(p).splitlines(keepends=True)
        rows.append({"prompt": p.question + "\n", "completions": lines, "problem_id": p.problem_id,
                     "labels": [rng.random() < 0.7 for _ in lines]})
    return rows


def prm_config(**options: Any) -> dict[str, Any]:
    from tasks.prm.model import make_prm_config

    return make_prm_config(str(TOY), 128, 4, [32, 32], "labels", 256, 0, **options)


def make(strategy: str, precision: str = "fp32", ac: bool = False, lr: float = 1e-3, **options: Any):
    """The toy PRM wrapped for `strategy`, its AdamW, tokenizer and loss scaler."""
    import torch

    from tasks.prm.distributed import make_scaler, wrap_model
    from tasks.prm.training import load_model, make_optimizer

    torch.manual_seed(0)
    train = {"train_backbone": True, "lr": lr, "weight_decay": 0.0}
    model, tok = load_model(prm_config(**options), TOY, train)
    model = wrap_model(model, strategy, precision, ac, "cpu")
    return model, make_optimizer(model, train), tok, make_scaler(model, precision, "cpu")


def rank_rows(rows: list[dict[str, Any]], step: int, rank: int, world: int, batch: int = BATCH) -> list[dict]:
    start = (step * world + rank) * batch
    return [rows[i % len(rows)] for i in range(start, start + batch)]


def full_state(model) -> dict[str, Any]:
    """The whole model's float32 state on every rank (collective under FSDP): for comparing weights in tests."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from tasks.prm.distributed import is_fsdp, unwrap

    if is_fsdp(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return {k: v.detach().clone().contiguous() for k, v in state.items()}
    return {k: v.detach().clone().contiguous() for k, v in unwrap(model).state_dict().items()}


def train_steps(model, opt, tok, rows, steps: int, rank: int, world: int, precision: str = "fp32",
                micro_batches: int = 1, batch: int = BATCH, scaler=None, **options: Any) -> list[float]:
    from tasks.prm.training import train_step

    return [train_step(model, opt, tok, rank_rows(rows, s, rank, world, batch), "labels", 256, 0.5, "cpu",
                       f"step {s}", precision=precision, micro_batches=micro_batches, scaler=scaler,
                       **options)[0] for s in range(steps)]


# -- the experiments: each runs on every rank and returns (numbers, tensors to save) ------------------------


def exp_ddp_vs_fsdp(rank: int, world: int, out: Path) -> tuple[dict, dict]:
    """fp32, the same seed and rows, 10 steps each: per-step losses, final weights, per-rank state bytes."""
    from tasks.prm.distributed import local_state_bytes

    rows = toy_rows(64, seed=1)
    result, tensors = {}, {}
    for strategy in ("ddp", "fsdp"):
        model, opt, tok, _ = make(strategy)
        result[f"{strategy}_losses"] = train_steps(model, opt, tok, rows, 10, rank, world)
        result[f"{strategy}_bytes"] = local_state_bytes(model, opt)
        tensors.update({f"{strategy}/{k}": v for k, v in full_state(model).items()})
    return result, tensors


def exp_accumulation(rank: int, world: int, out: Path) -> tuple[dict, dict]:
    """fp32, FSDP and DDP: 3 steps of batch 2b as 2 accumulated pieces of b against 3 steps of batch 2b at once."""
    rows = toy_rows(64, seed=2)
    result, tensors = {}, {}
    for strategy in ("fsdp", "ddp"):
        for pieces in (1, 2):
            model, opt, tok, _ = make(strategy)
            result[f"{strategy}_{pieces}_losses"] = train_steps(model, opt, tok, rows, 3, rank, world,
                                                                micro_batches=pieces, batch=2 * BATCH)
            tensors.update({f"{strategy}_{pieces}/{k}": v for k, v in full_state(model).items()})
    return result, tensors


def exp_bf16_mixed(rank: int, world: int, out: Path) -> tuple[dict, dict]:
    """FSDP bf16-mixed at lr 1e-5 for 10 steps: how many of this rank's float32 master weights changed."""
    import torch

    from tasks.prm.distributed import _local

    rows = toy_rows(64, seed=3)
    model, opt, tok, _ = make("fsdp", "bf16-mixed", lr=1e-5)
    before = {n: _local(p).detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, opt, tok, rows, 10, rank, world, precision="bf16-mixed")
    changed = total = 0
    for n, p in model.named_parameters():
        if n.startswith("backbone."):
            local = _local(p).detach()
            changed += int((local != before[n]).sum())
            total += local.numel()
    dtypes = sorted({str(_local(p).dtype) for p in model.parameters()})
    state_dtypes = sorted({str(v.dtype) for s in opt.state.values() for k, v in s.items() if k != "step"})
    return {"losses": losses, "changed": changed, "total": total, "param_dtypes": dtypes,
            "optimizer_dtypes": state_dtypes, "finite": all(torch.isfinite(torch.tensor(losses)).tolist())}, {}


def exp_features(rank: int, world: int, out: Path) -> tuple[dict, dict]:
    """The heads reading every token with the LM's token features, activation checkpointing on FSDP, fp16-mixed
    with loss scaling: each under DDP and FSDP, 3 steps."""
    rows = toy_rows(64, seed=4)
    opts = {"reads": "tokens", "token_features": "distribution"}
    result = {}
    for strategy in ("ddp", "fsdp"):
        model, opt, tok, _ = make(strategy, **opts)
        result[f"{strategy}_tokens"] = train_steps(model, opt, tok, rows, 3, rank, world)
        model, opt, tok, _ = make(strategy, ac=True)
        result[f"{strategy}_ac"] = train_steps(model, opt, tok, rows, 3, rank, world)
        model, opt, tok, _ = make(strategy)
        result[f"{strategy}_plain"] = train_steps(model, opt, tok, rows, 3, rank, world)
        model, opt, tok, scaler = make(strategy, "fp16-mixed")
        result[f"{strategy}_fp16"] = train_steps(model, opt, tok, rows, 3, rank, world, precision="fp16-mixed",
                                                 scaler=scaler)
        result[f"{strategy}_fp16_scale"] = float(scaler.get_scale())
    return result, {}


def exp_sharded_checkpoint(rank: int, world: int, out: Path) -> tuple[dict, dict]:
    """Each rank writes its shard into its own directory (as a Ray Train worker does), the shards are put into one
    (as Ray Train's upload does); a fresh FSDP model loads them and its next step equals the original's."""
    import torch.distributed as dist

    from tasks.prm.distributed import SHARDED_DIR, load_sharded, save_sharded

    rows = toy_rows(64, seed=5)
    model, opt, tok, _ = make("fsdp")
    train_steps(model, opt, tok, rows, 3, rank, world)
    own = out / f"ckpt-rank{rank}"
    save_sharded(model, opt, own / SHARDED_DIR)
    files = sorted(p.name for p in (own / SHARDED_DIR).iterdir())
    dist.barrier()
    merged = out / "ckpt" / SHARDED_DIR
    if rank == 0:
        merged.mkdir(parents=True)
        for r in range(world):
            for p in (out / f"ckpt-rank{r}" / SHARDED_DIR).iterdir():
                shutil.copy(p, merged / p.name)
    dist.barrier()
    state = full_state(model)
    next_loss = train_steps(model, opt, tok, rows[6 * world * BATCH:], 1, rank, world)
    fresh, fresh_opt, _, _ = make("fsdp")
    load_sharded(fresh, fresh_opt, merged)
    restored = full_state(fresh)
    fresh_loss = train_steps(fresh, fresh_opt, tok, rows[6 * world * BATCH:], 1, rank, world)
    return {"files": files, "next_loss": next_loss, "fresh_loss": fresh_loss}, {
        **{f"trained/{k}": v for k, v in state.items()}, **{f"restored/{k}": v for k, v in restored.items()}}


EXPERIMENTS = {f.__name__.removeprefix("exp_"): f for f in (exp_ddp_vs_fsdp, exp_accumulation, exp_bf16_mixed,
                                                             exp_features, exp_sharded_checkpoint)}


def _worker(rank: int, world: int, port: int, names: list[str], out: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in names:
            numbers, tensors = EXPERIMENTS[name](rank, world, Path(out))
            (Path(out) / f"{name}.rank{rank}.json").write_text(json.dumps(numbers))
            if tensors:
                save_file(tensors, str(Path(out) / f"{name}.rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def spawn(names: list[str], out: Path, world: int = 2) -> Path:
    """Run the named experiments on `world` gloo ranks; raises if a rank fails."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world, free_port(), names, str(out)), nprocs=world, join=True)
    return out


def read(out: Path, name: str, rank: int = 0) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    tensors = out / f"{name}.rank{rank}.safetensors"
    return (json.loads((out / f"{name}.rank{rank}.json").read_text()),
            load_file(str(tensors)) if tensors.is_file() else {})
