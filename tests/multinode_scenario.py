"""Several Ray nodes on one machine: engines spread over them, a build across them, a node lost mid-build.

Run by tests/e2e/test_multinode.py in its own process (``python tests/multinode_scenario.py OUT_DIR``), because it
needs its own multi-node Ray (``ray.cluster_utils.Cluster``: one raylet per node on this host) and a process
holds one Ray connection: the test session's ``ray_session`` stays untouched. Prints one JSON report.

The layout mirrors cluster/ray-cluster.yaml and cluster/kuberay-raycluster.yaml: a head that offers no engine
resource (there: GPU 0; here: CPU 0) and serves the dashboard with token authentication, and workers that
each fit one engine bundle (there: 1 GPU; here: 1 CPU). Engines are placed with STRICT_SPREAD, one per node.

Steps: build A undisturbed on two engines; build B of the same config into another directory, removing the
node of engine 1 right after the first engine round, while the next round is in flight; then add a node back
and wait for Ray to re-place the lost bundle and restart engine 1 there.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# As the shipped specs: token authentication on the dashboard (set before Ray is imported and starts nodes).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# Its own Ray temp dir: Cluster() writes ray_current_cluster there, which would otherwise point every bare
# ray.init() on this machine at this test cluster. Short, for Ray's unix socket paths (about 107 bytes).
OWN_RAY_TMPDIR = None if "RAY_TMPDIR" in os.environ else tempfile.mkdtemp(prefix="prm-mn-", dir="/tmp")
if OWN_RAY_TMPDIR:
    os.environ["RAY_TMPDIR"] = OWN_RAY_TMPDIR

from prm_factory import set_offline_env  # noqa: E402 - after the auth variables, before Ray

set_offline_env()

NAMESPACE = "prm-factory-multinode"
HEAD_NODE_ARGS = {"num_cpus": 0}  # the head gets no engine (ray-cluster.yaml: GPU 0 on the head)
WORKER_NODE_ARGS = {"num_cpus": 1}  # one engine bundle per worker (ray-cluster.yaml: 1 GPU per worker)
NUM_WORKERS = 2
PLACEMENT_STRATEGY = "STRICT_SPREAD"


def config(model_path: str) -> dict:
    """A tiny build: 4 toy problems in 2 shards, newline steps, no branching, N=2 rollouts (transformers)."""
    return {
        "name": "multinode",
        "offline": True,
        "sources": [{"kind": "toy", "num_problems": 4, "seed": 31, "min_steps": 2, "max_steps": 3}],
        "policy": {"model_path": model_path, "backend": "transformers", "max_model_len": 128},
        "partition": {"method": "newline", "entropy_source": "exact"},
        "tree": {"enabled": False},
        "rollouts": {"n": 2, "max_new_tokens": 40},
        "dataset": {"problems_per_shard": 2},
        "cluster": {
            "num_engines": NUM_WORKERS,
            "cpus_per_engine": 1,
            "placement_strategy": PLACEMENT_STRATEGY,
            "max_restarts": 1,
            "request_timeout_s": 120,
            "max_in_flight": 2,
            "namespace": NAMESPACE,
        },
    }


def rows_hash(dataset_dir: Path) -> tuple[str, int]:
    """sha256 over the dataset's rows, sorted (row order is not part of the contract), and the row count."""
    from tasks.store.dataset import read_dataset

    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in read_dataset(dataset_dir).to_pylist())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest(), len(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def main(out_dir: str, model_path: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util import placement_group_table

    from cluster.actors import start_engines
    from configs.schema import parse_config
    from tasks.build import build

    out = Path(out_dir)
    report: dict = {}
    t0 = time.monotonic()
    dashboard_port = _free_port()
    head_args = {**HEAD_NODE_ARGS, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                 "dashboard_port": dashboard_port}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    workers = [cluster.add_node(**WORKER_NODE_ARGS) for _ in range(NUM_WORKERS)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, logging_level="WARNING")
    report["cluster_up_s"] = round(time.monotonic() - t0, 1)
    report["head_node"] = cluster.head_node.node_id
    report["worker_nodes"] = [w.node_id for w in workers]
    url = f"http://127.0.0.1:{dashboard_port}/api/cluster_status"
    report["dashboard_status"] = {"no_token": _dashboard_status(url, None),
                                  "token": _dashboard_status(url, os.environ["RAY_AUTH_TOKEN"])}
    pool = None
    try:
        cfg = parse_config(config(model_path))
        t1 = time.monotonic()
        pool = start_engines(cfg)
        # Wait for both models to load (health answers once __init__ is done; slow on a busy 2-core host).
        placed = [h["node_id"] for h in ray.get([a.health.remote() for a in pool.actors], timeout=600)]
        report["engines_up_s"] = round(time.monotonic() - t1, 1)
        report["engine_nodes"] = placed

        t1 = time.monotonic()
        build(cfg, out / "undisturbed", lambda: pool)
        report["undisturbed_s"] = round(time.monotonic() - t1, 1)
        report["served_after_undisturbed"] = [e["requests_served"] for e in pool.health()["engines"]]
        report["undisturbed"] = rows_hash(out / "undisturbed")

        # Build B: lose engine 1's node while the second engine round is in flight.
        victim_index = 1
        victim = next(w for w in workers if w.node_id == placed[victim_index])
        removal: dict = {}

        def remove_victim() -> None:
            removal["at_s"] = round(time.monotonic() - t1, 2)
            cluster.remove_node(victim)
            removal["done_s"] = round(time.monotonic() - t1, 2)

        remover = threading.Thread(target=remove_victim)
        stages: list[str] = []

        def on_round(stage: str, n: int) -> None:
            stages.append(stage)
            if len(stages) == 1:
                remover.start()  # the next round is submitted while the node goes down

        t1 = time.monotonic()
        build(cfg, out / "disturbed", lambda: pool, progress=on_round)
        remover.join()
        report["disturbed_s"] = round(time.monotonic() - t1, 1)
        report["removed_node"] = victim.node_id
        report["removal"] = removal
        report["rounds"] = stages
        report["resubmitted_chunks"] = pool.resubmitted_chunks
        report["failures"] = list(pool.failures)
        report["disturbed"] = rows_hash(out / "disturbed")
        report["pg_state_after_loss"] = placement_group_table(pool.placement_group)["state"]
        health = pool.health()["engines"]
        report["engines_ok_after_loss"] = [bool(e.get("ok")) for e in health]

        # Capacity comes back: Ray re-places the lost bundle on the new node and restarts engine 1 there.
        t1 = time.monotonic()
        fresh = cluster.add_node(**WORKER_NODE_ARGS)
        report["added_node"] = fresh.node_id
        deadline = time.monotonic() + 240
        back = None
        while time.monotonic() < deadline:
            try:
                back = ray.get(pool.actors[victim_index].health.remote(), timeout=10)
                break
            except Exception:  # noqa: BLE001 - still being re-placed and restarted
                time.sleep(1.0)
        report["rescheduled_s"] = round(time.monotonic() - t1, 1)
        report["pg_state_after_add"] = placement_group_table(pool.placement_group)["state"]
        report["victim_engine_node_after_add"] = back and back["node_id"]
    finally:
        if pool is not None:
            pool.shutdown()
        ray.shutdown()
        cluster.shutdown()
    report["total_s"] = round(time.monotonic() - t0, 1)
    return report


if __name__ == "__main__":
    try:
        result = main(sys.argv[1], sys.argv[2])
    finally:
        if OWN_RAY_TMPDIR:
            shutil.rmtree(OWN_RAY_TMPDIR, ignore_errors=True)
    print(json.dumps(result))
