"""A local single-node Ray cluster for the factory: `prm-factory cluster up | status | down`.

``up`` runs ``ray start --head --block`` as a child process in its own session, with the dashboard bound
to 127.0.0.1, token authentication on (Ray 2.60's dashboard API wants the token; ``ray get-auth-token``
prints it) and a Prometheus endpoint on ``--metrics-export-port``. Its pid and addresses go to a state
file, so ``down`` stops exactly that cluster (SIGTERM to the ``ray start`` process, whose handler stops the
processes it started) and never another Ray on the same machine, which a bare ``ray stop`` would.
``prm-factory serve`` starts its Ray through the same function and the same state file, so ``cluster
status`` finds it.

Interfaces: by default the node's IP is 127.0.0.1. ``ray start`` 2.60 replaces a loopback
``--node-ip-address`` by the machine's routable address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
(its single-machine mode, the default on macOS). With both, every listener of the cluster binds 127.0.0.1:
GCS, raylet (node and object manager), dashboard and its metrics port, dashboard agent (HTTP, gRPC,
metrics export), runtime-env agent, autoscaler metrics, Ray client server and the workers' gRPC ports
(tests/e2e/test_monitoring.py lists them with ``ss -ltnp``). Without the switch, the C++ gRPC servers and the
metrics endpoint listen on every interface. A multi-node head names its interface with ``node_ip``
(``--node-ip`` on the command line).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from configs.schema import REPO_ROOT

DEFAULT_STATE_FILE = REPO_ROOT / "runs" / "ray-local" / "cluster.json"
NAMESPACE = "prm-factory"
LOOPBACK = "127.0.0.1"
LOG_ROTATE_BYTES = 20 * 2**20
# Ray's single-machine mode: without it `ray start` turns --node-ip-address=127.0.0.1 into the routable IP.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class LocalClusterError(RuntimeError):
    """The local cluster could not be started, reached or stopped."""


def _ray_bin() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def _auth_env() -> dict[str, str]:
    """The environment for `ray start` and for drivers: token auth on, a token present."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    return env


def driver_env(state: dict | None) -> dict[str, str]:
    """Variables a driver (a flow run, `cluster status`) needs to join the cluster of `state`."""
    env = {"RAY_AUTH_MODE": "token"}
    if state and state.get("node_ip") == LOOPBACK:
        env.update(SINGLE_MACHINE_ENV)  # else the driver announces the routable IP and finds no raylet there
    return env


def open_log(path: Path, what: str):
    """Open `path` for appending, after a header line; a log past LOG_ROTATE_BYTES moves to `<path>.1` first.

    Each start appends, so the log of the run before a restart is still there to read.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > LOG_ROTATE_BYTES:
        path.replace(path.with_name(path.name + ".1"))
    fh = open(path, "a")
    fh.write(f"\n===== {what} started {time.strftime('%Y-%m-%d %H:%M:%S %z')} by pid {os.getpid()} =====\n")
    fh.flush()
    return fh


def read_state(state_file: Path | None = None) -> dict | None:
    """The recorded cluster when its `ray start` process still runs, else None."""
    state = _read_state(state_path(state_file))
    return state if state and _alive(state["pid"]) else None


def state_path(state_file: Path | None = None) -> Path:
    """Where up/status/down keep the cluster's pid and addresses; PRM_FACTORY_CLUSTER_STATE moves it."""
    return Path(state_file or os.environ.get("PRM_FACTORY_CLUSTER_STATE") or DEFAULT_STATE_FILE)


def _read_state(state_file: Path) -> dict | None:
    return json.loads(state_file.read_text()) if state_file.is_file() else None


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped by an init that may never reap) is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def up(
    *,
    port: int = 6379,
    dashboard_port: int = 8265,
    metrics_export_port: int = 8080,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    node_ip: str = LOOPBACK,
    ray_client_server_port: int | None = None,
    state_file: Path | None = None,
    started_by: str = "prm-factory cluster up",
    timeout_s: float = 120.0,
) -> dict:
    """Start the head node; returns the cluster's addresses. Refuses when one started here still runs.

    `node_ip` is the interface every Ray listener that can be told binds to: 127.0.0.1 (one machine) or the
    address other nodes reach this head at (several machines).
    """
    state_file = state_path(state_file)
    state = _read_state(state_file)
    if state and _alive(state["pid"]):
        raise LocalClusterError(f"a local cluster is already up (pid {state['pid']}, {state['address']}); run down")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    log_path = state_file.with_suffix(".log")
    cmd = [
        _ray_bin(), "start", "--head", "--block",
        f"--port={port}",
        f"--node-ip-address={node_ip}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--metrics-export-port={metrics_export_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if ray_client_server_port is not None:
        cmd.append(f"--ray-client-server-port={ray_client_server_port}")
    env = _auth_env()
    if node_ip == LOOPBACK:
        env.update(SINGLE_MACHINE_ENV)
    with open_log(log_path, "ray start") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state = {
        "pid": proc.pid,
        "address": f"{node_ip}:{port}",
        "node_ip": node_ip,
        "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
        "metrics_url": f"http://{node_ip}:{metrics_export_port}/metrics",
        "auth_token_command": "ray get-auth-token",
        "log": str(log_path),
        "started_by": started_by,
        "started_at": time.time(),
    }
    state_file.write_text(json.dumps(state, indent=2))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            state_file.unlink(missing_ok=True)
            raise LocalClusterError(f"ray start exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(state["metrics_url"], timeout=2):
                return state
        except OSError:
            time.sleep(1.0)
    down(state_file=state_file)
    raise LocalClusterError(f"the cluster did not come up in {timeout_s:.0f}s; see {log_path}")


def status(*, state_file: Path | None = None, address: str | None = None, namespace: str = NAMESPACE) -> dict:
    """Dashboard URL, resources and the live prm-factory actors of the local (or given) cluster."""
    state_file = state_path(state_file)
    state = _read_state(state_file) or {}
    if address is None and state and not _alive(state["pid"]):
        return {"running": False, "state_file": str(state_file), "error": f"pid {state['pid']} is gone"}
    address = address or state.get("address")
    if not address:
        return {"running": False, "state_file": str(state_file)}
    # Ray reads its auth mode (and the single-machine switch) when it is imported: set them first.
    _auth_env()
    os.environ.update(driver_env(state))
    import ray

    try:
        ray.init(address=address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - any connection failure means "not reachable"
        return {"running": False, "address": address, "error": f"{type(err).__name__}: {err}"}
    try:
        actors = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] != namespace:
                continue
            info = {"name": entry["name"], "namespace": entry["namespace"]}
            try:
                handle = ray.get_actor(entry["name"], namespace=namespace)
                info["health"] = ray.get(handle.health.remote(), timeout=10) if hasattr(handle, "health") else None
            except Exception as err:  # noqa: BLE001 - report, do not fail the status command
                info["error"] = f"{type(err).__name__}: {err}"
            actors.append(info)
        return {
            "running": True,
            "address": address,
            "dashboard_url": state.get("dashboard_url") or ray.get_runtime_context().dashboard_url,
            "metrics_url": state.get("metrics_url"),
            "auth": "token (print it with `ray get-auth-token`)",
            "started_by": state.get("started_by"),
            "state_file": str(state_file),
            "resources": ray.cluster_resources(),
            "available": ray.available_resources(),
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "actors": actors,
        }
    finally:
        ray.shutdown()


def format_resource(name: str, value: float) -> str:
    """A Ray resource amount for people: bytes (memory, object_store_memory) in GiB/MiB, counts as numbers."""
    if "memory" in name:
        gib = value / 2**30
        return f"{gib:.2f} GiB" if gib >= 1 else f"{value / 2**20:.0f} MiB"
    return f"{value:g}"


def down(*, state_file: Path | None = None, timeout_s: float = 60.0) -> dict:
    """Stop the cluster `up` started (only that one) and forget it."""
    state_file = state_path(state_file)
    state = _read_state(state_file)
    if not state:
        return {"stopped": False, "reason": "no local cluster recorded", "state_file": str(state_file)}
    pid = state["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)  # ray start's handler stops the raylet, GCS, dashboard and workers
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            try:  # reap it when it is our child (same process as `up`); otherwise just poll
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.5)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    state_file.unlink(missing_ok=True)
    _forget_current_cluster(state["address"])
    return {"stopped": True, "pid": pid, "address": state["address"]}


def _forget_current_cluster(address: str) -> None:
    """Remove Ray's "current cluster" pointer when it names ours (as `ray stop` does), so that a later bare
    ``ray.init()`` on this machine starts its own Ray instead of trying to join the stopped one."""
    pointer = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        if pointer.read_text().strip().rsplit(":", 1)[-1] == address.rsplit(":", 1)[-1]:
            pointer.unlink()
    except OSError:
        pass
