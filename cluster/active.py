"""The active loop (tasks/active.py) wired to the cluster: engines on Ray (or in process) and Ray Train rounds.

``run_active`` is what `prm-factory active` runs and what the benchmarks call; the ``active_learning`` flow
(flows/active.py) uses the same pieces. Each round's PRM is trained by ``cluster.train.train_prm`` on that
round's dataset version, warm-started from the previous round's checkpoint (``init_from``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs.schema import FactoryConfig
from tasks.active import ActiveLoop, ActiveResult, EvalFn, EventFn, TrainFn, ruler_eval_fn


def ray_train_fn(cfg: FactoryConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainFn:
    """A round's training: Ray Train on the round's dataset version, in the round's run dir."""

    def train(dataset_dir: Path, run_dir: Path, init_from: Path | None) -> dict[str, Any]:
        from cluster.train import train_prm

        return train_prm(cfg, dataset_dir, run_dir, on_epoch=on_epoch, init_from=init_from).to_dict()

    return train


def engine_factory(cfg: FactoryConfig, local: bool = False) -> Callable[[], Any]:
    """Starts the policy engines when first needed: in this process (local) or as named Ray actors (the pool)."""

    def start() -> Any:
        if local:
            from cluster.actors import make_engine

            return make_engine(cfg.policy, cfg.offline)
        import ray

        from cluster.actors import start_engines

        pool = start_engines(cfg)  # connects to Ray (cluster.address) when needed
        # Creating an actor returns at once; a call waits for its constructor (model load, vLLM warm-up).
        ray.get([actor.health.remote() for actor in pool.actors], timeout=cfg.cluster.request_timeout_s)
        return pool

    return start


def default_eval_fn(cfg: FactoryConfig) -> EvalFn | None:
    """The toy ruler (held-out problems, exact step truth) for toy sources; None for other sources."""
    if all(src.kind == "toy" for src in cfg.sources):
        return ruler_eval_fn(cfg.active.ruler_problems)
    return None


def run_active(cfg: FactoryConfig, out_dir: str | Path, *, local: bool = False,
               engine: Callable[[], Any] | None = None, on_event: EventFn | None = None,
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> ActiveResult:
    """Run (or resume) the active loop of ``cfg`` in ``out_dir``: engines, Ray Train rounds, ruler figures.

    ``engine``: a factory returning an already running engine (tests, benchmarks); default: ``engine_factory``.
    """
    loop = ActiveLoop(cfg, out_dir, engine or engine_factory(cfg, local), ray_train_fn(cfg, on_epoch),
                      default_eval_fn(cfg), on_event=on_event)
    return loop.run()
