"""The one way to start a config's policy engines: in this process (``local``) or as the Ray engine pool.

The CLI, the Prefect flows, the active loop and the benchmarks all start engines here, so an engine is placed,
logged and waited for the same way wherever it runs:

- ``local``: one engine in this process (cluster/actors.py ``make_engine``: transformers or vLLM); with a
  ``log_file`` its start-up output goes there (cluster/logs.py), not to the terminal;
- otherwise the named, detached engine actors of ``cfg.cluster`` (cluster/actors.py ``start_engines``, which
  connects to Ray when needed and attaches to actors already running), and, with ``wait``, until each actor
  has loaded its model (``EnginePool.wait_ready``).

Both return an object with the engine protocol of tasks/generation.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs.schema import FactoryConfig


def start_policy_engines(cfg: FactoryConfig, *, local: bool = False, log_file: str | Path | None = None,
                         wait: bool = True) -> Any:
    """Start (or attach to) the engines `cfg` asks for and return them as one engine.

    `log_file`: where the engines' start-up output goes; None leaves it on the terminal. `wait` (the pool
    only): return once every actor answers its health call, i.e. its model is loaded.
    """
    from cluster.actors import make_engine, start_engines

    if local:
        tp = cfg.cluster.tensor_parallel_size
        if log_file is None:
            return make_engine(cfg.policy, cfg.offline, tp)
        from cluster.logs import output_to, vllm_info_to_file

        with output_to(Path(log_file)):
            engine = make_engine(cfg.policy, cfg.offline, tp)
        if cfg.policy.backend == "vllm":
            vllm_info_to_file(Path(log_file))
        return engine
    pool = start_engines(cfg, log_file)
    if wait:
        pool.wait_ready()
    return pool


def engine_factory(cfg: FactoryConfig, *, local: bool = False, log_file: str | Path | None = None,
                   wait: bool = True) -> Callable[[], Any]:
    """`start_policy_engines` deferred: the build and the active loop call it only when a shard needs labels."""
    return lambda: start_policy_engines(cfg, local=local, log_file=log_file, wait=wait)


def ray_dashboard_url() -> str | None:
    """The dashboard URL of the Ray cluster this process is connected to (None when not connected)."""
    import ray

    if not ray.is_initialized():
        return None
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url or None
