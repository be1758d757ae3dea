"""The Prefect deployments end to end, against a real Prefect server, a real process worker and the session Ray.

The session's Prefect server (tests/conftest.py) and one worker serve the whole module. prefect.yaml is deployed
as shipped, from a copy whose parameters point at a tiny toy config (8 problems, 2 per shard, N=2, 16 new
tokens, transformers backend): flow runs are real subprocesses of the worker that attach to the test
session's Ray by address, exactly as under `prm-factory serve`.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from configs.schema import REPO_ROOT

pytestmark = pytest.mark.slow

BUILD = "build-dataset/build-dataset"
REFRESH = "refresh-dataset/refresh"
CONFIG_NAME = "flows-tiny"


def tiny_config(path: Path, model_path: str, num_problems: int) -> str:
    path.write_text(yaml.safe_dump({
        "name": CONFIG_NAME,
        "sources": [{"kind": "toy", "num_problems": num_problems, "seed": 7, "min_steps": 2, "max_steps": 3}],
        "policy": {"model_path": model_path, "backend": "transformers", "max_model_len": 128},
        "cluster": {"num_engines": 1, "cpus_per_engine": 1, "request_timeout_s": 120},
        "partition": {"method": "edu", "tau": 1.0, "min_step_tokens": 3, "max_anchors": 3},
        "tree": {"branch_width": 2, "max_depth": 1, "max_leaves": 3},
        "rollouts": {"n": 2, "max_new_tokens": 16},
        "dataset": {"out_dir": str(path.parent / "dataset"), "problems_per_shard": 2},
    }))
    return str(path)


@pytest.fixture(scope="module")
def stack(prefect_server, tmp_path_factory, ray_session, policy_model_path):
    """The session's Prefect server, deployments from (a copy of) prefect.yaml, a process worker on the session Ray."""
    import ray

    from cluster.prefect_stack import deploy, prefect_env, start_worker

    tmp = tmp_path_factory.mktemp("flows")
    home, api_url = prefect_server["home"], prefect_server["api_url"]
    configs = {n: tiny_config(tmp / f"tiny-{n}.yaml", policy_model_path, n) for n in (8, 11)}
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        d["parameters"]["config_path"] = configs[8]
    # A copy of the refresh deployment on an every-minute cron, into its own root: the scheduler and the
    # worker must run it with nobody asking (the shipped schedule is every 6 hours, too slow for a test).
    minutely = {**next(d for d in spec["deployments"] if d["name"] == "refresh"), "name": "refresh-minutely"}
    minutely["schedules"] = [{"cron": "* * * * *", "timezone": "UTC"}]
    minutely["parameters"] = {"config_path": configs[8], "root": str(tmp / "minutely-root")}
    spec["deployments"].append(minutely)
    prefect_file = tmp / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    t0 = time.monotonic()
    env = prefect_env(home, api_url, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
                      PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="2")
    worker = None
    try:
        deploy(env, prefect_file=prefect_file)
        worker = start_worker(env, home / "logs", name="prefect-worker-flows")
        yield {"api_url": api_url, "tmp": tmp, "configs": configs, "worker": worker, "home": home,
               "startup_s": time.monotonic() - t0}
    finally:
        if worker is not None:
            worker.stop()
        with client() as c:  # the server outlives this module: its every-minute runs must stop with it
            c.delete_deployment(c.read_deployment_by_name(f"refresh-dataset/{minutely['name']}").id)


def run(name: str, timeout: float = 150, **parameters):
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters, timeout=timeout, poll_interval=1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_deployments_have_cron_schedule_and_cancel_new_limit(stack):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with client() as c:
        refresh = c.read_deployment_by_name(REFRESH)
        assert [s.schedule.cron for s in refresh.schedules] == ["0 */6 * * *"]
        assert refresh.global_concurrency_limit.limit == 1
        assert refresh.concurrency_options.collision_strategy.value == "CANCEL_NEW"
        assert c.read_deployment_by_name(BUILD).schedules == []

        def scheduled():
            return c.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[refresh.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))))

        runs = wait_for(scheduled, 30, "the scheduler to create the cron runs", interval=1)
    assert all(r.expected_start_time.hour % 6 == 0 and r.expected_start_time.minute == 0 for r in runs)


def test_cron_scheduled_refresh_runs_by_itself(stack):
    """Nobody triggers it: the scheduler creates the run, the worker picks it up, a version appears."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with client() as c:
        minutely = c.read_deployment_by_name("refresh-dataset/refresh-minutely")

        def completed():
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[minutely.id])))
            return [r for r in runs if r.state is not None and r.state.is_completed()]

        runs = wait_for(completed, 200, "a cron-scheduled refresh to complete", interval=2)
    assert runs[0].auto_scheduled, "the run came from the schedule, not from a trigger"
    root = stack["tmp"] / "minutely-root"
    assert (root / "LATEST").is_file()
    version = (root / "LATEST").read_text().strip()
    assert (root / "versions" / version / "manifest.json").is_file()


def _planned_ids(config_path: str) -> list[str]:
    from configs.schema import load_config
    from tasks.build import ingest

    return [p.problem_id for p in ingest(load_config(config_path)).problems]


# The flow-run command of the run that gets killed: `python -m prefect.engine`, in a process that stops itself
# (SIGSTOP) right after shard 0's completion record. Shard 1 cannot start before the kill, however late it
# lands: killing at the sight of the record raced the three other tiny shards (a few hundred ms with warm
# engines) and failed whenever the test process was not scheduled in time on a loaded machine.
STOP_AFTER_SHARD_0 = """\
import os
import runpy
import signal

import tasks.store.dataset as dataset

_write_completion = dataset.write_completion


def write_completion(dataset_dir, shard_index, info, key):
    record = _write_completion(dataset_dir, shard_index, info, key)
    if shard_index == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
    return record


dataset.write_completion = write_completion
runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
"""


def test_build_via_deployment_resumes_after_its_flow_run_is_killed(stack):
    """Kill the worker's flow-run process after the first shard; a second run finishes without redoing it."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.deployments import run_deployment

    from tasks.store.dataset import completion_path, read_dataset, read_manifest, verify_dataset

    out = stack["tmp"] / "build"
    hook = stack["tmp"] / "stop_after_shard_0.py"
    hook.write_text(STOP_AFTER_SHARD_0)
    killed = run_deployment(BUILD, parameters={"out_dir": str(out)}, timeout=0,
                            job_variables={"command": f"{sys.executable} {hook}"})
    with client() as c:
        # The process stops itself once shard 0's record is written (the record follows the file): the kill
        # lands mid-build, after exactly one shard, whenever it comes.
        pid = int(wait_for(lambda: c.read_flow_run(killed.id).infrastructure_pid, 150, "the flow-run pid"))
        wait_for(completion_path(out, 0).exists, 150, "the first shard")
        os.kill(pid, signal.SIGKILL)
        assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
        crashed = wait_for(lambda: (s := c.read_flow_run(killed.id).state).is_final() and s, 60, "the crash")
    assert crashed.is_crashed(), crashed
    written = sorted(p.name for p in (out / "shards").glob("part-*.parquet")
                     if completion_path(out, int(p.name[5:10])).exists())
    assert written == ["part-00000.parquet"]
    before = {name: (sha256(out / "shards" / name), (out / "shards" / name).stat().st_mtime_ns) for name in written}

    flow_run = run(BUILD, out_dir=str(out))
    assert flow_run.state.is_completed(), flow_run.state
    for name, (digest, mtime) in before.items():  # shards done before the kill were not rewritten
        assert (sha256(out / "shards" / name), (out / "shards" / name).stat().st_mtime_ns) == (digest, mtime)
    manifest = read_manifest(out)
    assert manifest["num_shards"] == 4 and manifest["num_rows"] > 0
    assert verify_dataset(out) == []
    shard_of: dict[str, set[int]] = {}
    for row in read_dataset(out).select(["problem_id", "shard"]).to_pylist():
        shard_of.setdefault(row["problem_id"], set()).add(row["shard"])
    assert all(len(s) == 1 for s in shard_of.values())  # no problem's rows in two shards
    assert sorted(shard_of) == sorted(_planned_ids(stack["configs"][8]))
    stack["build_version"] = manifest["dataset_version"]

    assert {p.name for p in (out / "reports").iterdir()} >= {"entropy.png", "labels.png", "cost.png", "report.md"}
    with client() as c:
        artifacts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[
            f"{CONFIG_NAME}-dataset"])))
    md = [a for a in artifacts if a.flow_run_id == flow_run.id and a.type == "markdown"]
    assert md, [a.key for a in artifacts]
    assert "Tokens per labelled step" in md[0].data and "data:image/png;base64," in md[0].data
    assert f"| rows / shards | {manifest['num_rows']} / 4 |" in md[0].data
    # This run labelled only what the killed one had not written (the rest: cached or skipped).
    by_status = next(line for line in md[0].data.splitlines() if line.startswith("| shards by status |"))
    assert f"built: {4 - len(written)}," in by_status or by_status.endswith(f"built: {4 - len(written)} |")


def test_refresh_reuses_shards_and_noop_does_no_engine_work(stack, ray_session):
    import ray
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.store.dataset import read_manifest, shard_path
    from tasks.store.versions import read_latest, read_refresh_log, version_dir

    root = stack["tmp"] / "root"
    first = run(REFRESH, root=str(root))
    assert first.state.is_completed(), first.state
    v1 = read_latest(root)
    assert read_manifest(version_dir(root, v1))["parents"] == []
    if "build_version" in stack:  # same config and seeds: the same rows as the (killed and resumed) build
        assert read_manifest(version_dir(root, v1))["dataset_version"] == stack["build_version"]

    # More problems, same seed: the first 8 are the same, so shards 0-3 are reused and 4-5 labelled.
    # Two runs at once: the deployment's concurrency limit (1, CANCEL_NEW) cancels one of them.
    from prefect.deployments import run_deployment

    runs = [run_deployment(REFRESH, parameters={"config_path": stack["configs"][11], "root": str(root)}, timeout=0)
            for _ in range(2)]
    with client() as c:
        final = [wait_for(lambda r=r: (s := c.read_flow_run(r.id).state).is_final() and s, 150, "refresh runs")
                 for r in runs]
    assert sorted(s.type.value for s in final) == ["CANCELLED", "COMPLETED"], final
    v2 = read_latest(root)
    assert v2 != v1
    manifest = read_manifest(version_dir(root, v2))
    assert manifest["parents"] == [v1] and manifest["num_shards"] == 6
    lineage = manifest["extra"]["lineage"]
    assert [r["index"] for r in lineage["reused_shards"]] == [0, 1, 2, 3]
    assert sorted(lineage["labelled_shards"]) == [4, 5]
    for i in range(4):  # hard links: the same file, not a copy
        assert shard_path(version_dir(root, v2), i).stat().st_ino == shard_path(version_dir(root, v1), i).stat().st_ino

    # Nothing changed since v2: no engine work. Kill the engine first; an up-to-date refresh must not start it.
    from cluster.actors import engine_name

    ray.kill(ray.get_actor(engine_name(CONFIG_NAME, 0), namespace="prm-factory"), no_restart=True)
    noop = run(REFRESH, config_path=stack["configs"][11], root=str(root))
    assert noop.state.is_completed(), noop.state
    assert read_latest(root) == v2
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted([v1, v2])
    assert read_refresh_log(root)[-1]["status"] == "up_to_date"
    with client() as c:  # no shard task ran at all (task runs are recorded from events: wait for them)
        def task_names():
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[noop.id])))
            names = [t.name for t in runs]
            return names if any(n.startswith("publish-report") for n in names) else None

        names = wait_for(task_names, 30, "the no-op refresh's task runs", interval=0.5)
    assert not any(n.startswith("shard-") for n in names), names
    with pytest.raises(ValueError):
        ray.get_actor(engine_name(CONFIG_NAME, 0), namespace="prm-factory")


def test_two_engines_give_the_same_dataset_as_one(stack, ray_session, policy_model_path):
    """Issue 12: with num_engines = 2, two shard threads share one engine pool and run at once; the dataset must
    equal the num_engines = 1 dataset row for row, and so must the cost (anchors, capped partitions, tokens),
    which counts what each shard's own partitioner saw. The flow runs in this process, on the test server."""
    from flows import steps
    from flows.build_dataset import build_dataset
    from tasks.store.dataset import read_dataset, read_manifest, verify_dataset
    from tests.integrity_helpers import rows_digest

    digests, costs = {}, {}
    try:
        for n in (1, 2):
            path = Path(tiny_config(stack["tmp"] / f"engines-{n}.yaml", policy_model_path, 8))
            data = yaml.safe_load(path.read_text())
            data["name"] = f"flows-engines-{n}"
            data["cluster"] = {**data["cluster"], "num_engines": n, "cpus_per_engine": 0.25,
                               "namespace": ray_session["namespace"]}
            data["partition"] = {**data["partition"], "tau": 0.0, "max_anchors": 1}  # every solution capped
            data["dataset"] = {**data["dataset"], "problems_per_shard": 1}  # 8 shards, n at once
            path.write_text(yaml.safe_dump(data))
            out = stack["tmp"] / f"engines-{n}-ds"
            summary = build_dataset(str(path), str(out))
            assert summary["shards_by_status"] == {"built": 8}, summary
            assert verify_dataset(out) == []
            digests[n] = rows_digest(read_dataset(out))
            costs[n] = read_manifest(out)["extra"]["cost"]
    finally:
        for key, (pool, _) in list(steps._engines.items()):
            if pool.names[0].startswith("flows-engines-"):
                steps._engines.pop(key)
                pool.shutdown()
    assert digests[1] == digests[2]
    assert costs[1] == costs[2] and costs[2]["capped_partitions"] > 0, costs
