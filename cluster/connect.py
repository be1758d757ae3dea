"""How every driver reaches Ray, decided in one place: the build, the flows, the active loop, `train` and `score`.

``connect(cluster)`` follows one rule and says which branch it took, in one line on stderr:

1. ``cluster.address`` (or, when the config leaves it out, ``RAY_ADDRESS``) names a cluster: ``host:port``,
   ``ray://host:port`` or ``auto`` (the instance Ray's own discovery finds on this machine). The address is
   probed for ``cluster.connect_timeout_s`` first; no answer is one ``ClusterConnectError`` naming the
   address and what to do, never Ray's endless retry. ``local`` asks for a fresh instance of the run's own.
2. No address, and this checkout's ``prm-factory cluster up`` instance is alive (its state file names a pid
   that runs): join it.
3. Otherwise start an instance of the run's own: its own temp dir (``OWN_TEMP_DIR``, never Ray's default
   ``/tmp/ray``, where other projects' instances announce themselves), every listener on 127.0.0.1, token
   authentication (Ray 2.60's default), stopped when the run's process ends.

Never any other instance found on the machine: Ray's ``ray.init(address=None)`` joins whatever
``/tmp/ray/ray_current_cluster`` names, and hangs when that instance is dead.

Loopback: Ray's ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode) keeps a 127.0.0.1 node IP
(without it Ray swaps in the routable address) and ``_node_ip_address=127.0.0.1`` then binds the GCS, raylet,
object manager, dashboard and its agents, runtime-env agent, metrics export and the workers' gRPC servers to
loopback (tests/cluster/test_connect.py lists them with ``ss``). Ray reads the switch when it is imported, so
it is set both in the environment (for the processes Ray starts) and on the imported constant (this process).

A cluster that dies under a running driver: Ray's driver waits ``gcs_rpc_server_reconnect_timeout_s`` (60 s by
default) for its GCS, then ends the process. A joined cluster gets ``connect_timeout_s`` there too, unless the
environment already sets ``RAY_gcs_rpc_server_reconnect_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

from cluster import local
from configs.schema import ClusterConfig

log = logging.getLogger(__name__)

# Short on purpose: Ray's unix sockets live under it and their paths are limited to about 107 bytes.
OWN_TEMP_DIR = Path(os.environ.get("PRM_FACTORY_RAY_TMPDIR") or f"/tmp/prmf-ray-{os.getuid()}")
RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"


class ClusterConnectError(RuntimeError):
    """The Ray cluster the run was told to use does not answer (or cannot be found)."""


def connect(cluster: ClusterConfig, *, log_to_driver: bool = True, logging_level: int = logging.INFO,
            num_cpus: int | None = None, metrics_export_port: int | None = None,
            include_dashboard: bool | None = None) -> str:
    """Connect this process to Ray by the module's rule; returns (and prints) the line saying what it joined.

    A no-op, returning "already connected", when this process is connected already (a flow that started the
    engines before training, a test session's Ray). `num_cpus`, `metrics_export_port` and `include_dashboard`
    apply to an instance of the run's own only.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cluster.address or os.environ.get("RAY_ADDRESS") or None
    source = "cluster.address" if cluster.address else "RAY_ADDRESS"
    if address == "local":
        address = None
    elif address is None:
        state = local.read_state()
        if state is not None:
            address, source = state["address"], f"this checkout's `prm-factory cluster up` ({local.state_path()})"
            os.environ.update(local.driver_env(state))
    if address is None:
        line = start_own(namespace=cluster.namespace, log_to_driver=log_to_driver, logging_level=logging_level,
                         num_cpus=num_cpus, metrics_export_port=metrics_export_port,
                         include_dashboard=include_dashboard)
    else:
        gcs = probe(address, cluster.connect_timeout_s, source)
        if gcs.rpartition(":")[0] in ("127.0.0.1", "localhost"):
            single_machine_mode()  # else Ray swaps the loopback address for the routable one and finds nothing there
        os.environ.setdefault(RECONNECT_ENV, str(max(1, round(cluster.connect_timeout_s))))
        ray.init(address=address if address.startswith("ray://") else gcs, namespace=cluster.namespace,
                 log_to_driver=log_to_driver, logging_level=logging_level)
        line = f"Ray: joined {gcs} ({source})"
    print(line, file=sys.stderr, flush=True)
    return line


def start_own(*, namespace: str, log_to_driver: bool = True, logging_level: int = logging.INFO,
              num_cpus: int | None = None, metrics_export_port: int | None = None,
              include_dashboard: bool | None = None) -> str:
    """Start a Ray instance of this process's own, every listener on 127.0.0.1; returns the line saying so."""
    import ray

    single_machine_mode()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    OWN_TEMP_DIR.mkdir(parents=True, exist_ok=True)
    # RAY_ADDRESS (say, left by a job) would otherwise win over "local" inside ray.init.
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        ctx = ray.init(address="local", _node_ip_address=local.LOOPBACK, _temp_dir=str(OWN_TEMP_DIR),
                       dashboard_host=local.LOOPBACK, include_dashboard=include_dashboard, num_cpus=num_cpus,
                       _metrics_export_port=metrics_export_port, namespace=namespace,
                       log_to_driver=log_to_driver, logging_level=logging_level)
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    dashboard = f", dashboard http://{ctx.dashboard_url}" if ctx.dashboard_url else ""
    return (f"Ray: started this run's own instance on {local.LOOPBACK} ({ray.get_runtime_context().gcs_address}, "
            f"temp dir {OWN_TEMP_DIR}{dashboard}); it stops with the run")


def single_machine_mode() -> None:
    """Ray's single-machine mode, so that a 127.0.0.1 node address stays loopback (see the module's docstring)."""
    from ray._private import ray_constants

    os.environ.update(local.SINGLE_MACHINE_ENV)  # for the processes Ray starts from here
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this process, whose Ray read the switch when imported


def probe(address: str, timeout_s: float, source: str = "cluster.address") -> str:
    """The GCS ``host:port`` behind `address`, once it accepts a TCP connection; ``ClusterConnectError`` when it
    cannot be found or does not answer within `timeout_s`."""
    from ray._private.services import get_ray_address_from_environment

    advice = ("start one with `prm-factory cluster up`, or remove the address (config and RAY_ADDRESS) to let "
              "the run start its own")
    gcs = address.removeprefix("ray://")
    if address == "auto":
        try:  # RAY_ADDRESS, else the instance Ray last started on this machine (its ray_current_cluster file)
            gcs = get_ray_address_from_environment("auto", None)
        except Exception as err:  # noqa: BLE001 - Ray's discovery found nothing to join: one line
            raise ClusterConnectError(f"no Ray cluster found for {source} {address!r} ({err}); {advice}") from None
    host, _, port = (gcs or "").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterConnectError(f"{source} {address!r} is not host:port, ray://host:port, auto or local")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
                return gcs
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ClusterConnectError(
                    f"no Ray answers at {gcs} ({source} {address!r}) after {timeout_s:g}s: {err.strerror or err}; "
                    f"{advice}") from None
            time.sleep(0.5)
