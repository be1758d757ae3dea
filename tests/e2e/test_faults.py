"""Fault injection (issue 12): after each fault the resumed dataset equals an uninterrupted build.

Every test compares against the session's reference build (tests/conftest.py: 4 toy problems from JSONL,
one per shard, newline steps, N = 1) by a content hash over the sorted rows, checks that no problem was lost
or duplicated, and that `verify` passes. Faults: an engine actor killed mid-build, the build process
SIGKILLed mid-shard, the output directory read-only and then writable again, the Prefect server restarted
during a flow run. (A corrupted byte and a source changed between crash and resume: tests/e2e/test_integrity.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from configs.schema import REPO_ROOT, parse_config
from tasks.build import build
from tasks.io import completion_path, lock_path, shard_path
from tasks.store.dataset import read_dataset, verify_dataset
from tests.integrity_helpers import cli_on_faulty_disk, problem_counts, rows_digest

pytestmark = pytest.mark.slow


def assert_same_as_reference(out: Path, reference: dict) -> None:
    table = read_dataset(out)
    assert verify_dataset(out) == []
    assert problem_counts(table) == reference["counts"], "0 rows lost, 0 duplicated"
    assert rows_digest(table) == reference["digest"]
    leftovers = [p.name for d in ("shards", "completions") for p in (out / d).iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def interrupted_copy(reference: dict, dest: Path, keep: int) -> Path:
    """The reference build as a crash after `keep` shards leaves it: later shards, records and manifest gone."""
    shutil.copytree(reference["dir"], dest)
    (dest / "manifest.json").unlink()
    for i in range(keep, 4):
        shard_path(dest, i).unlink()
        completion_path(dest, i).unlink()
    return dest


def test_engine_actor_killed_mid_build(tmp_path, ray_session, integrity_reference):
    """kill -9 the engine actor while shards are being labelled: the pool resubmits, nothing lost or doubled."""
    import ray

    from cluster.actors import start_engines

    data = {**integrity_reference["config"], "name": "fault-actor",
            "cluster": {"num_engines": 1, "cpus_per_engine": 0.25, "max_restarts": 2, "request_timeout_s": 120,
                        "namespace": ray_session["namespace"]}}
    cfg = parse_config(data)
    out = tmp_path / "ds"
    pools = []
    killed = threading.Event()

    def kill_after_first_shard() -> None:
        deadline = time.monotonic() + 300
        while not shard_path(out, 0).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = ray.get(pools[0].actors[0].health.remote())["pid"]
        os.kill(pid, signal.SIGKILL)
        killed.set()

    def factory():
        pools.append(start_engines(cfg))
        threading.Thread(target=kill_after_first_shard, daemon=True).start()
        return pools[0]

    try:
        report = build(cfg, out, factory)
        assert killed.is_set() and sum(pools[0].failures) >= 1, "the kill landed while shards were being labelled"
    finally:
        for pool in pools:
            pool.shutdown()
    assert report.shards_built == 4
    assert_same_as_reference(out, integrity_reference)


def test_build_process_sigkilled_mid_shard_resumes(tmp_path, integrity_engine, integrity_reference, caplog):
    """SIGKILL `prm-factory build` after its first shard: the resumed build keeps it and equals the reference.

    While the first build runs, a second one into the same OUT refuses, naming it (one writer per dataset);
    after the SIGKILL the resumed build takes its lock over, saying so."""
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(integrity_reference["config"]))
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "prm_factory.cli", "build", "--config", str(config), "--out", str(out), "--local"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--json"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 120
    while str(proc.pid) not in (lock_path(out).read_text() if lock_path(out).exists() else "") and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.poll() is None, "the first build still runs while the second is refused"
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"is being written by pid {proc.pid}" in second.stdout + second.stderr
    deadline = time.monotonic() + 300
    while not completion_path(out, 0).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "completions").glob("part-*.json"))
    assert 1 <= len(done) < 4 and not (out / "manifest.json").exists(), "killed mid-build"
    kept = {n: completion_path(out, int(n[5:10])).read_text() for n in done}

    with caplog.at_level("WARNING", logger="tasks.io"):
        report = build(parse_config(integrity_reference["config"]), out, lambda: integrity_engine)
    assert f"took over the lock of pid {proc.pid}" in caplog.text
    assert lock_path(out).read_text() == "", "released when the build ended"
    assert report.shards_skipped == len(done) and report.rebuilt == {}
    assert {n: completion_path(out, int(n[5:10])).read_text() for n in done} == kept, "finished shards kept"
    assert_same_as_reference(out, integrity_reference)
    assert report.manifest["dataset_version"] == integrity_reference["version"], "byte-identical shards"


def test_output_read_only_then_writable(tmp_path, integrity_engine, integrity_reference):
    """The output directory turns read-only mid-build: one line, exit 3, nothing lost; writable again: resumes."""
    out = interrupted_copy(integrity_reference, tmp_path / "ds", keep=2)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(integrity_reference["config"]))
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    result = cli_on_faulty_disk(out, "read-only", ["build", "--config", str(config), "--out", str(out), "--local"])
    assert result.returncode == 3, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("cannot write")] != []
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before, "nothing written or removed"

    report = build(parse_config(integrity_reference["config"]), out, lambda: integrity_engine)
    assert (report.shards_skipped, report.shards_built) == (2, 2)
    assert_same_as_reference(out, integrity_reference)


def test_prefect_server_restarted_during_a_flow_run(tmp_path, ray_session, integrity_reference):
    """Stop the Prefect server while the build flow labels shards, start it again on the same port and database.

    The flow run may survive the outage or crash with it; either way a re-run of the flow completes the
    dataset, and it equals the reference build.
    """
    import ray

    from cluster.prefect_stack import prefect_env, start_server
    from tests.conftest import free_port

    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    data = {**integrity_reference["config"], "name": "fault-prefect",
            "cluster": {"num_engines": 1, "cpus_per_engine": 0.25, "request_timeout_s": 120,
                        "namespace": ray_session["namespace"]}}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "ds"
    server, api_url = start_server(home, ui=False, port=port)
    env = prefect_env(home, api_url, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=str(REPO_ROOT))
    run_flow = [sys.executable, "-c", "import sys; from flows.build_dataset import build_dataset; "
                "print(build_dataset(sys.argv[1], sys.argv[2]))", str(config), str(out)]
    flow = subprocess.Popen(run_flow, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not completion_path(out, 0).exists() and flow.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert completion_path(out, 0).exists(), "the flow never finished a shard"
        server.stop()
        time.sleep(3)
        server, again = start_server(home, ui=False, port=port)
        assert again == api_url
        first_rc = flow.wait(timeout=400)
        if first_rc != 0 or not (out / "manifest.json").exists():
            rerun = subprocess.run(run_flow, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
            assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    finally:
        if flow.poll() is None:
            flow.kill()
        server.stop()
        from ray.util.placement_group import get_placement_group, remove_placement_group

        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("fault-prefect-engine"):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        try:
            remove_placement_group(get_placement_group("fault-prefect-engines"))
        except ValueError:
            pass  # the flow never got as far as the engines
    assert_same_as_reference(out, integrity_reference)
    print(json.dumps({"first_run_exit_code": first_rc}))
