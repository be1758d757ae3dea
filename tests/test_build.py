"""`prm-factory build` end to end on the toy world with a real engine: rows, resume after a kill, relabel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from configs.schema import REPO_ROOT, parse_config
from tasks.build import BuildError, build
from tasks.dataset import read_dataset, read_manifest, verify_dataset
from tasks.relabel import relabel, relabel_dataset

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny-build",
    "seed": 3,
    "sources": [{"kind": "toy", "num_problems": 6, "seed": 31, "min_steps": 2, "max_steps": 4}],
    "policy": {"model_path": "assets/toy-policy", "backend": "transformers", "max_model_len": 256},
    "partition": {"method": "edu", "tau": 0.3, "min_step_tokens": 3, "max_anchors": 3, "entropy_source": "exact"},
    "tree": {"branch_width": 2, "max_depth": 1, "max_leaves": 3},
    "rollouts": {"n": 2, "max_new_tokens": 64},
    "dataset": {"problems_per_shard": 2},
}


def _engine_factory(calls: list):
    def start():
        from cluster.hf_engine import HFEngine

        calls.append(1)
        return HFEngine(str(REPO_ROOT / "assets" / "toy-policy"))

    return start


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "ds"
    calls: list = []
    report = build(parse_config(TINY), out, _engine_factory(calls))
    return out, report, calls


def test_build_writes_a_verified_dataset(built):
    out, report, calls = built
    assert calls == [1]
    assert report.shards_total == 3 and report.shards_built == 3
    assert verify_dataset(out) == []
    table = read_dataset(out)
    assert table.num_rows == report.rows == read_manifest(out)["num_rows"]
    rows = table.to_pylist()
    assert {r["shard"] for r in rows} == {0, 1, 2}
    for row in rows:
        assert all(h >= 0.3 for h in row["step_entropies"][1:]), "EDU cuts sit at entropy >= tau"
        assert row["labels"][-1] == row["final_correct"]
    prov = json.loads(pq.read_schema(out / "shards" / "part-00000.parquet").metadata[b"prm_factory"])
    assert prov["config_hash"] == parse_config(TINY).config_hash() and prov["cost"]["generated_tokens"] > 0


def test_rerun_does_no_engine_work(built, monkeypatch):
    import tasks.loaders

    out, first, _ = built
    calls: list = []
    loads: list = []
    load_sources = tasks.loaders.load_sources
    monkeypatch.setattr(tasks.loaders, "load_sources", lambda sources: loads.append(1) or load_sources(sources))
    again = build(parse_config(TINY), out, _engine_factory(calls))
    assert calls == [], "every shard is done: the engine must not even start"
    assert loads == [1], "the sources are read once per build (prepare); later stages read problems.parquet"
    assert again.shards_skipped == 3 and again.shards_built == 0
    assert again.manifest["dataset_version"] == first.manifest["dataset_version"]


def test_other_config_refuses_the_directory(built):
    out, _, _ = built
    other = {**TINY, "rollouts": {"n": 3, "max_new_tokens": 64}}
    with pytest.raises(BuildError, match="holds a build of config"):
        build(parse_config(other), out, _engine_factory([]))


def test_relabel_recomputes_er_labels_only(built, tmp_path):
    out, _, _ = built
    manifest = relabel_dataset(out, tmp_path / "eta5", 5.0)
    assert manifest["parents"] == [read_manifest(out)["dataset_version"]]
    before, after = read_dataset(out), read_dataset(tmp_path / "eta5")
    assert after.column("labels").to_pylist() == before.column("labels").to_pylist()
    assert after.column("er_labels").to_pylist() == relabel(before, 5.0).column("er_labels").to_pylist()
    assert set(after.column("eta").to_pylist()) == {5.0}


def _cli_build(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prm_factory.cli", "build", "--config", str(config), "--out",
                             str(out), "--local", "--json"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_killed_build_resumes_to_the_same_dataset(tmp_path, built):
    """SIGKILL a build after its first shard, resume it; it must equal an uninterrupted build."""
    reference_dir, _, _ = built
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "killed"
    proc = _cli_build(config, out)
    first = out / "completions" / "part-00000.json"  # written right after the shard: the shard is done
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "the build never finished its first shard"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "killed before the end: no manifest yet"
    done_before = sorted(p.name for p in (out / "completions").glob("part-*.json"))
    assert 1 <= len(done_before) < 3

    resumed = _cli_build(config, out)
    stdout, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["shards_skipped"] == len(done_before) and summary["shards_built"] == 3 - len(done_before)
    assert verify_dataset(out) == []
    assert read_dataset(out).to_pylist() == read_dataset(reference_dir).to_pylist()
    a, b = read_manifest(out), read_manifest(reference_dir)
    assert [s["rows"] for s in a["shards"]] == [s["rows"] for s in b["shards"]]
    assert a["dataset_version"] == b["dataset_version"], "same rows, same shard hashes"


def test_trl_prm_trainer_trains_on_the_dataset_as_written(built, tmp_path):
    """TRL's stepwise-supervision PRMTrainer (trl 1.13.0) runs a few steps on the shards, read as-is."""
    import datasets
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from trl.experimental.prm import PRMConfig, PRMTrainer

    out, report, _ = built
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path / "hf-cache")
    train = datasets.load_dataset("parquet", data_files=str(out / "shards" / "*.parquet"), split="train")
    assert len(train) == report.rows and {"prompt", "completions", "labels"} <= set(train.column_names)
    policy = str(REPO_ROOT / "assets" / "toy-policy")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForTokenClassification.from_pretrained(policy, num_labels=2)
    before = [p.detach().clone() for p in model.score.parameters()]
    args = PRMConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                     report_to=[], max_length=256, step_separator="|", logging_steps=1, save_strategy="no",
                     dataset_num_proc=None)
    trainer = PRMTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 3 and result.training_loss > 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.score.parameters(), strict=True))


def test_build_through_vllm_engines_in_ray_actors(ray_session, tmp_path):
    """The card's shape end to end: a vLLM engine in a named Ray actor serves the whole build."""
    import ray

    from cluster.actors import engine_name, start_engines

    data = {**TINY, "name": "vllm-ray-build",
            "policy": {**TINY["policy"], "backend": "vllm"},
            "partition": {**TINY["partition"], "entropy_source": "topk_lower"},
            "cluster": {"num_engines": 1, "cpus_per_engine": 1, "namespace": ray_session["namespace"]}}
    cfg = parse_config(data)
    pools = []

    log_file = tmp_path / "ds" / "logs" / "engines.log"

    def factory():
        pools.append(start_engines(cfg, log_file))  # the quiet terminal's path: engine output to the run's log
        return pools[0]

    try:
        report = build(cfg, tmp_path / "ds", factory)
        actor = ray.get_actor(engine_name(cfg.name, 0), namespace=ray_session["namespace"])
        health = ray.get(actor.health.remote())
        assert health["requests_served"] == report.cost.requests > 0
    finally:
        for pool in pools:
            pool.shutdown()
    assert verify_dataset(tmp_path / "ds") == [] and report.rows > 0
    # The actor and its vLLM engine core wrote their start-up lines to the run's log file.
    assert "Initializing a V1 LLM engine" in log_file.read_text()
    rows = read_dataset(tmp_path / "ds").to_pylist()
    assert {r["entropy_kind"] for r in rows} == {"topk_lower"}
    assert all(h >= 0.3 for r in rows for h in r["step_entropies"][1:])
