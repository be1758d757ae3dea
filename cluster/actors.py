"""Policy engines in long-lived named Ray actors, and the pool that spreads work over them.

One `EngineActor` per engine (one per GPU on a cluster, or per ``cluster.tensor_parallel_size`` GPUs: vLLM then
runs that many ranks as processes of the actor, inside its bundle), each in its own bundle of one placement group,
named ``f"{config_name}-engine-{i}"`` in the config's namespace and detached, so any driver (a Prefect
task, the CLI, a notebook) reattaches to the live engines instead of loading the model again.

Failure model: Ray restarts a dead actor up to ``max_restarts`` times; it never retries an actor task
(``max_task_retries=0``). Retries belong to `EnginePool`, which knows which chunk of requests each call
carried: when an engine dies or a call passes its deadline, the chunk goes to another live engine (or the
restarted one), and each chunk's results are taken exactly once, so nothing is lost or duplicated.
Timeouts are enforced here, in the actor call, because Prefect task timeouts are not under Ray.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.connect import connect
from configs.env import FORWARDED_ENV, HUB_OFFLINE_ENV
from configs.models import check_model
from configs.schema import ClusterConfig, FactoryConfig, PolicyConfig
from tasks.generation import (
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    PackedResults,
    pack_results,
    unpack_results,
)

log = logging.getLogger(__name__)

class EnginePoolError(RuntimeError):
    """The pool could not serve a batch: every engine is dead, or a chunk failed too many times."""


def make_engine(policy: PolicyConfig, offline: bool = False, tensor_parallel_size: int = 1, cpu_core_offset: int = 0):
    """The engine a PolicyConfig asks for, built in this process (HFEngine or VLLMEngine).

    `offline` (the config's): a model given by hub id comes from the local HF cache only. `tensor_parallel_size`
    (cluster.tensor_parallel_size, vLLM only): ranks of this engine, as processes of its own; on CPU each bound to
    one core, from the `cpu_core_offset`-th on (cluster/vllm_engine.py).
    """
    model_path = policy.model_path  # a directory or a hub id: the engine resolves it on this node
    if policy.backend == "transformers":
        from cluster.hf_engine import HFEngine

        return HFEngine(model_path, dtype=policy.dtype, max_model_len=policy.max_model_len, seed=policy.seed,
                        offline=offline)
    from cluster.vllm_engine import VLLMEngine

    return VLLMEngine(
        model_path,
        dtype=policy.dtype,
        max_model_len=policy.max_model_len,
        gpu_memory_utilization=policy.gpu_memory_utilization,
        enable_prefix_caching=policy.prefix_caching,
        seed=policy.seed,
        enforce_eager=policy.enforce_eager,
        offline=offline,
        tensor_parallel_size=tensor_parallel_size,
        cpu_core_offset=cpu_core_offset,
    )


class EngineActor:
    """A Ray actor holding one engine (backend from ``PolicyConfig.backend``).

    It runs with ``max_concurrency = max_in_flight + 1`` threads: up to `max_in_flight` chunks queue inside
    it (so the engine never idles between chunks) and a health check still answers while they do. Chunks go
    through the engine one at a time (neither backend is thread-safe; each chunk is already a batch).
    """

    def __init__(self, policy: PolicyConfig, engine_name: str, offline: bool = False, log_file: str | None = None,
                 tensor_parallel_size: int = 1, cpu_core_offset: int = 0):
        from cluster.engine_metrics import EngineMetrics

        if log_file:  # quiet terminal: this actor's output (and its vLLM engine core's) goes to the run's log file
            from cluster.logs import redirect_output

            try:
                redirect_output(log_file)
            except OSError as err:  # e.g. a path the engine's node cannot create: keep Ray's own worker log
                log.warning("engine %s: cannot log to %s (%s); output stays in Ray's worker log",
                            engine_name, log_file, err)
        self.engine_name = engine_name
        self.started_at = time.time()
        self.policy_json = policy.model_dump_json()
        if policy.backend == "transformers":
            # As many torch threads as CPUs reserved (at least one). Ray's OMP_NUM_THREADS reaches torch only
            # when the OpenMP runtime starts after Ray sets it: a worker started with libgomp in LD_PRELOAD (a
            # driver that created a vLLM engine passes it on) read the variable at exec and keeps one thread per
            # core, oversubscribing the node and giving other float bits than the same engine elsewhere.
            import torch

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch.set_num_threads(max(1, math.floor(cpus)))
        self.engine = make_engine(policy, offline, tensor_parallel_size, cpu_core_offset)
        self.metrics = EngineMetrics(engine_name)
        self._engine_lock = threading.Lock()
        self._served = 0

    def generate(self, requests: list[GenerationRequest], stage: str = "generate") -> PackedResults:
        """Serve one chunk of requests; results in request order, packed into numpy arrays for the trip
        through Ray (the pool unpacks them). Bad requests raise EngineRequestError."""
        t0 = time.perf_counter()
        self.metrics.batch_started(len(requests))
        packed: PackedResults | None = None
        try:
            with self._engine_lock:
                if hasattr(self.engine, "generate_packed"):  # vLLM: arrays straight from its outputs
                    packed = self.engine.generate_packed(requests, stage)
                else:
                    packed = pack_results(self.engine.generate(requests, stage))
        except EngineRequestError:
            raise
        except Exception as err:
            if type(err).__name__ == "EngineDeadError":
                # vLLM's engine core died: this actor can serve nothing more. Exit so that Ray restarts it
                # (max_restarts) and the pool sends the chunk elsewhere; a RayTaskError would not be retried.
                log.error("engine %s: vLLM engine core died (%s); restarting the actor", self.engine_name, err)
                os._exit(1)
            raise
        finally:
            served = len(packed.request_ids) if packed is not None else 0
            generated = int(packed.generated_tokens.sum()) if packed is not None else 0
            self.metrics.batch_finished(len(requests), served, generated, time.perf_counter() - t0, stage)
        self._served += served
        return packed

    def health(self) -> dict:
        return {
            **self.engine.health(),
            "engine": self.engine_name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "started_at": self.started_at,
            "requests_served": self._served,
            "policy": self.policy_json,
            "torch_threads": _torch_threads(),
        }


def _torch_threads() -> int | None:
    """This process's torch intra-op threads, or None where torch was never imported (it is not imported here)."""
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def engine_name(config_name: str, index: int) -> str:
    return f"{config_name}-engine-{index}"


def engine_placement_group(num_engines: int, cpus_per_engine: float, gpus_per_engine: float, **options: Any):
    """A placement group of one bundle per engine (its CPUs, and its GPUs when it has any); `options` go to Ray's
    ``placement_group`` (strategy, name, lifetime). Policy engines and PRM scorers are placed alike."""
    bundle = {"CPU": cpus_per_engine, **({"GPU": gpus_per_engine} if gpus_per_engine > 0 else {})}
    return placement_group([dict(bundle) for _ in range(num_engines)], **options)


def placed_actor_options(pg, index: int, *, cpus: float, gpus: float, max_restarts: int,
                         max_in_flight: int) -> dict[str, Any]:
    """Ray actor options for engine `index` of an ``EnginePool``: bundle `index` of `pg`, restarted by Ray up to
    `max_restarts` times, its calls never retried by Ray (the pool resends), `max_in_flight` + 1 concurrent calls
    (+1: health checks answer while the pool is full)."""
    return {"max_restarts": max_restarts, "max_task_retries": 0, "max_concurrency": max_in_flight + 1,
            "num_cpus": cpus, "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=index)}


def _placement_group(cfg: FactoryConfig):
    """The engines' placement group (one bundle per engine), reattached by name when it exists."""
    name = f"{cfg.name}-engines"
    try:
        return get_placement_group(name)
    except ValueError:
        pass
    cluster = cfg.cluster
    return engine_placement_group(cluster.num_engines, cluster.cpus_per_engine, cluster.gpus_per_engine,
                                  strategy=cluster.placement_strategy, name=name, lifetime="detached")


def get_or_create_engine(cfg: FactoryConfig, index: int, pg=None, log_file: str | None = None):
    """Handle of the live engine actor `index` of this config, created (and its model loaded) if missing.

    `log_file`: where a new actor sends its output (cluster.logs); None leaves it to Ray's worker logs.
    """
    cluster: ClusterConfig = cfg.cluster
    name = engine_name(cfg.name, index)
    try:
        live = ray.get_actor(name, namespace=cluster.namespace)
    except ValueError:
        live = None
    if live is not None:
        served = ray.get(live.health.remote(), timeout=cluster.request_timeout_s)
        if (served.get("policy"), served.get("tensor_parallel_size", 1)) == (cfg.policy.model_dump_json(),
                                                                            cluster.tensor_parallel_size):
            return live
        # Same config name, another policy (a new model path, dtype, TP, ...): never serve from the stale engine.
        log.warning("engine %s serves another policy; replacing it", name)
        ray.kill(live, no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=cluster.namespace)
            except ValueError:
                break
            time.sleep(0.2)
    pg = pg if pg is not None else _placement_group(cfg)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if cfg.offline:  # the config's offline switch holds on every node, whatever the driver's environment says
        env.update(HUB_OFFLINE_ENV)
    return (
        ray.remote(EngineActor)
        .options(
            name=name,
            namespace=cluster.namespace,
            get_if_exists=True,
            lifetime="detached",
            **placed_actor_options(pg, index, cpus=cluster.cpus_per_engine, gpus=cluster.gpus_per_engine,
                                   max_restarts=cluster.max_restarts, max_in_flight=cluster.max_in_flight),
            runtime_env={"env_vars": env} if env else None,
        )
        # Engines of one node bind their CPU ranks to different cores (index x TP on); on GPU the offset is unused.
        .remote(cfg.policy, name, cfg.offline, log_file, cluster.tensor_parallel_size,
                index * cluster.tensor_parallel_size)
    )


@dataclass
class _Call:
    chunk: int
    engine: int
    deadline: float


class EnginePool:
    """Engine actors behind one `generate`; implements tasks.generation.Engine.

    A batch is cut into chunks (by default one per engine, capped at `max_chunk_requests` requests), at
    most `max_in_flight` chunks outstanding per engine (backpressure). A chunk whose engine dies
    (RayActorError: ActorDiedError, ActorUnavailableError) or passes `request_timeout_s` (counted from
    submission) is sent again, to another live engine when there is one; a late answer from the first
    attempt is dropped. A failed engine gets no work until a health probe answers (Ray is restarting it);
    probes back off from `probe_interval_s`, and an engine silent for `gone_after_s` (default: the
    longer of `request_timeout_s` and 60 s) counts as gone.

    Thread-safe: shard threads of one flow run share a pool. Each `generate` call keeps its own chunks and
    calls; the engines' health state (`failures`, `_down_since`, `_next_probe`, `_probes`) is shared and only
    touched under `_state_lock`, and a probe answer is taken by exactly one of the threads waiting on it.
    `max_in_flight` bounds each call's chunks per engine; the actor's own concurrency limit queues the rest.
    """

    def __init__(
        self,
        actors: list,
        max_in_flight: int = 4,
        request_timeout_s: float = 600.0,
        max_attempts: int = 4,
        max_chunk_requests: int = 64,
        names: list[str] | None = None,
        placement_group=None,
        model_path: str = "",
        probe_interval_s: float = 0.5,
        gone_after_s: float | None = None,
    ):
        if not actors:
            raise ValueError("an EnginePool needs at least one engine actor")
        self.actors = list(actors)
        self.names = names or [f"engine-{i}" for i in range(len(actors))]
        self.max_in_flight = max_in_flight
        self.request_timeout_s = request_timeout_s
        self.max_attempts = max_attempts
        self.max_chunk_requests = max_chunk_requests
        self.placement_group = placement_group
        self.model_path = model_path
        self.probe_interval_s = probe_interval_s
        self.gone_after_s = gone_after_s if gone_after_s is not None else max(request_timeout_s, 60.0)
        self.failures = [0] * len(actors)  # engine failures seen (deaths, timeouts)
        self.resubmitted_chunks = 0
        self._down_since: dict[int, float] = {}  # engine -> when it failed; absent = up
        self._next_probe: dict[int, float] = {}
        self._probes: dict = {}  # ObjectRef -> engine
        self._state_lock = threading.Lock()  # guards the four fields above, shared by the shard threads

    # -- tasks.generation.Engine -----------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest], stage: str = "generate") -> list[GenerationResult]:
        """Serve a batch over the engines; results in request order, each request answered exactly once."""
        return self._serve(requests, lambda actor, chunk: actor.generate.remote(chunk, stage), unpack_results)

    def score(self, trajectories: list[tuple[str, list[str]]]) -> list[Any]:
        """Score (prompt, steps) pairs over PRM scoring actors (cluster/pooling_engine.py ``PoolingActor``): one
        StepScores per pair, in order, with the same chunking, backpressure, health probes and resends."""
        return self._serve(trajectories, lambda actor, chunk: actor.score.remote(chunk), lambda scored: scored)

    def _serve(self, requests: list, submit: Callable[[Any, list], Any], unpack: Callable[[Any], list]) -> list:
        """Cut `requests` into chunks, send each with `submit(actor, chunk)`, resend a chunk whose engine died or
        timed out, and return `unpack(answer)` of every chunk, flattened, in request order."""
        if not requests:
            return []
        size = min(self.max_chunk_requests, math.ceil(len(requests) / len(self.actors)))
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        results: list[list | None] = [None] * len(chunks)
        attempts = [0] * len(chunks)
        last_engine: dict[int, int] = {}
        pending = deque(range(len(chunks)))
        calls: dict = {}  # ObjectRef -> _Call
        load = [0] * len(self.actors)

        while pending or calls:
            while pending:
                engine = self._pick_engine(load, avoid=last_engine.get(pending[0]))
                if engine is None:
                    break
                ci = pending.popleft()
                attempts[ci] += 1
                ref = submit(self.actors[engine], chunks[ci])
                calls[ref] = _Call(ci, engine, time.monotonic() + self.request_timeout_s)
                load[engine] += 1
            with self._state_lock:
                self._send_probes()
                if not calls and not self._probes and self._all_gone():
                    raise EnginePoolError(f"every engine is gone (failures per engine: {self.failures})")
                timers = [c.deadline for c in calls.values()] + [self._next_probe[e] for e in self._down_since]
                probes = list(self._probes)
            wait_s = max(0.0, min(timers, default=time.monotonic() + 1.0) - time.monotonic())
            waiting = list(calls) + probes
            if not waiting:  # every engine is restarting: sleep until the next probe is due
                time.sleep(wait_s)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=wait_s)
            for ref in ready:
                if ref not in calls:  # a health probe (possibly already taken by another thread)
                    self._probe_answered(ref)
                    continue
                call = calls.pop(ref)
                load[call.engine] -= 1
                try:
                    answer = ray.get(ref)
                except EngineRequestError:
                    self._abandon(calls)
                    raise
                except RayActorError as err:
                    self._retry(call, err, attempts, last_engine, pending)
                    continue
                if results[call.chunk] is None:  # the first answer wins; there is never a second here
                    results[call.chunk] = unpack(answer)  # while the engines work on the other chunks
            now = time.monotonic()
            for ref, call in [(r, c) for r, c in calls.items() if c.deadline <= now]:
                calls.pop(ref)
                load[call.engine] -= 1
                ray.cancel(ref)  # best effort; a late answer is dropped with the ref
                timeout = GetTimeoutError(f"no answer in {self.request_timeout_s}s")
                self._retry(call, timeout, attempts, last_engine, pending)
        return [r for chunk in results for r in chunk]  # type: ignore[union-attr]

    def health(self) -> dict:
        """Every engine's health (or its error), as {"engines": [...], "ok": all answered}."""
        refs = [a.health.remote() for a in self.actors]
        engines = []
        for name, ref in zip(self.names, refs, strict=True):
            try:
                engines.append(ray.get(ref, timeout=30))
            except Exception as err:  # noqa: BLE001 - report any failure, do not raise from a health check
                engines.append({"engine": name, "ok": False, "error": f"{type(err).__name__}: {err}"})
        return {"engines": engines, "ok": all(e.get("ok") for e in engines)}

    def wait_ready(self, timeout_s: float | None = None) -> list[dict]:
        """Block until every engine actor answers `health`, i.e. its constructor (model load, vLLM warm-up) is
        done; returns their health records. Creating a Ray actor returns at once; only a method call waits for
        the constructor. Raises GetTimeoutError past `timeout_s` (default: the pool's request timeout)."""
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        return ray.get([actor.health.remote() for actor in self.actors], timeout=timeout)

    def shutdown(self) -> None:
        """Kill the engine actors (no restart) and free their placement group."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
        if self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001
                pass

    # -- internals -----------------------------------------------------------------------------------
    def _pick_engine(self, load: list[int], avoid: int | None) -> int | None:
        with self._state_lock:
            down = set(self._down_since)
            failures = list(self.failures)
        usable = [i for i in range(len(self.actors)) if load[i] < self.max_in_flight and i not in down]
        if avoid is not None and len(usable) > 1:
            usable = [i for i in usable if i != avoid]
        if not usable:
            return None
        return min(usable, key=lambda i: (load[i], failures[i]))

    def _mark_down(self, engine: int) -> None:  # caller holds _state_lock
        now = time.monotonic()
        self._down_since.setdefault(engine, now)
        self._next_probe[engine] = now + self.probe_interval_s

    def _all_gone(self) -> bool:  # caller holds _state_lock
        now = time.monotonic()
        gone = [e for e, since in self._down_since.items() if now - since > self.gone_after_s]
        return len(gone) == len(self.actors)

    def _send_probes(self) -> None:  # caller holds _state_lock
        probing = set(self._probes.values())
        now = time.monotonic()
        for engine, since in list(self._down_since.items()):
            if engine in probing or self._next_probe[engine] > now:
                continue
            if now - since > self.gone_after_s:
                continue  # gone for good: no more probes, no more work
            self._probes[self.actors[engine].health.remote()] = engine

    def _probe_answered(self, ref) -> None:
        with self._state_lock:
            engine = self._probes.pop(ref, None)
        if engine is None:
            return  # another thread waiting on the same probe took its answer
        try:
            ray.get(ref)
        except Exception:  # noqa: BLE001 - still restarting (or gone): probe again later, backing off
            with self._state_lock:
                if engine in self._down_since:
                    waited = time.monotonic() - self._down_since[engine]
                    self._next_probe[engine] = time.monotonic() + min(10.0, max(self.probe_interval_s, waited / 2))
            return
        log.info("engine %s is back", self.names[engine])
        with self._state_lock:
            self._down_since.pop(engine, None)
            self._next_probe.pop(engine, None)

    def _retry(self, call: _Call, err: Exception, attempts: list[int], last_engine: dict, pending: deque) -> None:
        with self._state_lock:
            self.failures[call.engine] += 1
            self._mark_down(call.engine)
            self.resubmitted_chunks += attempts[call.chunk] < self.max_attempts
        if attempts[call.chunk] >= self.max_attempts:
            raise EnginePoolError(f"chunk {call.chunk} failed {attempts[call.chunk]} times; last: {err}") from err
        log.warning("engine %s failed on chunk %d (%s); resubmitting", self.names[call.engine], call.chunk, err)
        last_engine[call.chunk] = call.engine
        pending.appendleft(call.chunk)

    @staticmethod
    def _abandon(calls: dict) -> None:
        for ref in calls:
            ray.cancel(ref)
        calls.clear()


def start_engines(cfg: FactoryConfig, log_file: str | Path | None = None) -> EnginePool:
    """Attach to (or start) this config's engine actors and return the pool serving them.

    Connects to Ray first when needed, by cluster/connect.py's rule.
    `log_file` (the CLI's quiet terminal, cluster.logs): new engine actors write their output there and Ray
    joins without streaming worker output to this process; None streams it here, as Ray does by default.
    """
    cluster = cfg.cluster
    # Preflight before Ray: a missing directory or an unknown hub id fails here, in one line, not in an actor.
    check_model(cfg.policy.model_path, offline=cfg.offline)
    quiet = log_file is not None
    connect(cluster, log_to_driver=not quiet, logging_level=logging.WARNING if quiet else logging.INFO)
    pg = _placement_group(cfg)
    ray.get(pg.ready(), timeout=cluster.request_timeout_s)
    log_to = str(Path(log_file).resolve()) if log_file is not None else None
    actors = [get_or_create_engine(cfg, i, pg, log_to) for i in range(cluster.num_engines)]
    names = [engine_name(cfg.name, i) for i in range(cluster.num_engines)]
    pool = EnginePool(
        actors,
        max_in_flight=cluster.max_in_flight,
        request_timeout_s=cluster.request_timeout_s,
        max_attempts=cluster.max_restarts + 2,
        names=names,
        placement_group=pg,
        model_path=cfg.policy.model_path,
    )
    return pool

