"""The shipped cluster specs parse and have the structure `ray up` and KubeRay need; the local cluster CLI
starts, reports and stops its own Ray without touching any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from configs.schema import REPO_ROOT

RAY_UP = REPO_ROOT / "cluster" / "ray-cluster.yaml"
KUBERAY = REPO_ROOT / "cluster" / "kuberay-raycluster.yaml"


def test_ray_up_spec_has_a_head_and_a_gpu_worker_group():
    spec = yaml.safe_load(RAY_UP.read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type"):
        assert key in spec, key
    types = spec["available_node_types"]
    assert spec["head_node_type"] in types
    gpu_groups = [name for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_groups and spec["head_node_type"] not in gpu_groups
    for name in gpu_groups:
        assert types[name]["max_workers"] >= types[name].get("min_workers", 0) >= 0
        assert "node_config" in types[name]
    setup = " ".join(spec["setup_commands"])
    assert ".[gpu]" in setup, "nodes must install the gpu extra (CUDA vLLM)"
    head_start = " ".join(spec["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "--metrics-export-port" in head_start


def test_kuberay_spec_is_a_raycluster_with_a_gpu_worker_group():
    spec = yaml.safe_load(KUBERAY.read_text())
    assert spec["apiVersion"] == "ray.io/v1"
    assert spec["kind"] == "RayCluster"
    assert spec["metadata"]["name"]
    head = spec["spec"]["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    [gpu] = [g for g in spec["spec"]["workerGroupSpecs"] if g["rayStartParams"].get("num-gpus") == "1"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "metrics-export-port" in gpu["rayStartParams"]


@pytest.mark.parametrize("path", [RAY_UP, KUBERAY], ids=lambda p: p.name)
def test_specs_keep_dashboard_token_auth_on(path):
    text = path.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and "value: disabled" not in text
    assert "RAY_AUTH_MODE" in text and "token" in text


@pytest.mark.slow
def test_local_cluster_up_status_down(tmp_path):
    """Runs the CLI in subprocesses: its own head on free ports, its own state file; `down` stops only it."""
    from cluster.local import _alive
    from tests.conftest import free_port

    env = dict(os.environ, PRM_FACTORY_CLUSTER_STATE=str(tmp_path / "cluster.json"))
    cli = [sys.executable, "-m", "prm_factory.cli", "cluster"]
    ports = [f"--port={free_port()}", f"--dashboard-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=timeout)

    up = run("up", *ports, "--num-cpus=1", "--json")
    assert up.returncode == 0, up.stderr[-2000:]
    state = json.loads(up.stdout)
    try:
        assert state["dashboard_url"].startswith("http://127.0.0.1:")
        status = run("status", "--json")
        assert status.returncode == 0, status.stderr[-2000:]
        info = json.loads(status.stdout)
        assert info["running"] is True and info["resources"]["CPU"] == 1.0
        assert info["dashboard_url"] == state["dashboard_url"] and info["actors"] == []
        assert "token" in info["auth"]
    finally:
        down = run("down", "--json")
    assert json.loads(down.stdout)["stopped"] is True
    assert not _alive(state["pid"])
    assert json.loads(run("status", "--json").stdout)["running"] is False


# ------------------------------------------------- the specs match what tests/e2e/test_multinode.py exercises

SCENARIO = REPO_ROOT / "tests" / "multinode_scenario.py"
REAL_CONFIGS = ["gsm8k-qwen2.5-math.yaml", "math500-qwen2.5-math.yaml"]


def _scenario_constants() -> dict:
    """The scenario's module-level constants, read without importing it (its import sets Ray's auth env)."""
    import ast

    tree = ast.parse(SCENARIO.read_text())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()
            and isinstance(node.value, ast.Constant | ast.Dict)}


def _bundle(cfg) -> dict[str, float]:
    return {"CPU": cfg.cluster.cpus_per_engine, "GPU": cfg.cluster.gpus_per_engine}


def _engines_fitting(resources: dict, bundle: dict) -> int:
    """How many engine bundles a node offering `resources` holds (the scarce resource decides)."""
    return int(min(resources.get(k, 0) // v for k, v in bundle.items() if v > 0))


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_ray_up_layout_is_the_tested_layout(name):
    """As in the multi-node test: the head holds no engine, each worker exactly one, enough workers for one
    engine per node, and the config's placement strategy spreads them."""
    from configs.schema import load_config

    cfg = load_config(REPO_ROOT / "configs" / name, check_paths=False)
    scenario = _scenario_constants()
    test_bundle = {"CPU": 1}  # the scenario's engines: cpus_per_engine 1, no GPU
    assert _engines_fitting({"CPU": scenario["HEAD_NODE_ARGS"]["num_cpus"]}, test_bundle) == 0
    assert _engines_fitting({"CPU": scenario["WORKER_NODE_ARGS"]["num_cpus"]}, test_bundle) == 1
    assert scenario["PLACEMENT_STRATEGY"] in ("SPREAD", "STRICT_SPREAD")

    spec = yaml.safe_load(RAY_UP.read_text())
    types = spec["available_node_types"]
    assert _engines_fitting(types[spec["head_node_type"]]["resources"], _bundle(cfg)) == 0
    [worker] = [t for n, t in types.items() if n != spec["head_node_type"]]
    assert _engines_fitting(worker["resources"], _bundle(cfg)) == 1
    assert worker["max_workers"] >= cfg.cluster.num_engines  # one engine per node fits, even STRICT_SPREAD
    assert cfg.cluster.placement_strategy in ("SPREAD", "STRICT_SPREAD")
    assert cfg.cluster.address == "auto"  # the driver joins the cluster `ray up` started
    assert cfg.offline is False and "HF_HUB_OFFLINE" not in RAY_UP.read_text()  # nodes fetch the model by id


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_kuberay_layout_is_the_tested_layout(name):
    from configs.schema import load_config

    cfg = load_config(REPO_ROOT / "configs" / name, check_paths=False)
    spec = yaml.safe_load(KUBERAY.read_text())["spec"]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert _engines_fitting({"CPU": float(head.get("num-cpus", 8)), "GPU": float(head["num-gpus"])},
                            _bundle(cfg)) == 0
    [group] = spec["workerGroupSpecs"]
    params = group["rayStartParams"]
    worker = {"CPU": float(params["num-cpus"]), "GPU": float(params["num-gpus"])}
    assert _engines_fitting(worker, _bundle(cfg)) == 1
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) >= worker["CPU"] and limits["nvidia.com/gpu"] == params["num-gpus"]
    assert group["maxReplicas"] >= cfg.cluster.num_engines


@pytest.mark.parametrize("path", [RAY_UP, KUBERAY], ids=lambda p: p.name)
def test_specs_use_the_tested_auth_mode(path):
    """The multi-node test runs its head with RAY_AUTH_MODE=token and checks the dashboard answers 401 without
    the token: the specs start every node the same way."""
    assert 'os.environ["RAY_AUTH_MODE"] = "token"' in SCENARIO.read_text()
    text = path.read_text()
    if path == RAY_UP:
        spec = yaml.safe_load(text)
        starts = spec["head_start_ray_commands"] + spec["worker_start_ray_commands"]
        assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    else:
        spec = yaml.safe_load(text)["spec"]
        pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for pod in pods:
            env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
