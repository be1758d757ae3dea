"""Prefect 3.7.7 on SQLite: how many "database is locked" errors a local server logs, per server setting.

For each setting a fresh Prefect server (its own PREFECT_HOME and SQLite file in a temp dir) serves the same
load for `--minutes`: prefect.yaml's deployments and a process worker polling their work pool (as under
`prm-factory serve`; every `--worker-query-seconds`, Prefect's default 10), and `--flows` flow-run processes
at once, each running shard-like tasks (4 at a time) that log lines and update a progress artifact, as a
build flow does.
Counted: the server log's failed background jobs ("database is locked" tracebacks), and the time of every
progress update the clients made (the slowest shows lock stalls: Prefect sets SQLite's busy_timeout to 60 s).

    python benchmarks/bench_prefect_sqlite.py [--minutes 3] [--flows 2] [--json benchmarks/results/prefect_sqlite.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster.prefect_stack import WORK_POOL, deploy, prefect_env, start_server, start_worker  # noqa: E402

SERVICES_OFF = {f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false"
                for s in ("CANCELLATION_CLEANUP", "FOREMAN", "LATE_RUNS", "PAUSE_EXPIRATIONS", "TRIGGERS")}
ONE_CONNECTION = {"PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "1",
                  "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "0"}
SETTINGS: dict[str, dict[str, str]] = {
    "prefect defaults": {},
    "services a local run does not need off": SERVICES_OFF,
    "one pooled connection": ONE_CONNECTION,
}

# The load: one flow-run process. Timings of each client call go to stdout as JSON lines.
LOAD = r'''
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from prefect import flow, task, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

DEADLINE = time.time() + float(sys.argv[1])

@task(task_run_name="shard-{i:05d}")
def shard(i: int) -> int:
    log = get_run_logger()
    for j in range(5):
        log.info("shard %d: chunk %d", i, j)
        time.sleep(0.05)
    return i

@flow(name="sqlite-load")
def load() -> int:
    art = create_progress_artifact(0.0, key=None, description="shards done")
    done, i = 0, 0
    while time.time() < DEADLINE:
        futures = [shard.submit(i + k) for k in range(4)]
        for f in futures:
            t0 = time.perf_counter(); f.result(); done += 1
        t0 = time.perf_counter()
        update_progress_artifact(art, progress=min(100.0, done / 10.0))
        print(json.dumps({"call": "update_progress_artifact", "s": time.perf_counter() - t0}), flush=True)
        i += 4
    return done

t0 = time.perf_counter()
n = load()
print(json.dumps({"tasks": n, "flow_s": time.perf_counter() - t0}), flush=True)
'''


def run_setting(name: str, env_extra: dict[str, str], seconds: float, flows: int, query_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="prefect-sqlite-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        server, api_url = start_server(home, ui=False, extra_env=env_extra)
        worker = None
        try:
            wenv = prefect_env(home, api_url, PREFECT_WORKER_QUERY_SECONDS=str(query_s))
            deploy(wenv)  # prefect.yaml's deployments, as `serve` does: the worker's polls mark them ready
            worker = start_worker(wenv, home / "logs", pool=WORK_POOL)
            script = Path(tmp) / "load.py"
            script.write_text(LOAD)
            env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(home),
                   "PREFECT_LOGGING_LEVEL": "WARNING"}
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, str(script), str(seconds)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(flows)]
            outs = [p.communicate(timeout=seconds + 600) for p in procs]
            wall = time.perf_counter() - t0
        finally:
            if worker is not None:
                worker.stop()
            server.stop()
        log = server.log.read_text(errors="replace")
    tasks, calls, failures = 0, [], []
    for (out, err), proc in zip(outs, procs, strict=True):
        if proc.returncode != 0:
            failures.append(err[-500:])
        for line in out.splitlines():
            rec = json.loads(line)
            if "tasks" in rec:
                tasks += rec["tasks"]
            else:
                calls.append(rec["s"])
    calls.sort()
    return {
        "setting": name,
        "env": env_extra,
        "seconds": round(wall, 1),
        "flow_runs": flows,
        "failed_flow_runs": len(failures),
        "task_runs": tasks,
        "worker_query_seconds": query_s,
        "database_is_locked_lines": log.count("database is locked"),
        "failed_background_jobs": sum(1 for line in log.splitlines() if "| ERROR" in line),
        "tracebacks": log.count("Traceback (most recent call last)"),
        "progress_updates": len(calls),
        "progress_update_p50_s": round(calls[len(calls) // 2], 3) if calls else None,
        "progress_update_max_s": round(calls[-1], 3) if calls else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--flows", type=int, default=2)
    ap.add_argument("--worker-query-seconds", type=float, default=10.0)
    ap.add_argument("--only", nargs="*", help="names of SETTINGS to run (default: all)")
    ap.add_argument("--postgres-url", help="also run on this (empty) PostgreSQL database, e.g. "
                    "postgresql+asyncpg://prefect:pw@127.0.0.1:5433/prefect")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    settings = dict(SETTINGS)
    if args.postgres_url:
        settings["PostgreSQL (serve --database-url)"] = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": args.postgres_url}
    for name, env_extra in settings.items():
        if args.only and name not in args.only:
            continue
        res = run_setting(name, env_extra, args.minutes * 60, args.flows, args.worker_query_seconds)
        if args.postgres_url:
            res["env"] = {k: ("<postgres url>" if "CONNECTION_URL" in k else v) for k, v in res["env"].items()}
        print(json.dumps(res), flush=True)
        results.append(res)
    record = {"benchmark": "prefect_sqlite", "prefect": __import__("prefect").__version__,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "minutes": args.minutes, "flows": args.flows,
              "worker_query_seconds": args.worker_query_seconds, "results": results}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
