"""Commands that run local services: `cluster up/status/down` (a single-node Ray) and serve (the Prefect
stack)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from prm_factory.commands import JsonOpt, _fails, console


def cluster_up(
    port: Annotated[int, typer.Option(help="GCS port")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="dashboard port (bound to 127.0.0.1)")] = 8265,
    metrics_export_port: Annotated[int, typer.Option(help="Prometheus metrics port")] = 8080,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs to offer (default: all)")] = None,
    num_gpus: Annotated[int | None, typer.Option(help="GPUs to offer (default: all)")] = None,
    node_ip: Annotated[str, typer.Option(
        help="interface the Ray listeners bind (127.0.0.1: this machine only; the head's address for multi-node)",
    )] = "127.0.0.1",
    json_out: JsonOpt = False,
) -> None:
    """Start a local Ray head node with the dashboard on 127.0.0.1 and token auth on."""
    from cluster.local import LocalClusterError, up

    with _fails(LocalClusterError, code=1):
        state = up(port=port, dashboard_port=dashboard_port, metrics_export_port=metrics_export_port,
                   num_cpus=num_cpus, num_gpus=num_gpus, node_ip=node_ip)
    if json_out:
        print(json.dumps(state))
        return
    console.print(f"[green]cluster up[/green] at {state['address']}; dashboard {state['dashboard_url']} "
                  f"(token: `ray get-auth-token`); metrics {state['metrics_url']}")


def cluster_status(
    address: Annotated[str | None, typer.Option(help="a cluster address (default: the local one)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Print the dashboard URL, resources and the live prm-factory actors."""
    from cluster.local import status

    info = status(address=address)
    if json_out:
        print(json.dumps(info, default=str))
        return
    if not info.get("running"):
        console.print(f"no cluster running {info.get('error', '')}", markup=False)
        raise typer.Exit(1)
    from cluster.local import format_resource

    console.print(f"[green]running[/green] {info['address']} ({info['nodes']} node(s)"
                  f"{', started by ' + info['started_by'] if info.get('started_by') else ''})", markup=True)
    console.print(f"  dashboard {info['dashboard_url']} (auth: {info['auth']})", markup=False)
    console.print(f"  metrics   {info['metrics_url'] or '-'}", markup=False)
    for key in sorted(info["resources"]):
        if not key.startswith("node:") and "_group_" not in key:
            free, total = info["available"].get(key, 0), info["resources"][key]
            console.print(f"  {key}: {format_resource(key, free)} free of {format_resource(key, total)}",
                          markup=False)
    console.print(f"prm-factory actors: {len(info['actors'])}")
    for actor in info["actors"]:
        health = actor.get("health") or {}
        detail = actor.get("error") or f"{health.get('backend', '?')} {health.get('model_path', '')}"
        console.print(f"  {actor['name']}: {detail}", markup=False)


def cluster_down(json_out: JsonOpt = False) -> None:
    """Stop the local cluster started by `cluster up` (no other Ray on this machine is touched)."""
    from cluster.local import down

    info = down()
    if json_out:
        print(json.dumps(info))
    else:
        console.print("stopped" if info["stopped"] else info["reason"], markup=False)


def serve_cmd(
    check: Annotated[bool, typer.Option("--check", help="start the server, deploy prefect.yaml, list, stop")] = False,
    port: Annotated[int | None, typer.Option("--port", help="Prefect server port (default: a free one)")] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url",
        help="Prefect database (default: SQLite under runs/prefect; e.g. postgresql+asyncpg://user:pw@host/prefect)",
    )] = None,
) -> None:
    """Local Prefect server + deployments + worker + Ray (every listener on 127.0.0.1) until Ctrl-C."""
    from cluster.prefect_stack import ServeError, serve

    with _fails(ServeError, code=1):
        code = serve(check=check, port=port, database_url=database_url,
                     echo=lambda line: console.print(line, markup=False, soft_wrap=True))
    raise typer.Exit(code)
