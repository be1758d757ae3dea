"""Shared fixtures. Expensive things start once per session: Ray (4-7 s) and one vLLM engine (45-90 s)."""

from __future__ import annotations

import socket

import pytest
from engine_fixtures import SHIPPED_POLICY, make_tiny_policy, shipped_policy_ready

from prm_factory import set_offline_env

set_offline_env()  # the engines' processes inherit these


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def policy_model_path(tmp_path_factory) -> str:
    """The shipped tiny policy once it exists, else a random tiny Llama with the same shape."""
    if shipped_policy_ready():
        return str(SHIPPED_POLICY)
    return str(make_tiny_policy(tmp_path_factory.mktemp("tiny-policy")))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with its Prometheus endpoint on a free port."""
    import ray

    metrics_port = free_port()
    ray.init(
        address="local",  # always a fresh instance, never another Ray running on this machine
        num_cpus=2,
        include_dashboard=False,
        namespace="prm-factory-tests",
        _metrics_export_port=metrics_port,
        logging_level="WARNING",
    )
    yield {"metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "namespace": "prm-factory-tests"}
    ray.shutdown()


@pytest.fixture(scope="session")
def vllm_engine(policy_model_path):
    """One vLLM engine for the session (prefix caching on, float32, 256-token context)."""
    from cluster.vllm_engine import VLLMEngine

    engine = VLLMEngine(policy_model_path, dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, seed=0)
    yield engine
    engine.shutdown()


# -- issue 12: integrity and fault-injection tests share one engine and one uninterrupted reference build ------


@pytest.fixture(scope="session")
def integrity_engine():
    """The shipped toy policy on the transformers backend, in this process (128-token context), one torch thread
    per call: the same float bits as the engines in Ray actors and in `OMP_NUM_THREADS=1` subprocesses."""
    from integrity_helpers import OneThreadEngine

    from cluster.hf_engine import HFEngine
    from configs.schema import REPO_ROOT

    return OneThreadEngine(HFEngine(str(REPO_ROOT / "assets" / "toy-policy"), max_model_len=128))


@pytest.fixture(scope="session")
def integrity_reference(tmp_path_factory, integrity_engine):
    """An uninterrupted build of 4 toy problems from JSONL (4 shards): what every resumed build must equal."""
    from integrity_helpers import build_config, problem_counts, rows_digest, toy_questions, write_jsonl

    from configs.schema import parse_config
    from tasks.build import build
    from tasks.dataset import read_dataset, verify_dataset

    tmp = tmp_path_factory.mktemp("integrity-reference")
    source = write_jsonl(tmp / "problems.jsonl", toy_questions(4))
    config = build_config(source)
    cfg = parse_config(config)
    report = build(cfg, tmp / "ds", lambda: integrity_engine)
    assert report.shards_built == 4 and verify_dataset(tmp / "ds") == []
    table = read_dataset(tmp / "ds")
    return {"dir": tmp / "ds", "cfg": cfg, "config": config, "source": source, "digest": rows_digest(table),
            "counts": problem_counts(table), "rows": table.num_rows, "version": report.manifest["dataset_version"]}
