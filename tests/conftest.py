"""Shared fixtures. Expensive things start once per session: Ray (4-7 s) and one vLLM engine (45-90 s)."""

from __future__ import annotations

import os
import socket

import pytest

from configs.paths import SHIPPED_POLICY, shipped_policy_ready
from prm_factory import set_offline_env

set_offline_env()  # the engines' processes inherit these

# A vLLM engine created in this process puts torch's libgomp into os.environ["LD_PRELOAD"]; a subprocess started
# afterwards inherits it and computes other float bits than this process. Tests that compare a subprocess's rows
# with rows made here start it with the preload the session began with (`subprocess_env`).
_SESSION_LD_PRELOAD = os.environ.get("LD_PRELOAD")


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ as a subprocess should get it: LD_PRELOAD as the session began, plus `extra`."""
    env = {**os.environ, **extra}
    env.pop("LD_PRELOAD", None)
    if _SESSION_LD_PRELOAD is not None:
        env["LD_PRELOAD"] = _SESSION_LD_PRELOAD
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def policy_model_path() -> str:
    """The shipped tiny policy. Missing weights are a failure, never a silent random stand-in: label-quality
    tests against the toy truth mean nothing on a random model."""
    if not shipped_policy_ready():
        pytest.fail(f"the shipped policy is missing: {SHIPPED_POLICY} needs config.json and model.safetensors "
                    "(restore it from git, or retrain it with scripts/train_policy.py)")
    return str(SHIPPED_POLICY)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray of the session's own for the whole session (cluster/connect.py's `start_own`: a fresh instance, never
    another Ray running on this machine, every listener on 127.0.0.1), its Prometheus endpoint on a free port."""
    import logging

    import ray

    from cluster.connect import start_own

    metrics_port = free_port()
    start_own(namespace="prm-factory-tests", num_cpus=2, include_dashboard=False, metrics_export_port=metrics_port,
              logging_level=logging.WARNING)
    yield {"metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "namespace": "prm-factory-tests"}
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def ray_cpus_come_back():
    """After each test module, its module-scoped pools gone, the session's Ray has every CPU free again.

    A placement group a module leaves behind (a failed test's engines, a training run that kept its workers)
    would make every later placement group wait out its timeout, and the failures would show far from their
    cause. Whatever is left is named in a warning here, at the module that left it, and removed."""
    yield
    import sys
    import time
    import warnings

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + 15  # the resource view lags a released group by up to a second or so
    while ray.available_resources().get("CPU", 0.0) < total - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0.0)
    if free >= total - 1e-6:
        return
    left = {pg_id: info for pg_id, info in placement_group_table().items() if info["state"] != "REMOVED"}
    warnings.warn(f"{total - free:g} of {total:g} Ray CPUs still reserved after this module; placement groups "
                  f"left: {[(info['name'], info['state'], info['bundles']) for info in left.values()]} (removed now)",
                  stacklevel=1)
    for pg_id in left:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


@pytest.fixture(scope="session")
def vllm_engine(policy_model_path, ray_session):
    """One vLLM engine for the session (prefix caching on, float32, 256-token context).

    Ray starts first: creating a vLLM engine in this process sets environment variables (LD_PRELOAD of
    torch's libgomp among them) that a Ray started afterwards would pass to every actor, whose float bits
    then differ from this process's and the fault tests' equality with the reference build fails.
    """
    from cluster.vllm_engine import VLLMEngine

    engine = VLLMEngine(policy_model_path, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def toy_build(vllm_engine, tmp_path_factory):
    """The default build (configs/toy.yaml, 64 problems) written once per session by the session vLLM
    engine in process (~1.5 min of engine time), read back from its Parquet shards; shared by the label
    quality and Monte-Carlo consistency tests."""
    from configs.schema import REPO_ROOT, load_config
    from tasks.build import build
    from tasks.store.dataset import read_dataset

    cfg = load_config(REPO_ROOT / "configs" / "toy.yaml")
    out = tmp_path_factory.mktemp("toy-build") / "dataset"
    report = build(cfg, out, lambda: vllm_engine)
    return {"config": cfg, "dir": out, "report": report, "rows": read_dataset(out).to_pylist()}


# A small toy dataset for the PRM trainer tests (issue 13): 12 problems, newline steps, N=4, transformers backend.
TOY_PRM_DATASET = {
    "name": "prm-tiny",
    "seed": 0,
    "sources": [{"kind": "toy", "num_problems": 12, "seed": 2024, "min_steps": 2, "max_steps": 4}],
    "policy": {"model_path": "assets/toy-policy", "backend": "transformers", "max_model_len": 256},
    "partition": {"method": "newline", "entropy_source": "exact"},
    "tree": {"enabled": False},
    "rollouts": {"n": 4, "max_new_tokens": 64},
    "dataset": {"problems_per_shard": 4},
    "train": {"num_heads": 4, "head_hidden": [32, 32], "epochs": 2, "batch_size": 2, "num_workers": 2,
              "cpus_per_worker": 0.5, "lr": 1e-3, "eval_fraction": 0.25},
}


@pytest.fixture(scope="session")
def toy_prm_dataset(tmp_path_factory) -> dict:
    """Built once per session (~30 s on an idle 2-core CPU): {"dir", "config" (dict), "config_path"}."""
    import yaml

    from cluster.hf_engine import HFEngine
    from configs.schema import REPO_ROOT, parse_config
    from tasks.build import build

    root = tmp_path_factory.mktemp("prm-dataset")
    build(parse_config(TOY_PRM_DATASET), root / "ds", lambda: HFEngine(str(REPO_ROOT / "assets" / "toy-policy")))
    config_path = root / "prm-tiny.yaml"
    config_path.write_text(yaml.safe_dump(TOY_PRM_DATASET))
    return {"dir": root / "ds", "config": TOY_PRM_DATASET, "config_path": config_path}


# -- issue 12: integrity and fault-injection tests share one engine and one uninterrupted reference build ------


@pytest.fixture(scope="session")
def integrity_engine():
    """The shipped toy policy on the transformers backend, in this process (128-token context), one torch thread
    per call: the same float bits as the engines in Ray actors and in `OMP_NUM_THREADS=1` subprocesses."""
    from cluster.hf_engine import HFEngine
    from configs.schema import REPO_ROOT
    from tests.integrity_helpers import OneThreadEngine

    return OneThreadEngine(HFEngine(str(REPO_ROOT / "assets" / "toy-policy"), max_model_len=128))


@pytest.fixture(scope="session")
def integrity_reference(tmp_path_factory, integrity_engine):
    """An uninterrupted build of 4 toy problems from JSONL (4 shards): what every resumed build must equal."""
    from configs.schema import parse_config
    from tasks.build import build
    from tasks.store.dataset import read_dataset, verify_dataset
    from tests.integrity_helpers import build_config, problem_counts, rows_digest, toy_questions, write_jsonl

    tmp = tmp_path_factory.mktemp("integrity-reference")
    source = write_jsonl(tmp / "problems.jsonl", toy_questions(4))
    config = build_config(source)
    cfg = parse_config(config)
    report = build(cfg, tmp / "ds", lambda: integrity_engine)
    assert report.shards_built == 4 and verify_dataset(tmp / "ds") == []
    table = read_dataset(tmp / "ds")
    return {"dir": tmp / "ds", "cfg": cfg, "config": config, "source": source, "digest": rows_digest(table),
            "counts": problem_counts(table), "rows": table.num_rows, "version": report.manifest["dataset_version"]}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (own PREFECT_HOME in tmp, UI on) for every test that runs flows or deployments.

    Modules deploy their own copy of prefect.yaml to it (a later deploy replaces an earlier one's parameters)
    and start their own worker; a module that adds a deployment removes it when done. The scheduler loops
    every 2 s, so a cron deployment's runs are created within a test's patience.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cluster.prefect_stack import flush_prefect_logs, start_server

    home = tmp_path_factory.mktemp("prefect-home")
    server, api_url = start_server(home, ui=True, extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"})
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield {"api_url": api_url, "home": home}
    finally:
        flush_prefect_logs()  # else this session's queued flow logs are retried against a dead server at exit
        server.stop()
