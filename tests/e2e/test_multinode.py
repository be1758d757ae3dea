"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): engines spread one per node by the config's
placement strategy, a build completes across them, and losing a node mid-build changes nothing in the dataset.

The scenario (tests/multinode_scenario.py) runs in its own process with its own multi-node Ray and Ray temp
dir, so it never meets the session's `ray_session` (one Ray connection per process) nor another Ray here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from configs.paths import SHIPPED_POLICY
from configs.schema import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "multinode_scenario.py"), str(out),
                           str(SHIPPED_POLICY)], capture_output=True, text=True, timeout=900, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["wall_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report, indent=1))  # the figures, with -s
    return report


def test_engines_spread_one_per_worker_node(scenario):
    nodes = scenario["engine_nodes"]
    assert len(set(nodes)) == 2, nodes  # STRICT_SPREAD: two engines, two nodes
    assert set(nodes) == set(scenario["worker_nodes"])  # the head offers no engine resource
    assert scenario["head_node"] not in nodes


def test_a_build_completes_across_the_nodes(scenario):
    digest, rows = scenario["undisturbed"]
    assert rows > 0 and len(digest) == 64
    assert all(served > 0 for served in scenario["served_after_undisturbed"])  # both nodes did work


def test_losing_a_node_mid_build_gives_the_same_dataset(scenario):
    assert scenario["removed_node"] == scenario["engine_nodes"][1]
    assert len(scenario["rounds"]) >= 2  # the node went down after the first round, before the build ended
    assert scenario["failures"][1] >= 1 and scenario["failures"][0] == 0
    assert scenario["resubmitted_chunks"] >= 1  # the lost node's chunk went to the engine left
    assert scenario["disturbed"] == scenario["undisturbed"]  # same rows, same content hash
    # Fewer engines: with one node left, STRICT_SPREAD cannot re-place the lost bundle; the build went on
    # with engine 0 while the group waited for a node.
    assert scenario["pg_state_after_loss"] == "RESCHEDULING"
    assert scenario["engines_ok_after_loss"] == [True, False]


def test_a_new_node_gets_the_lost_engine_back(scenario):
    assert scenario["pg_state_after_add"] == "CREATED"
    assert scenario["victim_engine_node_after_add"] == scenario["added_node"]


def test_dashboard_keeps_token_auth(scenario):
    assert scenario["dashboard_status"] == {"no_token": 401, "token": 200}
