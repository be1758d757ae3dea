"""`prm-factory serve`: a local Prefect server, the deployments of prefect.yaml, a worker and a Ray cluster.

What it starts, in order (each a child process in its own session, stopped on Ctrl-C, and only those):

1. ``prefect server start --host 127.0.0.1 --port <free>`` with ``PREFECT_HOME=runs/prefect``; waits for
   ``/api/health``. A real server, not Prefect's ephemeral API: flow-run subprocesses and Ray workers all
   talk to this one through ``PREFECT_API_URL``.
2. a ``process`` work pool (``prm-factory-local``) and ``prefect --no-prompt deploy --all`` from prefect.yaml.
3. a local Ray head (cluster/local.py: every listener on 127.0.0.1, token auth on, the state file that
   ``prm-factory cluster status`` reads), unless ``RAY_ADDRESS`` names a running cluster or ``cluster up``
   already started one: flow runs attach to it, and the engine actors outlive every flow run.
4. ``prefect worker start --pool prm-factory-local``, whose flow runs inherit ``PREFECT_API_URL``,
   ``RAY_ADDRESS`` and ``PRM_FACTORY_ROOT`` (prefect.yaml's pull step changes into that directory).

``--check`` does 1-2, lists the deployments and stops: a quick test that prefect.yaml deploys.

The UI is served by the API server itself; ``PREFECT_UI_API_URL`` tells the browser where the API is (the
default is port 4200, wrong for any other port). The database is SQLite under PREFECT_HOME unless
``database_url`` names another: PostgreSQL for a real deployment. On SQLite, Prefect 3.7.7 logs "database is
locked" tracebacks while a worker polls, and no server setting tried removed them (benchmarks/README.md).
Logs go to ``PREFECT_HOME/logs``, appended per start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from configs.env import QUIET_ENV
from configs.schema import REPO_ROOT

WORK_POOL = "prm-factory-local"
PREFECT_HOME = REPO_ROOT / "runs" / "prefect"


class ServeError(RuntimeError):
    """A piece of the local stack did not start; the message names it and its log file."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def prefect_env(home: Path, api_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for Prefect children: their own PREFECT_HOME, the server's URL, quiet.

    Hub offline-ness is not set here: it follows each config's `offline` switch.
    """
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home), "PRM_FACTORY_ROOT": str(REPO_ROOT), **extra}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@dataclass
class Child:
    """A process we started (own session, so we can stop its whole group and nothing else)."""

    name: str
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass


def flush_prefect_logs(timeout_s: float = 30.0) -> None:
    """Send this process's queued Prefect logs now, while the server still answers.

    Prefect keeps one API log worker per API URL and drains them all at exit; a worker whose server has
    stopped retries each batch for about a minute, so a process that stops a server it logged to flushes first.
    """
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s, at_exit=False)


def spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> Child:
    """Start `cmd` in its own session; output appended to `log_dir/<name>.log` (rotated past 20 MiB)."""
    from cluster.local import open_log

    log = log_dir / f"{name}.log"
    with open_log(log, name) as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)
    return Child(name, proc, log)


def wait_healthy(api_url: str, child: Child | None = None, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.proc.poll() is not None:
            raise ServeError(f"{child.name} exited with {child.proc.returncode}; see {child.log}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServeError(f"no healthy Prefect API at {api_url} after {timeout_s:.0f}s" +
                     (f"; see {child.log}" if child else ""))


def server_env(home: Path, api_url: str, *, ui: bool = True, database_url: str | None = None,
               extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The Prefect server's environment: the UI pointed at this API URL, and the database."""
    env = prefect_env(home, PREFECT_UI_ENABLED="true" if ui else "false", PREFECT_UI_API_URL=api_url)
    env.pop("PREFECT_API_URL", None)  # the server must not think it is a client of another one
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    env.update(extra_env or {})
    return env


def start_server(home: Path, port: int | None = None, *, ui: bool = True, extra_env: dict[str, str] | None = None,
                 database_url: str | None = None, timeout_s: float = 90.0) -> tuple[Child, str]:
    """A real Prefect server on 127.0.0.1; returns it and its API URL once /api/health answers."""
    port = port or free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = server_env(home, api_url, ui=ui, database_url=database_url, extra_env=extra_env)
    child = spawn("prefect-server", [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                  env, home / "logs")
    try:
        wait_healthy(api_url, child, timeout_s)
    except BaseException:
        child.stop()
        raise
    return child, api_url


def _run(cmd: list[str], env: dict[str, str], what: str, prefect_file: Path | None = None) -> str:
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise ServeError(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def deploy(env: dict[str, str], *, pool: str = WORK_POOL, prefect_file: Path | None = None) -> str:
    """Create (or keep) the process work pool and deploy every deployment of prefect.yaml."""
    check = subprocess.run([_bin("prefect"), "work-pool", "inspect", pool], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True)
    if check.returncode != 0:
        _run([_bin("prefect"), "work-pool", "create", pool, "--type", "process"], env, f"work-pool create {pool}")
    cmd = [_bin("prefect"), "--no-prompt", "deploy", "--all"]
    if prefect_file is not None:
        cmd += ["--prefect-file", str(prefect_file)]
    return _run(cmd, env, "prefect deploy --all")


def start_worker(env: dict[str, str], log_dir: Path, *, pool: str = WORK_POOL, name: str = "prefect-worker") -> Child:
    return spawn(name, [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process"], env, log_dir)


@dataclass
class LocalStack:
    """What `serve` started; `stop()` ends it in reverse order."""

    api_url: str
    ui_url: str
    ray_address: str | None = None
    ray_dashboard: str | None = None
    metrics_url: str | None = None
    children: list[Child] = field(default_factory=list)
    stop_ray: Callable[[], None] | None = None

    def stop(self) -> None:
        flush_prefect_logs()
        for child in reversed(self.children):
            child.stop()
        if self.stop_ray is not None:
            self.stop_ray()


def start_stack(*, home: Path = PREFECT_HOME, port: int | None = None, with_ray: bool = True,
                with_worker: bool = True, prefect_file: Path | None = None, database_url: str | None = None,
                ray_state_file: Path | None = None, echo: Callable[[str], None] = print,
                api_url: str | None = None) -> LocalStack:
    """Server, deployments, Ray and a worker (see the module docstring); stops what it started on failure.

    `api_url`: a Prefect server already running (with `home` as its PREFECT_HOME): no server is started or
    stopped, the rest is deployed onto it (the tests share one server per session).
    """
    home.mkdir(parents=True, exist_ok=True)
    children = []
    if api_url is None:
        server, api_url = start_server(home, port, database_url=database_url)
        children.append(server)
    stack = LocalStack(api_url, api_url.removesuffix("/api"), children=children)
    try:
        echo(f"Prefect server healthy at {stack.ui_url} (PREFECT_HOME={home})")
        env = prefect_env(home, api_url)
        deploy(env, prefect_file=prefect_file)
        echo("deployed every deployment of prefect.yaml to work pool " + WORK_POOL)
        if with_ray:
            from cluster import local

            if os.environ.get("RAY_ADDRESS"):
                stack.ray_address = os.environ["RAY_ADDRESS"]
            else:
                # The state file `prm-factory cluster up|status|down` use: status finds this cluster, and a
                # cluster already started by `cluster up` is joined (and left running) instead of a second one.
                ray_state = local.read_state(ray_state_file)
                if ray_state is not None:
                    echo(f"joining the Ray cluster recorded in {local.state_path(ray_state_file)}")
                else:
                    ray_state = local.up(port=free_port(), dashboard_port=free_port(),
                                         metrics_export_port=free_port(), ray_client_server_port=free_port(),
                                         state_file=ray_state_file, started_by="prm-factory serve")
                    stack.stop_ray = lambda: local.down(state_file=ray_state_file)
                stack.ray_address, stack.ray_dashboard = ray_state["address"], ray_state["dashboard_url"]
                stack.metrics_url = ray_state.get("metrics_url")
                env.update(local.driver_env(ray_state))  # token auth, single-machine mode: drivers need both
            env["RAY_ADDRESS"] = stack.ray_address
            echo(f"Ray at {stack.ray_address}")
        if with_worker:
            stack.children.append(start_worker(env, home / "logs"))
            echo(f"worker polling {WORK_POOL} (log: {home / 'logs' / 'prefect-worker.log'})")
    except BaseException:
        stack.stop()
        raise
    return stack


def list_deployments(api_url: str) -> list[dict]:
    """Every deployment on the server (name, flow id, schedules, concurrency) through the REST API."""
    req = urllib.request.Request(f"{api_url}/deployments/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def urls_text(stack: LocalStack) -> list[str]:
    """The three places a user watches a run: the Prefect UI, the Ray dashboard, the metrics endpoint."""
    return [
        f"Prefect UI:      {stack.ui_url}",
        f"Ray dashboard:   {stack.ray_dashboard or '(the cluster at ' + str(stack.ray_address) + ')'}"
        "   (token login: `ray get-auth-token` prints the token)",
        f"Metrics (Prometheus format): {stack.metrics_url or '(see the cluster you gave)'}"
        "   (scrape config: cluster/monitoring/prometheus.yml)",
    ]


def serve(*, check: bool = False, port: int | None = None, database_url: str | None = None,
          echo: Callable[[str], None] = print) -> int:
    """Run the local stack until Ctrl-C or SIGTERM (or, with `check`, deploy, list the deployments and stop)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # Both end the stack cleanly (a background job may start with SIGINT ignored; SIGTERM comes from kill).
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    stack = start_stack(port=port, with_ray=not check, with_worker=not check, database_url=database_url, echo=echo)
    try:
        deployments = list_deployments(stack.api_url)
        for d in deployments:
            limit = (d.get("global_concurrency_limit") or {}).get("limit")
            strategy = (d.get("concurrency_options") or {}).get("collision_strategy")
            crons = [s["schedule"].get("cron") for s in d.get("schedules", [])]
            echo(f"deployment {d['name']}: cron {crons or '-'}, concurrency limit {limit or '-'} ({strategy or '-'})")
        if check:
            return 0
        for line in urls_text(stack):
            echo(line)
        echo("Ctrl-C stops the worker, the server and the Ray cluster started here.")
        while all(c.proc.poll() is None for c in stack.children):
            time.sleep(1.0)
        dead = [c for c in stack.children if c.proc.poll() is not None]
        echo(f"{dead[0].name} exited ({dead[0].proc.returncode}); see {dead[0].log}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
