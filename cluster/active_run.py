"""The active loop (tasks/active/loop.py) wired to the cluster: engines on Ray (or in process) and Ray Train rounds.

``run_active`` is what `prm-factory active` runs and what the benchmarks call; the ``active_learning`` flow
(flows/active_learning.py) uses the same pieces. Each round's PRM is trained by ``cluster.train.train_on_ray`` on
that round's dataset version, warm-started from the previous round's checkpoint (``init_from``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.engines import engine_factory
from configs.schema import FactoryConfig
from tasks.active.loop import ActiveLoop, ActiveResult, EvalFn, EventFn, TrainFn, ruler_eval_fn


def ray_train_fn(cfg: FactoryConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainFn:
    """A round's training: Ray Train on the round's dataset version, in the round's run dir."""

    def train(dataset_dir: Path, run_dir: Path, init_from: Path | None) -> dict[str, Any]:
        from cluster.train import train_on_ray

        return train_on_ray(cfg, dataset_dir, run_dir, on_epoch=on_epoch, init_from=init_from).to_dict()

    return train


def default_eval_fn(cfg: FactoryConfig) -> EvalFn | None:
    """The toy ruler (held-out problems, exact step truth) for toy sources; None for other sources."""
    if all(src.kind == "toy" for src in cfg.sources):
        return ruler_eval_fn(cfg.active.ruler_problems)
    return None


def pool_scorer(cfg: FactoryConfig) -> Callable[[Path], Any] | None:
    """``active.scorer: vllm``: a round's checkpoint served by one vLLM scoring actor in the Ray pool
    (``cluster.pooling_engine.PooledPRM``: the whole ensemble in vLLM as the plugin model), started for the
    round and stopped after; ``transformers``: None (the loop loads the checkpoint in the driver)."""
    if cfg.active.scorer != "vllm":
        return None

    def open_scorer(checkpoint: Path) -> Any:
        from cluster.pooling_engine import PooledPRM

        return PooledPRM(checkpoint, num_engines=1, cluster=cfg.cluster)

    return open_scorer


def run_active(cfg: FactoryConfig, out_dir: str | Path, *, local: bool = False,
               engine: Callable[[], Any] | None = None, on_event: EventFn | None = None,
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> ActiveResult:
    """Run (or resume) the active loop of ``cfg`` in ``out_dir``: engines, Ray Train rounds, ruler figures.

    ``engine``: a factory returning an already running engine (tests, benchmarks); default: ``engine_factory``.
    """
    loop = ActiveLoop(cfg, out_dir, engine or engine_factory(cfg, local=local), ray_train_fn(cfg, on_epoch),
                      default_eval_fn(cfg), on_event=on_event, scorer_factory=pool_scorer(cfg))
    return loop.run()
