"""The PRM trained in one process: the epoch loop around ``train_step`` and the trained model as a scorer.

``train_epoch`` is the one epoch loop: every ``grad_accum_steps`` consecutive batches make one optimizer step
(``tasks.prm.training.train_step`` with that many micro-batches). cluster/train.py's Ray Train workers run it on
their streaming split, inside their own DDP/FSDP wrapping, checkpoints and reports; ``fit`` runs it here, without
Ray, for the benchmarks and studies (a benchmark's figure is then a figure of this trainer, not of a copy).

``fit`` seeds torch's global RNG with ``seed`` before the heads are built, orders the rows with
``random.Random(seed)`` (a new order every epoch when ``train.shuffle``), and returns a ``FittedPRM``. With a frozen
backbone, ``states_cache`` (a dict, one per backbone and ``max_length``) holds each text's token states
(``tasks.prm.training.row_states``): computed once, they train the heads of every fit that shares the cache and
score from it, so the epochs run only the heads.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.paths import resolve_path
from configs.schema import TrainConfig
from tasks.prm.training import row_states, run_prm_config, start_model, train_step


def state_key(prompt: str, completions: list[str]) -> str:
    """A trajectory's key in a token-state cache: its text."""
    return prompt + "\x00" + "\x01".join(completions)


def cached_states(cache: dict[str, Any], model: Any, tokenizer: Any, prompts: list[str],
                  completions: list[list[str]], max_length: int) -> list[Any]:
    """Each trajectory's token states from ``cache``, computing (``row_states``) and adding the missing ones."""
    keys = [state_key(p, c) for p, c in zip(prompts, completions, strict=True)]
    missing = {k: i for i, k in enumerate(keys) if k not in cache}
    if missing:
        rows = [{"prompt": prompts[i], "completions": completions[i]} for i in missing.values()]
        cache.update(zip(missing, row_states(model, tokenizer, rows, max_length), strict=True))
    return [cache[k] for k in keys]


@dataclass
class EpochSums:
    """One epoch's training on one worker: the loss and its parts summed over its optimizer steps, the rows
    trained on, the optimizer steps, the batches read, the truncated rows and the last step's loss."""

    loss: float = 0.0
    bce: float = 0.0
    pull: float = 0.0
    samples: int = 0
    steps: int = 0
    batches: int = 0
    truncated: int = 0
    last_loss: float | None = None


def train_epoch(model: Any, optimizer: Any, tokenizer: Any, batches: Iterable[list[dict[str, Any]]],
                train: dict[str, Any], max_length: int, device: str, where: Callable[[int, int], str], *,
                scaler: Any = None, states: Mapping[str, Any] | None = None) -> EpochSums:
    """Train one epoch over ``batches`` (lists of rows, read lazily): each ``train["grad_accum_steps"]`` batches
    make one optimizer step, the epoch's last, shorter window one more. ``train`` is the trainer section as a dict
    (``TrainConfig.model_dump(mode="json")``). ``where(step, batch)`` names a step in a non-finite-loss error: its
    number in this epoch (from 1) and the index of its window's last batch. ``states``: the rows' token states by
    ``state_key`` (an unwrapped model with a frozen backbone only, see ``train_step``)."""
    accum = int(train.get("grad_accum_steps", 1))
    sums = EpochSums()
    window: list[dict[str, Any]] = []
    pieces = 0

    def step(rows: list[dict[str, Any]], pieces: int) -> None:
        loss, parts, cut = train_step(
            model, optimizer, tokenizer, rows, train["target"], max_length, train["pull_lambda"], device,
            where(sums.steps + 1, sums.batches - 1), train["pull_reduction"],
            None if states is None else [states[state_key(r["prompt"], r["completions"])] for r in rows],
            precision=train.get("precision", "fp32"), micro_batches=pieces, scaler=scaler,
            learning_probability=train.get("learning_probability", 1.0))
        sums.loss += loss
        sums.bce += parts["bce"]
        sums.pull += parts["pull"]
        sums.samples += len(rows)
        sums.steps += 1
        sums.truncated += cut
        sums.last_loss = loss

    for batch in batches:
        window.extend(batch)
        sums.batches += 1
        pieces += 1
        if pieces == accum:
            step(window, pieces)
            window, pieces = [], 0
    if window:
        step(window, pieces)
    return sums


@dataclass
class FittedPRM:
    """A PRM in memory as a StepScorer (``score``). With ``states_cache``, its heads read the cached token states
    of its frozen backbone (computed once per text); without, the whole model runs
    (``tasks.prm.model.score_trajectories``, the path a loaded checkpoint scores by)."""

    model: Any
    tokenizer: Any
    max_length: int
    prm_config: dict[str, Any] | None = None
    states_cache: dict[str, Any] | None = None
    steps: int = 0  # optimizer steps of the fit
    last_loss: float | None = None  # the fit's last step's loss
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch

    def score(self, prompts: list[str], completions: list[list[str]], batch_size: int = 32) -> list[Any]:
        import torch

        from tasks.prm.model import collate, encode_trajectory, ensemble_scores, pad_token_id, score_trajectories

        if self.states_cache is None:
            return score_trajectories(self.model, self.tokenizer, prompts, completions, self.max_length,
                                      batch_size=batch_size)
        states = cached_states(self.states_cache, self.model, self.tokenizer, prompts, completions, self.max_length)
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                end = start + batch_size
                encoded = [encode_trajectory(self.tokenizer, p, list(c), self.max_length)
                           for p, c in zip(prompts[start:end], completions[start:end], strict=True)]
                batch = collate(encoded, pad_token_id(self.tokenizer))
                hidden = torch.nn.utils.rnn.pad_sequence(states[start:end], batch_first=True)
                logits = self.model.read(hidden, batch["step_ends"], batch["completion_mask"])
                out.extend(ensemble_scores(torch.sigmoid(logits.float()), encoded))
        return out


def fit(train_cfg: TrainConfig, rows: list[dict[str, Any]], seed: int, *, name: str = "fit",
        dataset_version: str | None = None, init_from: str | Path | None = None,
        states_cache: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, Any], FittedPRM], None] | None = None) -> FittedPRM:
    """Train ``train_cfg``'s PRM on ``rows`` in this process (CPU) for its epochs; ``seed`` replaces its seed.

    ``init_from``: a checkpoint or run dir of a PRM of the same model config to start from (the warm start
    cluster/train.py does: its weights, a fresh optimizer). ``states_cache``: see the module docstring; ignored when
    the backbone trains. ``on_epoch(record, fitted)`` after each epoch, the model still in training mode (a study
    scores it there). ``name`` and ``dataset_version`` only label errors and the PRM config's provenance.
    """
    import torch
    from safetensors.torch import load_file

    from tasks.prm.distributed import make_scaler
    from tasks.prm.model import WEIGHTS_NAME, find_checkpoint_dir, load_state_into, read_prm_config

    torch.manual_seed(seed)
    train = train_cfg.model_copy(update={"seed": seed})
    section = train.model_dump(mode="json")
    backbone = resolve_path(train.model_path)
    prm_config = run_prm_config(train, backbone, dataset_version)
    max_length = prm_config["max_length"]
    model, tokenizer, optimizer = start_model(prm_config, backbone, section)
    if init_from is not None:
        ckpt = find_checkpoint_dir(init_from)
        if read_prm_config(ckpt)["config_hash"] != prm_config["config_hash"]:
            raise ValueError(f"warm start: {ckpt} is a PRM of another model config")
        load_state_into(model, load_file(str(ckpt / WEIGHTS_NAME)), str(ckpt))
    scaler = make_scaler(model, train.precision, "cpu")
    fitted = FittedPRM(model, tokenizer, max_length, prm_config)
    rng, order = random.Random(seed), list(range(len(rows)))
    model.train()
    # A frozen backbone's token states depend on the text alone: computed once, the epochs train only the heads.
    if states_cache is not None and not train.train_backbone:
        cached_states(states_cache, model, tokenizer, [r["prompt"] for r in rows], [r["completions"] for r in rows],
                      max_length)
        fitted.states_cache = states_cache
    for epoch in range(train.epochs):
        if train.shuffle:
            rng.shuffle(order)
        model.train()
        started = time.perf_counter()
        batches = ([rows[i] for i in order[start:start + train.batch_size]]
                   for start in range(0, len(order), train.batch_size))
        sums = train_epoch(model, optimizer, tokenizer, batches, section, max_length, "cpu",
                           lambda _step, _batch, epoch=epoch: f"{name} epoch {epoch}", scaler=scaler,
                           states=fitted.states_cache)
        seconds = time.perf_counter() - started
        fitted.steps += sums.steps
        fitted.last_loss = sums.last_loss if sums.steps else fitted.last_loss
        steps = max(1, sums.steps)
        record = {"epoch": epoch, "steps": sums.steps, "train_loss": sums.loss / steps,
                  "train_bce": sums.bce / steps, "train_pull": sums.pull / steps, "samples": sums.samples,
                  "truncated": sums.truncated, "train_seconds": seconds,
                  "samples_per_s": sums.samples / seconds if seconds > 0 else float("nan")}
        fitted.history.append(record)
        if on_epoch is not None:
            on_epoch(record, fitted)
    model.eval()
    return fitted
