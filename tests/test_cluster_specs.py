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
    from conftest import free_port

    from cluster.local import _alive

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
