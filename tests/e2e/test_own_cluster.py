"""A run owns its Ray (issue 36): it never joins an instance it was not given, fails fast on a dead one, and
every listener of the Ray it starts binds loopback.

The foreign instance is started the ordinary way (`ray start --head`) as another project would, in a temp dir
of the test's own that the commands also see as Ray's default (RAY_TMPDIR): a bare ``ray.init()`` in them would
find its ``ray_current_cluster`` file and join it, as issue 36 reproduced. The commands run as subprocesses
(the README's `prm-factory build` without --local, and `prm-factory train`), each with the default
``cluster.address``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster.connect import probe
from configs.schema import load_config
from tests.conftest import free_port
from tests.integrity_helpers import build_config, toy_questions, write_jsonl

pytestmark = pytest.mark.slow

LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), PRM_FACTORY_CLUSTER_STATE=str(tmp / "no-cluster-up.json"), OMP_NUM_THREADS="1",
               **extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prm_factory.cli", *args]


def _tree(root: int) -> set[int]:
    """`root` and every process below it."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    rows = [tuple(map(int, line.split())) for line in ps.splitlines()]
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in rows if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _listeners(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, process name) of every TCP listener owned by one of `pids`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        if any(int(p) in pids for p in re.findall(r"pid=(\d+)", line)):
            found.add((line.split()[3], re.search(r'\(\("([^"]+)"', line).group(1)))
    return found


def _drivers(session_logs: Path) -> list[str]:
    """The drivers (jobs) that ever connected to a Ray session: each leaves a core-driver log."""
    return sorted(p.name for p in session_logs.glob("python-core-driver-*"))


@pytest.fixture(scope="module")
def foreign():
    """Another project's Ray: `ray start --head` on a free port, recorded as this machine's current cluster."""
    tmp = Path(tempfile.mkdtemp(prefix="prmf-t", dir="/tmp"))  # short: Ray's unix socket paths live under it
    port = free_port()
    env = _env(tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer = tmp / "ray" / "ray_current_cluster"
    deadline = time.monotonic() + 90
    while not pointer.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pointer.exists(), "the foreign `ray start` recorded no current cluster"
    yield {"tmp": tmp, "port": port, "proc": proc, "logs": tmp / "ray" / "session_latest" / "logs"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.skipif(shutil.which("ss") is None, reason="no `ss` (iproute2) to list listeners")
def test_build_and_train_start_their_own_loopback_ray_beside_a_foreign_one(foreign, toy_prm_dataset, tmp_path):
    assert foreign["proc"].poll() is None
    drivers_before = _drivers(foreign["logs"])
    # The commands' environment finds the foreign instance: `auto` (what a bare ray.init() did) resolves to it.
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(foreign["tmp"])
    try:
        assert probe("auto", 5) == f"127.0.0.1:{foreign['port']}"
    finally:
        os.environ.pop("RAY_TMPDIR") if saved is None else os.environ.update(RAY_TMPDIR=saved)

    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(build_config(write_jsonl(tmp_path / "p.jsonl", toy_questions(2)))))
    assert load_config(config).cluster.address is None
    out = tmp_path / "ds"
    build = subprocess.Popen(_cli("build", "--config", str(config), "--out", str(out), "--json"),
                             env=_env(foreign["tmp"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, str]] = set()
    while build.poll() is None:  # every listener its process tree opens while it runs
        seen |= _listeners(_tree(build.pid))
        time.sleep(0.5)
    stdout, stderr = build.communicate()
    assert build.returncode == 0, stderr[-3000:]
    assert "Ray: started this run's own instance on 127.0.0.1" in stderr
    names = {name for _, name in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # the listing saw Ray's own processes
    assert [(a, n) for a, n in seen if not a.startswith(LOOPBACK)] == []

    train = subprocess.run(_cli("train", "--config", str(toy_prm_dataset["config_path"]), "--dataset",
                                str(toy_prm_dataset["dir"]), "--out", str(tmp_path / "run"), "--json"),
                           env=_env(foreign["tmp"]), capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "Ray: started this run's own instance on 127.0.0.1" in train.stderr
    assert (tmp_path / "run" / "model").is_dir()
    assert _drivers(foreign["logs"]) == drivers_before, "the foreign instance saw a new job"


def test_a_dead_cluster_fails_fast_by_name_and_the_default_is_unaffected(foreign, tmp_path):
    os.killpg(foreign["proc"].pid, signal.SIGKILL)  # a crash: ray_current_cluster stays behind
    foreign["proc"].wait()
    subprocess.run(["pkill", "-9", "-f", f"gcs_server.*{foreign['port']}"], check=False)
    assert (foreign["tmp"] / "ray" / "ray_current_cluster").exists()
    source = write_jsonl(tmp_path / "p.jsonl", toy_questions(1))
    # (`auto` is not tried here: Ray's discovery takes any live GCS on the machine over the stale pointer, and the
    # test session's own Ray is one.)
    config = tmp_path / "dead.yaml"
    address = f"127.0.0.1:{foreign['port']}"
    config.write_text(yaml.safe_dump(build_config(source, cluster={"address": address, "connect_timeout_s": 3})))
    t0 = time.monotonic()
    res = subprocess.run(_cli("build", "--config", str(config), "--out", str(tmp_path / "ds-dead")),
                         env=_env(foreign["tmp"]), capture_output=True, text=True, timeout=300)
    said = res.stdout + res.stderr
    assert res.returncode == 2, said
    assert f"no Ray answers at {address}" in said and "prm-factory cluster up" in said, said
    assert time.monotonic() - t0 < 120, "failed fast, not after Ray's endless retry"
    config = tmp_path / "default.yaml"
    config.write_text(yaml.safe_dump(build_config(source)))
    res = subprocess.run(_cli("build", "--config", str(config), "--out", str(tmp_path / "ds")),
                         env=_env(foreign["tmp"]), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Ray: started this run's own instance" in res.stderr
