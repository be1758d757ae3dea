"""The PRM's training pieces in plain torch, free of Ray: one optimizer step, the held-out split and its
evaluation, optimizer state as tensors, and the model config of a run.

cluster/train.py runs them under Ray Train (``train_loop_per_worker``, DDP or FSDP over gloo or NCCL: the
strategies and precisions are tasks/prm/distributed.py's); a benchmark or a study runs them in one process through
tasks/prm/fit.py, whose epoch loop (``train_epoch``) the Ray Train workers run too, so both train the same way.
Problems are held out by a seeded hash of ``problem_id`` (``is_held_out``): the same split every run and every
worker, so the eval rows never reach the optimizer.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

from configs.schema import TrainConfig
from tasks.store.dataset import DatasetError, manifest_shards, read_manifest

READ_COLUMNS = ("prompt", "completions", "labels", "problem_id")


class TrainError(RuntimeError):
    """A training run that cannot start or did not finish; the message says why in one line."""


class NaNLossError(FloatingPointError):
    """Raised inside a worker when a batch's loss is not finite."""


def is_held_out(problem_id: str, fraction: float, seed: int) -> bool:
    """True for the ``fraction`` of problems whose seeded sha256 falls lowest: a split stable across runs."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def dataset_shards(dataset_dir: str | Path) -> tuple[list[Path], str | None]:
    """The Parquet shards of a finished dataset version (from its manifest, through the store's path guard) and
    its version id; TrainError, in one line, when the version is absent, unreadable, empty or missing a shard.
    The paths are absolute: Ray Train workers read them from another working directory."""
    root = Path(dataset_dir).resolve()
    if not root.is_dir():
        raise TrainError(f"dataset directory not found: {root}")
    try:
        manifest = read_manifest(root)
        paths = manifest_shards(root, manifest)
    except FileNotFoundError:
        raise TrainError(f"{root} is not a finished dataset version (no manifest.json; build or refresh it first)"
                         ) from None
    except DatasetError as err:
        raise TrainError(str(err)) from None
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TrainError(f"{root}: shards listed in the manifest are missing: {missing[:3]}")
    if not paths:
        raise TrainError(f"{root}: the manifest lists no shards (an empty dataset)")
    return paths, manifest.get("dataset_version")


def run_prm_config(train: TrainConfig, backbone: Path, dataset_version: str | None, prompt_template: str | None = None,
                   system_prompt: str | None = None) -> dict[str, Any]:
    """The PRM config of a run: the model's shape (hashed) plus provenance, and the prompt format of its training
    rows (``prompt_template``, ``system_prompt``: how eval renders a bare question, e.g. ProcessBench's)."""
    from transformers import AutoConfig

    from tasks.prm.model import backbone_context, make_prm_config

    context = backbone_context(backbone)
    max_length = min(train.max_length or context, context)
    return make_prm_config(train.model_path, AutoConfig.from_pretrained(str(backbone)).hidden_size,
                           train.num_heads, train.head_hidden, train.target, max_length, train.seed,
                           reads=train.reads, token_features=train.token_features, head_init=train.head_init,
                           train=train.model_dump(mode="json"), train_hash=train.train_hash(),
                           dataset_version=dataset_version, prompt_template=prompt_template,
                           system_prompt=system_prompt)


def start_model(prm_config: dict[str, Any], backbone_path: str | Path, train: dict[str, Any]
                ) -> tuple[Any, Any, Any]:
    """The model (pretrained backbone, fresh heads; the backbone frozen unless ``train_backbone``), its tokenizer
    and the AdamW optimizer over what trains: how a run in one process starts. `train` is the trainer section as
    a dict (``TrainConfig.model_dump(mode="json")``). Ray Train's workers call ``load_model``, wrap the model for
    their strategy (tasks/prm/distributed.py ``wrap_model``), then ``make_optimizer``."""
    model, tokenizer = load_model(prm_config, backbone_path, train)
    return model, tokenizer, make_optimizer(model, train)


def load_model(prm_config: dict[str, Any], backbone_path: str | Path, train: dict[str, Any]) -> tuple[Any, Any]:
    """The float32 model (the master weights whatever ``train.precision`` computes in) and its tokenizer."""
    from transformers import AutoTokenizer

    from tasks.prm.model import build_prm

    model = build_prm({**prm_config, "backbone": str(backbone_path)}, "float32")
    if not train["train_backbone"]:
        model.backbone.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_path))
    tokenizer.model_max_length = 10**9  # trajectories are cut at max_length here; silence the tokenizer's warning
    return model, tokenizer


def make_optimizer(model: Any, train: dict[str, Any]) -> Any:
    """AdamW over the parameters that train (after wrapping: FSDP's are the shards)."""
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train["lr"],
                             weight_decay=train["weight_decay"])


def check_strategy(train: TrainConfig, backbone: str | Path) -> None:
    """TrainError, before any worker starts, when the backbone cannot be trained under ``train.strategy`` (FSDP
    finds no decoder layer to wrap) or with ``train.activation_checkpointing``. Builds the backbone on the meta
    device from its config.json: no weights are read."""
    if train.strategy == "ddp" and not train.activation_checkpointing:
        return
    import torch
    from transformers import AutoConfig, AutoModel

    from tasks.prm.distributed import StrategyError, check_backbone

    try:
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.from_pretrained(str(backbone)))
        check_backbone(model, train.strategy, train.activation_checkpointing, str(train.model_path))
    except StrategyError as err:
        raise TrainError(f"train.strategy / train.activation_checkpointing: {err}") from None
    except (OSError, ValueError) as err:
        raise TrainError(f"train.model_path {train.model_path}: cannot build the backbone from its config to "
                         f"check train.strategy {train.strategy}: {err}") from None


def optimizer_tensors(optimizer: Any) -> dict[str, Any]:
    import torch

    out = {}
    for pid, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{pid}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def restore_optimizer(optimizer: Any, tensors: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def batch_rows(batch: Any, target: str) -> list[dict[str, Any]]:
    cols = {name: batch.column(name).to_pylist() for name in {*READ_COLUMNS, target}}
    return [{k: cols[k][i] for k in cols} for i in range(batch.num_rows)]


def held_out_rows(shards: list[str], target: str, fraction: float, seed: int) -> list[dict[str, Any]]:
    """The held-out rows, read from the shards with pyarrow (a few problems: no Ray Data pipeline needed)."""
    import pyarrow.parquet as pq

    rows = []
    for path in shards:
        table = pq.read_table(path, columns=sorted({*READ_COLUMNS, target}))
        rows.extend(r for r in batch_rows(table, target) if is_held_out(r["problem_id"], fraction, seed))
    return rows


def score_rows_sharded(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_length: int, device: str,
                       batch_size: int = 16) -> list[Any]:
    """Every rank scores its share of `rows` (rank r: rows r, r + world, ...) through the distributed model and
    all get every row's StepScores, in the rows' order. Collective (an FSDP forward gathers parameters from every
    rank), so each rank runs as many batches: the shorter shares are padded with a row whose scores are dropped."""
    import torch.distributed as dist

    from tasks.prm.model import score_trajectories

    rank, world = dist.get_rank(), dist.get_world_size()
    if not rows:
        return []
    mine = rows[rank::world]
    share = -(-len(rows) // world)
    padded = mine + [rows[0]] * (share - len(mine))
    scores = score_trajectories(model, tokenizer, [r["prompt"] for r in padded], [r["completions"] for r in padded],
                                max_length, batch_size=batch_size, device=device)[:len(mine)]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, scores)
    out: list[Any] = [None] * len(rows)
    for r, part in enumerate(gathered):
        for i, s in enumerate(part):
            out[r + i * world] = s
    return out


def evaluate_held_out(model: Any, tokenizer: Any, rows: list[dict[str, Any]], target: str, max_length: int,
              device: str, scores: list[Any] | None = None) -> dict[str, Any]:
    """Held-out loss (BCE of the ensemble mean vs the target), step AUROC and accuracy vs the hard labels
    (``tasks.prm.report.held_out_metrics``), and the within-position AUROC. ``scores``: the rows' StepScores when
    already computed (``score_rows_sharded``), else the model scores them."""
    from tasks.evaluation.metrics import within_position_auroc
    from tasks.prm.model import score_trajectories
    from tasks.prm.report import held_out_metrics

    if scores is None:
        scores = score_trajectories(model, tokenizer, [r["prompt"] for r in rows], [r["completions"] for r in rows],
                                    max_length, batch_size=16, device=device)
    metrics = held_out_metrics(rows, scores, target)
    return {
        "eval_rows": metrics["rows"], "eval_steps": metrics["steps"], "eval_loss": float(metrics["loss"]),
        "eval_auroc": metrics["auroc_vs_labels"],
        "eval_within_position_auroc": within_position_auroc(
            [s.mean for s in scores], [[bool(x) for x in r["labels"]] for r in rows])["mean"],
        "eval_acc": metrics["accuracy_vs_labels"],
        "eval_truncated": metrics["truncated_rows"],
        "scores": [{"problem_id": r["problem_id"], "prompt": r["prompt"], "completions": r["completions"],
                    "mean": s.mean, "std": s.std} for r, s in zip(rows, scores, strict=True)],
    }


def train_step(model: Any, optimizer: Any, tokenizer: Any, rows: list[dict[str, Any]], target: str,
               max_length: int, pull_lambda: float, device: str, where: str,
               pull_reduction: str = "sum", states: list[Any] | None = None, *, precision: str = "fp32",
               micro_batches: int = 1, scaler: Any = None, learning_probability: float = 1.0
               ) -> tuple[float, dict[str, float], int]:
    """One optimizer step on a batch of rows; returns (loss, its parts, truncated rows).

    ``micro_batches`` (gradient accumulation): the rows run forward and backward in that many consecutive
    pieces, their gradients summed, then one step. Each piece's BCE is weighted by its share of the batch's usable
    steps and the pull counted once over the pieces, so the step is the one the whole batch would give (up to
    float rounding); the loss returned is the whole batch's. Under DDP only the last piece all-reduces.

    ``learning_probability`` below 1 (ActPRM's per-head data masks): each head trains on each row with that
    probability, independently per head, from one Bernoulli [rows, heads] draw of torch's global RNG per step
    (made before the pieces, so accumulation does not change it; at 1 nothing is drawn). Head e's BCE is then the
    mean over its own kept usable steps: a piece weighs head e's BCE by its share of head e's kept steps in the
    batch (0 for a head with none), so accumulation still gives the whole batch's step, head by head. The reported
    ``bce`` is the mean over heads of each head's BCE over its kept steps (0 for a head that keeps none); ``steps``
    counts the usable steps, kept or not.

    ``precision``: the compute (tasks/prm/distributed.py); an FSDP model casts by its own policy, any other
    computes its forward under autocast. The loss is float32 either way; ``scaler`` (fp16) scales it.

    ``states``: the rows' token states from ``row_states`` (a frozen backbone's, computed once); the heads then
    train on them without running the backbone. Only for a model that is not wrapped for distributed training
    (the wrapper's gradient sync runs in its forward).

    Raises ``NaNLossError`` naming ``where`` and the batch's problem ids when the loss is not finite (before
    the step, so the weights stay as they were).
    """
    import torch

    from tasks.prm.distributed import autocast, no_gradient_sync, unwrap
    from tasks.prm.model import collate, encode_trajectory, ensemble_loss, pad_token_id, target_tensor

    bare = unwrap(model)
    if states is not None and bare is not model:
        raise ValueError("train_step's states need an unwrapped model (a distributed wrapper syncs in forward)")
    size = -(-len(rows) // max(1, micro_batches))
    pieces = [list(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)]
    encoded = [encode_trajectory(tokenizer, r["prompt"], r["completions"], max_length) for r in rows]
    kept_rows = None  # [rows, E]: head e trains on row i (learning_probability < 1 only)
    if learning_probability < 1.0:
        kept_rows = torch.bernoulli(torch.full((len(rows), bare.heads.num_heads), float(learning_probability))).bool()
    batches = []
    for idx in pieces:
        tensors = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_token_id(tokenizer)).items()}
        targets = target_tensor([rows[i][target] for i in idx], [encoded[i] for i in idx],
                                tensors["step_ends"].shape[1])
        row_steps = (~torch.isnan(targets)).sum(1)
        head_steps = None if kept_rows is None else (kept_rows[idx] * row_steps.unsqueeze(1)).sum(0)  # [E]
        batches.append((idx, tensors, targets.to(device), int(row_steps.sum()), head_steps))
    usable = sum(b[3] for b in batches)
    if kept_rows is not None:
        head_usable = sum(b[4] for b in batches).clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    total, bce, pull_value = 0.0, 0.0, 0.0
    for k, (idx, tensors, targets, steps, head_steps) in enumerate(batches):
        share = steps / usable if usable else 1.0 / len(batches)
        head_mask = None
        if kept_rows is not None:
            share = (head_steps / head_usable).to(device)
            head_mask = kept_rows[idx].to(device).unsqueeze(1).expand(-1, targets.shape[1], -1).reshape(
                -1, kept_rows.shape[1])
        last = k == len(batches) - 1
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(no_gradient_sync(model))
            with autocast(model, precision, device):
                if states is None:
                    logits, pull = model(tensors["input_ids"], tensors["attention_mask"], tensors["step_ends"],
                                         tensors["completion_mask"], pull=pull_reduction)
                else:
                    hidden = torch.nn.utils.rnn.pad_sequence([states[i] for i in idx], batch_first=True).to(device)
                    logits = bare.read(hidden, tensors["step_ends"], tensors["completion_mask"])
                    pull = bare.heads.pull(pull_reduction)
            loss, parts = ensemble_loss(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                        pull.float(), pull_lambda, bce_weight=share,
                                        pull_weight=1.0 / len(batches), head_mask=head_mask)
            if not torch.isfinite(loss):
                ids = [rows[i]["problem_id"] for i in idx]
                raise NaNLossError(f"non-finite loss {float(loss.detach())} at {where} (problem_ids {ids})")
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += float(loss.detach())
        bce += share * parts["bce"] if head_mask is None else parts["bce_term"]
        pull_value = parts["pull"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total, {"bce": bce, "pull": pull_value, "steps": usable}, sum(e.truncated for e in encoded)


def row_states(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_length: int, device: str = "cpu",
               batch_size: int = 32) -> list[Any]:
    """Each row's token states ([T_i, H'], ``ProcessRewardModel.token_states`` without its padding), computed once
    for training the heads of a frozen backbone with ``train_step(..., states=...)``."""
    import torch

    from tasks.prm.distributed import unwrap
    from tasks.prm.model import collate, encode_trajectory, pad_token_id

    bare = unwrap(model)
    lm_head = list(bare.lm_head.parameters()) if bare.lm_head is not None else []
    if any(p.requires_grad for p in [*bare.backbone.parameters(), *lm_head]):
        raise ValueError("row_states is for a frozen backbone and LM head: training them changes the states")
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            encoded = [encode_trajectory(tokenizer, r["prompt"], r["completions"], max_length)
                       for r in rows[start:start + batch_size]]
            batch = collate(encoded, pad_token_id(tokenizer))
            hidden = bare.token_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out.extend(hidden[i, :len(e.input_ids)].clone() for i, e in enumerate(encoded))
    return out
