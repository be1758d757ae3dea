"""Engines in named Ray actors: the pool spreads work, survives an engine dying mid-batch without losing or
duplicating a request, reattaches to live actors, and the metrics reach the node's Prometheus endpoint."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from configs.schema import parse_config
from tasks.generation import EngineRequestError, GenerationRequest

pytestmark = pytest.mark.slow


def make_config(policy_model_path: str, namespace: str, **cluster) -> object:
    return parse_config(
        {
            "name": "actortest",
            "sources": [{"kind": "toy"}],
            "policy": {"model_path": policy_model_path, "backend": "transformers", "max_model_len": 256},
            "cluster": {
                "num_engines": 2,
                "cpus_per_engine": 0.5,
                "max_in_flight": 2,
                "max_restarts": 3,
                "request_timeout_s": 120,
                "namespace": namespace,
                **cluster,
            },
        }
    )


@pytest.fixture(scope="module")
def pool(ray_session, policy_model_path):
    from cluster.actors import start_engines

    cfg = make_config(policy_model_path, ray_session["namespace"])
    engines = start_engines(cfg)
    yield engines
    engines.shutdown()


def prompt_ids(text: str = "2+5=") -> list[int]:
    """Token ids of `text` for the shipped policy (the pool serves generation only; the driver tokenizes)."""
    from transformers import AutoTokenizer

    from configs.paths import SHIPPED_POLICY

    return AutoTokenizer.from_pretrained(str(SHIPPED_POLICY)).encode(text, add_special_tokens=False)


def requests_for(pool, count: int, n: int = 2, max_new_tokens: int = 24) -> list[GenerationRequest]:
    base = prompt_ids()
    return [
        GenerationRequest(base + [base[0]] * (i % 5), n=n, max_new_tokens=max_new_tokens, request_id=f"r{i}")
        for i in range(count)
    ]


def test_pool_serves_a_batch_in_request_order(pool):
    reqs = requests_for(pool, 12)
    pool.max_chunk_requests = 3
    results = pool.generate(reqs, stage="test")
    assert [r.request_id for r in results] == [r.request_id for r in reqs]
    assert all(len(r.samples) == 2 and r.generated_tokens > 0 for r in results)
    served = [e["requests_served"] for e in pool.health()["engines"]]
    assert all(count > 0 for count in served), f"work should spread over both engines: {served}"
    # 0.5 CPU each: one torch thread, whatever OMP_NUM_THREADS or LD_PRELOAD the worker started with
    assert [e["torch_threads"] for e in pool.health()["engines"]] == [1, 1]


def test_named_actors_are_reattached_not_recreated(pool, ray_session, policy_model_path):
    import ray

    from cluster.actors import engine_name, start_engines

    again = start_engines(make_config(policy_model_path, ray_session["namespace"]))
    assert [a._actor_id for a in again.actors] == [a._actor_id for a in pool.actors]
    handle = ray.get_actor(engine_name("actortest", 1), namespace=ray_session["namespace"])
    assert handle._actor_id == pool.actors[1]._actor_id


def test_bad_request_raises_through_the_pool_and_engines_keep_serving(pool):
    with pytest.raises(EngineRequestError):
        pool.generate([GenerationRequest(prompt_token_ids=[], request_id="empty")])
    assert len(pool.generate(requests_for(pool, 2))) == 2


def test_killed_engine_mid_batch_loses_and_duplicates_nothing(pool):
    import ray

    pid_before = ray.get(pool.actors[0].health.remote())["pid"]
    # Big enough to take several seconds even on an idle machine, so the kill lands mid-batch.
    reqs = requests_for(pool, 96, n=2, max_new_tokens=64)
    pool.max_chunk_requests = 2
    resubmitted_before = pool.resubmitted_chunks

    def kill_soon():
        time.sleep(1.0)
        ray.kill(pool.actors[0], no_restart=False)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    results = pool.generate(reqs, stage="test")
    killer.join()
    assert [r.request_id for r in results] == [r.request_id for r in reqs]  # each answered once, in order
    assert all(len(r.samples) == 2 for r in results)
    assert pool.resubmitted_chunks > resubmitted_before

    deadline = time.monotonic() + 120
    while True:  # Ray restarts the actor (max_restarts): a new process under the same name
        try:
            health = ray.get(pool.actors[0].health.remote(), timeout=30)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert health["pid"] != pid_before
    assert len(pool.generate(requests_for(pool, 4))) == 4


def test_calls_past_their_deadline_are_abandoned(pool):
    from cluster.actors import EnginePool, EnginePoolError

    impatient = EnginePool(pool.actors, max_in_flight=1, request_timeout_s=0.01, max_attempts=2)
    with pytest.raises(EnginePoolError, match="failed 2 times"):
        impatient.generate(requests_for(pool, 2, max_new_tokens=200))


def test_metrics_reach_the_prometheus_endpoint(pool, ray_session):
    from cluster.engine_metrics import record_anchors

    pool.generate(requests_for(pool, 4), stage="rollouts")
    record_anchors(5, stage="partition")
    wanted = {
        "ray_prm_factory_tokens_generated_total",
        "ray_prm_factory_requests_total",
        "ray_prm_factory_request_latency_seconds_bucket",
        "ray_prm_factory_requests_in_flight",
        "ray_prm_factory_anchors_found_total",
    }
    found: dict[str, str] = {}
    deadline = time.monotonic() + 90  # metrics are flushed to the agent every few seconds
    while time.monotonic() < deadline:
        body = urllib.request.urlopen(ray_session["metrics_url"], timeout=10).read().decode()
        found = {line.split("{")[0]: line for line in body.splitlines() if line.startswith("ray_prm_factory")}
        if wanted <= found.keys() and 'stage="rollouts"' in body:
            break
        time.sleep(2)
    assert wanted <= found.keys(), sorted(found)
    assert 'engine="actortest-engine-' in found["ray_prm_factory_tokens_generated_total"]
    assert 'stage="partition"' in found["ray_prm_factory_anchors_found_total"]


def test_a_changed_policy_never_reuses_the_old_engine(ray_session, policy_model_path):
    """Engines are found by config name; one that serves another policy is replaced, not reused."""
    import json

    import ray

    from cluster.actors import start_engines

    first_cfg = make_config(policy_model_path, ray_session["namespace"], num_engines=1)
    first_cfg = first_cfg.model_copy(update={"name": "policyswap"})
    first = start_engines(first_cfg)
    changed = first_cfg.model_copy(update={"policy": first_cfg.policy.model_copy(update={"seed": 7})})
    second = start_engines(changed)
    try:
        assert second.actors[0]._actor_id != first.actors[0]._actor_id
        served = ray.get(second.actors[0].health.remote())["policy"]
        assert json.loads(served)["seed"] == 7
        same = start_engines(changed)
        assert same.actors[0]._actor_id == second.actors[0]._actor_id, "an unchanged policy is reattached"
    finally:
        second.shutdown()


def test_threads_sharing_a_pool_survive_an_engine_death_with_the_same_answers(pool):
    """Shard threads share one pool: concurrent calls while an engine dies all get their exact answers.

    Every thread waits on the same health probe of the dead engine; exactly one takes its answer (before the
    pool's state was locked, the second `pop` raised KeyError or a dict changed size mid-iteration).
    """
    import ray

    base = prompt_ids()

    def batch(t: int) -> list[GenerationRequest]:
        return [GenerationRequest(base + [base[0]] * (i % 3), n=2, max_new_tokens=32, seed=1000 * t + i,
                                  request_id=f"t{t}-r{i}") for i in range(12)]

    pool.max_chunk_requests = 2
    want = {t: [[s.token_ids for s in r.samples] for r in pool.generate(batch(t))] for t in range(3)}
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            got[t] = [[s.token_ids for s in r.samples] for r in pool.generate(batch(t))]
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    time.sleep(0.5)
    ray.kill(pool.actors[1], no_restart=False)
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert got == want


def test_engine_uses_the_cpus_it_reserved_even_with_libgomp_preloaded(ray_session, policy_model_path):
    """A worker whose libgomp was preloaded (as after a vLLM engine in the driver) read OMP_NUM_THREADS at exec,
    before Ray set it, and torch would run one thread per core; the engine sets its threads from its CPUs."""
    from pathlib import Path

    import ray
    import torch

    from cluster.actors import EngineActor
    from configs.schema import PolicyConfig

    libgomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not libgomp.exists():
        pytest.skip(f"this torch build has no {libgomp}")
    policy = PolicyConfig(model_path=policy_model_path, backend="transformers", max_model_len=256)
    actor = ray.remote(EngineActor).options(
        num_cpus=0.5, namespace=ray_session["namespace"],
        runtime_env={"env_vars": {"LD_PRELOAD": str(libgomp)}}).remote(policy, "gomp-probe")
    try:
        health = ray.get(actor.health.remote(), timeout=120)
    finally:
        ray.kill(actor)
    assert health["torch_threads"] == 1
