"""The ActPRM active loop end to end on real engines, real Ray Train and a real Prefect server (issue 14).

- two rounds on the toy default (vLLM, the session engine): round 1 labels only problems round 0 did not buy,
  chosen because round 0's PRM is unsure about them; tokens add up from the shards' cost records; then a
  round where nothing is uncertain stops without a training run;
- the CLI killed with SIGKILL after round 1 is recorded, then run again: rounds 0 and 1 are not bought again;
- the `active-learning` flow against a real Prefect server: one task run per round, the artifacts, a resume.

Sizes are cut to the bone (a pool of 16 or 10, 3-4 problems a round, 1 epoch on 1 Ray Train worker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from configs.schema import REPO_ROOT, parse_config
from tasks.active.selection import selection_params

pytestmark = pytest.mark.slow


def _toy_active(**active) -> dict:
    """configs/toy-active.yaml (vLLM, EDU, paper thresholds), cut down for a test."""
    data = yaml.safe_load((REPO_ROOT / "configs" / "toy-active.yaml").read_text())
    data["train"].update({"epochs": 1, "num_heads": 4, "head_hidden": [32, 32]})
    data["active"] = {"rounds": 2, "pool_size": 16, "seed_size": 4, "max_selected": 4, "ruler_problems": 4,
                      "label_token_budget": None, **active}
    return data


def _tiny_transformers(**active) -> dict:
    """A transformers-backend toy config (engine in process: cheap to start in a subprocess)."""
    return {
        "name": "active-tiny", "seed": 0, "offline": True,
        "sources": [{"kind": "toy", "num_problems": 10, "seed": 1234, "min_steps": 2, "max_steps": 4}],
        "policy": {"model_path": "assets/toy-policy", "backend": "transformers", "max_model_len": 256},
        "partition": {"method": "edu", "tau": 0.2, "min_step_tokens": 3, "max_anchors": 8},
        "tree": {"branch_width": 2, "max_depth": 2, "max_leaves": 4},
        "rollouts": {"n": 2, "max_new_tokens": 64},
        "train": {"num_heads": 4, "head_hidden": [32, 32], "epochs": 1, "batch_size": 4, "num_workers": 1,
                  "cpus_per_worker": 0.5, "eval_fraction": 0.0},
        "active": {"rounds": 2, "seed_size": 3, "max_selected": 3, "ruler_problems": 4, **active},
    }


def _shard_cost(version_dir: Path, index: int) -> dict:
    from tasks.store.dataset import read_provenance, shard_path

    return read_provenance(shard_path(version_dir, index))["cost"]


def _shard_problem_ids(version_dir: Path, index: int) -> set[str]:
    from tasks.store.dataset import shard_path

    return set(pq.read_table(shard_path(version_dir, index), columns=["problem_id"]).column(0).to_pylist())


# -- two rounds on the toy default ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rounds(vllm_engine, ray_session, tmp_path_factory):
    from cluster.active_run import run_active

    out = tmp_path_factory.mktemp("active") / "run"
    cfg = parse_config(_toy_active())
    events: list[str] = []
    result = run_active(cfg, out, engine=lambda: vllm_engine, on_event=lambda kind, payload: events.append(kind))
    return {"cfg": cfg, "out": out, "result": result, "events": events, "engine": vllm_engine}


def test_round_one_buys_only_new_problems_the_prm_is_unsure_about(two_rounds):
    from tasks.active.run_dir import read_pool
    from tasks.active.selection import trajectory_confident
    from tasks.prm.model import load_prm

    out, result, cfg = two_rounds["out"], two_rounds["result"], two_rounds["cfg"]
    assert result.stop_reason == "rounds" and [r["round"] for r in result.rounds] == [0, 1]
    r0, r1 = result.rounds
    assert r0["how"] == "random (round 0: no PRM yet)" and r0["selected"] == 4 and r0["unlabelled"] == 16
    assert r1["how"] == "uncertainty" and r1["unlabelled"] == 12
    assert 1 <= r1["selected"] <= 4 and r1["uncertain"] >= r1["selected"]
    assert r1["uncertain"] + r1["confident"] == 12
    ids0, ids1 = set(r0["selected_problem_ids"]), set(r1["selected_problem_ids"])
    assert not ids0 & ids1  # round 1 never re-labels what round 0 bought
    # Each round's shard holds rows of its own problems only (a problem may yield no row: rejected, recorded).
    v0 = out / "labels" / "versions" / r0["version_id"]
    v1 = out / "labels" / "versions" / r1["version_id"]
    assert _shard_problem_ids(v0, 0) <= ids0 and _shard_problem_ids(v1, 1) <= ids1
    assert len(_shard_problem_ids(v1, 1)) == r1["labelled_problems"]
    # Round 1's picks are exactly the trajectories round 0's ensemble is not confident about (paper thresholds).
    pool = {item.problem_id: item for item in read_pool(out, cfg.labelling_hash())[0]}
    prm = load_prm(r0["checkpoint"])
    picked = [pool[pid] for pid in r1["selected_problem_ids"]]
    scores = prm.score([i.prompt for i in picked], [i.completions for i in picked])
    params = selection_params(cfg.active.selection)
    assert scores and not any(trajectory_confident(s.mean, s.std, params) for s in scores)
    # The labeller regenerated each chosen problem's pool solution: its root row has the pool's steps.
    roots = {}
    for row in pq.read_table(v1 / "shards" / "part-00001.parquet", columns=["problem_id", "completions"]).to_pylist():
        roots.setdefault(row["problem_id"], row["completions"])
    assert roots and all(steps == pool[pid].completions for pid, steps in roots.items())


def test_tokens_and_lineage_add_up(two_rounds):
    from tasks.store.dataset import read_manifest
    from tasks.store.versions import read_latest, read_refresh_log, verify_path

    out, (r0, r1) = two_rounds["out"], two_rounds["result"].rounds
    root = out / "labels"
    v0, v1 = root / "versions" / r0["version_id"], root / "versions" / r1["version_id"]
    # Tokens per round come from the round shard's cost record; cumulative is their sum; nothing else was charged.
    assert r0["label_tokens"] == _shard_cost(v0, 0)["generated_tokens"] > 0
    assert r1["label_tokens"] == _shard_cost(v1, 1)["generated_tokens"] > 0
    assert r1["rollout_tokens"] == _shard_cost(v1, 1)["rollout_tokens"]
    assert r1["cumulative_label_tokens"] == r0["label_tokens"] + r1["label_tokens"]
    assert read_manifest(v1)["extra"]["cost"]["generated_tokens"] == r1["cumulative_label_tokens"]
    # Lineage like a refresh: parent, round, the problem ids bought; shard 0 linked from the parent, byte for byte.
    m1 = read_manifest(v1)
    assert m1["parents"] == [r0["version_id"]] and r1["parent_version"] == r0["version_id"]
    lineage = m1["extra"]["lineage"]
    assert lineage["round"] == 1 and lineage["selected_problem_ids"] == r1["selected_problem_ids"]
    assert lineage["reused_shards"] == [{"index": 0, "parent_index": 0, "key": r0["shard_key"], "how": "link"}]
    assert m1["shards"][0]["sha256"] == read_manifest(v0)["shards"][0]["sha256"] == r0["shard_sha256"]
    assert (v1 / "shards" / "part-00000.parquet").stat().st_ino == (v0 / "shards" / "part-00000.parquet").stat().st_ino
    assert read_latest(root) == r1["version_id"]
    assert [e["version"] for e in read_refresh_log(root)] == [r0["version_id"], r1["version_id"]]
    assert verify_path(root)["ok"]
    # Round 1 trained warm-started from round 0's weights, in a fresh run dir.
    run1 = json.loads((out / "rounds" / "round-001" / "prm" / "run.json").read_text())
    assert run1["init_from"] == str(Path(r0["checkpoint"]).resolve()) and r1["warm_start_from"] == r0["checkpoint"]
    assert run1["dataset_version"] == r1["dataset_version"]
    for r in (r0, r1):
        assert 0.0 <= r["heldout_step_auroc"] <= 1.0 and r["heldout_ruler_problems"] == 4
        assert r["train_loss"] > 0 and r["labelled_steps"] >= r["labelled_rows"] > 0


def test_nothing_uncertain_stops_without_training(two_rounds):
    from cluster.active_run import run_active

    out = two_rounds["out"]
    before = sorted(p.name for p in (out / "labels" / "versions").iterdir())
    # delta_pred 0.5001 / delta_std 0.5: every scored step is confident (its mean is off 0.5 by more than 1e-4, and a
    # std of probabilities is at most 0.5); delta_pred 0.5 itself is refused by validation.
    cfg = parse_config(_toy_active(rounds=3, selection={"delta_pred": 0.5001, "delta_std": 0.5}))
    started = []
    result = run_active(cfg, out, engine=lambda: started.append(1) or two_rounds["engine"])
    assert result.stop_reason == "nothing_uncertain" and len(result.rounds) == 2
    left = 16 - sum(r["selected"] for r in result.rounds)
    assert f"round 2: the round-1 PRM is confident on all {left} unlabelled trajectories" in result.message
    assert not started  # the pool was on disk: no engine, no label bought
    assert sorted(p.name for p in (out / "labels" / "versions").iterdir()) == before
    assert not (out / "rounds" / "round-002").exists()  # no selection kept, no training run


# -- the CLI, killed between rounds and run again -----------------------------------------------------------------


def _own_processes(marker: str) -> list[int]:
    """pids whose command line names `marker` (the Ray temp dir this test gave the CLI): processes it started."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]


def _cli(args: list[str], ray_tmp: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_ADDRESS": "local", "RAY_TMPDIR": ray_tmp}
    return subprocess.Popen([sys.executable, "-m", "prm_factory.cli", "active", *args], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)


def test_cli_killed_after_round_one_resumes_without_buying_again(tmp_path):
    from tasks.active.run_dir import read_rounds
    from tasks.store.versions import read_refresh_log

    config = tmp_path / "active.yaml"
    config.write_text(yaml.safe_dump(_tiny_transformers(rounds=3)))
    out = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        proc = _cli(["--config", str(config), "--out", str(out), "--local"], ray_tmp)
        deadline = time.monotonic() + 480
        while len(read_rounds(out)) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "round 1 was not recorded in time"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in _own_processes(ray_tmp):  # Ray processes of the killed CLI that outlived it
            os.kill(pid, signal.SIGKILL)
        before = read_rounds(out)
        assert [r["round"] for r in before] == [0, 1]
        versions_before = sorted(p.name for p in (out / "labels" / "versions").iterdir() if p.is_dir())

        again = _cli(["--config", str(config), "--out", str(out), "--local", "--json"], ray_tmp)
        stdout, _ = again.communicate(timeout=480)
        assert again.returncode == 0, stdout
        summary = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for pid in _own_processes(ray_tmp):
            os.kill(pid, signal.SIGKILL)
    after = read_rounds(out)
    assert [r["round"] for r in after] == [0, 1, 2] and after[:2] == before  # rounds 0 and 1 untouched
    r0, r1, r2 = after
    # Round 1's labels are the same version, not bought again: one labelled version per round, ever.
    versions = sorted(p.name for p in (out / "labels" / "versions").iterdir() if p.is_dir())
    assert versions[:len(versions_before)] == versions_before and len(versions) == 3
    assert versions_before[-1] == r1["version_id"] or r1["version_id"] in versions_before
    assert [e["version"] for e in read_refresh_log(out / "labels")] == [r0["version_id"], r1["version_id"],
                                                                         r2["version_id"]]
    assert r2["parent_version"] == r1["version_id"]
    assert not set(r2["selected_problem_ids"]) & (set(r0["selected_problem_ids"]) | set(r1["selected_problem_ids"]))
    # No extra tokens: the total is the three rounds' shard cost records, each counted once.
    v2 = out / "labels" / "versions" / r2["version_id"]
    shard_tokens = [_shard_cost(v2, i)["generated_tokens"] for i in range(3)]
    assert shard_tokens == [r0["label_tokens"], r1["label_tokens"], r2["label_tokens"]]
    assert summary["label_tokens"] == sum(shard_tokens) == r2["cumulative_label_tokens"]
    assert summary["stop_reason"] == "rounds"


# -- the Prefect flow ----------------------------------------------------------------------------------------------


def test_active_learning_flow_one_task_run_per_round_and_resume(prefect_server, ray_session, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.active_learning import active_learning

    config = tmp_path / "active.yaml"
    config.write_text(yaml.safe_dump(_tiny_transformers(rounds=2)))
    out = tmp_path / "run"
    first = active_learning(str(config), str(out), local=True)
    assert first["stop_reason"] == "rounds" and [r["round"] for r in first["rounds"]] == [0, 1]
    assert first["rounds_resumed"] == 0
    assert (out / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for r in first["rounds"]:
        assert f"| {r['round']} | {r['selector']} | {r['unlabelled']} |" in report

    # Run again on the same OUT: both rounds are finished, nothing is bought, no version is added.
    versions = sorted(p.name for p in (out / "labels" / "versions").iterdir())
    second = active_learning(str(config), str(out), local=True)
    assert second["rounds_resumed"] == 2 and second["rounds"] == first["rounds"]
    assert sorted(p.name for p in (out / "labels" / "versions").iterdir()) == versions

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(), await client.read_task_runs()

    deadline = time.monotonic() + 30
    while True:  # task runs reach the API through events: wait for the last one
        artifacts, task_runs = asyncio.run(read())
        names = [t.name for t in task_runs]
        if names.count("round-002") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # One task run per round (round-002 is the one that found the rounds done), in both flow runs.
    assert names.count("round-000") == 2 and names.count("round-001") == 2 and names.count("round-002") == 2
    tables = [json.loads(a.data) if isinstance(a.data, str) else a.data
              for a in artifacts if a.key == "active-tiny-active-rounds"]
    # A table version after each round the first flow run did (1 row, then 2); none from the resume.
    assert sorted(len(rows) for rows in tables) == [1, 2]
    last = max(tables, key=len)
    assert [row["heldout_step_auroc"] for row in last] == [
        pytest.approx(r["heldout_step_auroc"], abs=1e-4) for r in first["rounds"]]
    md = [a for a in artifacts if a.key == "active-tiny-active"]
    assert len(md) == 2 and all("data:image/png;base64," in a.data for a in md)
