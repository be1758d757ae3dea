"""The build pipeline (tasks/build.py).

- its stages without an engine: prepare reads the sources once and writes what later stages read;
- `prm-factory build` end to end on the toy world with a real engine (slow): rows, resume after a kill, relabel.
"""

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
from tasks.build import (
    BuildError,
    build,
    finalize,
    ingest,
    plan_shards,
    prepare,
    read_plan,
    read_plans,
    read_problems,
    split_by_context,
    stage_ingest,
)
from tasks.io import sha256_file
from tasks.store.dataset import read_dataset, read_manifest, verify_dataset
from tasks.store.relabel import relabel, relabel_dataset
from tests.conftest import subprocess_env
from tests.integrity_helpers import build_config, toy_questions, write_jsonl

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_rerun_does_no_engine_work(built, monkeypatch):
    import tasks.sources.loaders

    out, first, _ = built
    calls: list = []
    loads: list = []
    load_sources = tasks.sources.loaders.load_sources
    monkeypatch.setattr(tasks.sources.loaders, "load_sources",
                        lambda sources: loads.append(1) or load_sources(sources))
    again = build(parse_config(TINY), out, _engine_factory(calls))
    assert calls == [], "every shard is done: the engine must not even start"
    assert loads == [1], "the sources are read once per build (prepare); later stages read problems.parquet"
    assert again.shards_skipped == 3 and again.shards_built == 0
    assert again.manifest["dataset_version"] == first.manifest["dataset_version"]


@pytest.mark.slow
def test_other_config_refuses_the_directory(built):
    out, _, _ = built
    other = {**TINY, "rollouts": {"n": 3, "max_new_tokens": 64}}
    with pytest.raises(BuildError, match="holds a build of config"):
        build(parse_config(other), out, _engine_factory([]))


@pytest.mark.slow
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
                            stderr=subprocess.DEVNULL, env=subprocess_env(PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_dataset(tmp_path):
    """SIGKILL a build after its first shard, resume it; it must equal an uninterrupted build.

    The reference is built by the CLI in a subprocess too: torch in the test process may run with other threads and
    libraries loaded (a vLLM engine started earlier in the session), and its entropies can differ in the last bits.
    """
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    reference_dir = tmp_path / "reference"
    reference = _cli_build(config, reference_dir)
    reference.communicate(timeout=300)
    assert reference.returncode == 0
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- the stages without an engine ----------------------------------------------------------------------


def _config(tmp_path, rows, **overrides):
    source = write_jsonl(tmp_path / "problems.jsonl", rows)
    processbench = tmp_path / "pb.json"
    processbench.write_text(json.dumps([{"id": "pb-1", "problem": "What is 1+1?", "generator": "g",
                                         "steps": ["1+1=2"], "label": -1, "final_answer_correct": True}]))
    cfg = build_config(source, **overrides)
    cfg["sources"].append({"kind": "processbench", "path": str(processbench)})
    cfg["dataset"]["problems_per_shard"] = 2
    return parse_config(cfg), source


def test_prepare_writes_the_problems_later_stages_read(tmp_path):
    rows = toy_questions(5)
    cfg, _ = _config(tmp_path, [*rows, {"question": "", "answer": "1"}])
    prepared = prepare(cfg, tmp_path / "ds")

    ingested = ingest(cfg)
    assert prepared.problems == len(ingested.problems) == 5
    # the empty question (loader) and the ProcessBench sample (no gold answer, the build's own rule)
    quarantine = [json.loads(line) for line in (tmp_path / "ds" / "quarantine.jsonl").read_text().splitlines()]
    assert [q["reason"] for q in quarantine] == ["empty_question", "no_gold_answer"] and prepared.quarantined == 2
    assert pq.read_table(tmp_path / "ds" / "problems.parquet").num_rows == 5
    assert json.loads((tmp_path / "ds" / "ingest.json").read_text())["per_source"][1] == {
        "index": 1, "kind": "processbench", "path": str(tmp_path / "pb.json"), "kept": 0, "quarantined": 1,
        "reasons": {"no_gold_answer": 1}}

    # 5 problems, 2 per shard: slices [0:2], [2:4], [4:5], read back as the very problems ingest produced
    assert [p.problem_ids for p in prepared.plans] == [tuple(p.problem_id for p in ingested.problems[i:i + 2])
                                                        for i in (0, 2, 4)]
    assert prepared.plans == read_plans(cfg, tmp_path / "ds") == plan_shards(
        [p.problem_id for p in ingested.problems], cfg)
    assert [p for plan in prepared.plans for p in read_problems(tmp_path / "ds", plan)] == ingested.problems

    with pytest.raises(BuildError, match="shard 1: the problems changed since planning"):
        read_plan(cfg, tmp_path / "ds", 1, prepared.plans[0].key)
    with pytest.raises(BuildError, match="shards not done"):
        finalize(cfg, tmp_path / "ds")


def test_a_changed_source_gives_new_keys_on_the_next_prepare(tmp_path):
    rows = toy_questions(4)
    cfg, source = _config(tmp_path, rows)
    first = prepare(cfg, tmp_path / "ds")
    write_jsonl(source, [rows[0], rows[1], rows[3], rows[2]])  # shard 1's problems swap places
    second = prepare(cfg, tmp_path / "ds")
    assert first.plans[0] == second.plans[0] and first.plans[1].key != second.plans[1].key
    assert [p.question for p in read_problems(tmp_path / "ds", second.plans[1])] == [rows[3]["question"],
                                                                                     rows[2]["question"]]


def test_a_staged_ingest_is_moved_in_not_read_again(tmp_path, monkeypatch):
    import tasks.sources.loaders

    cfg, _ = _config(tmp_path, toy_questions(3))
    staging = tmp_path / "root" / ".ingest-run"
    plans = stage_ingest(cfg, staging)
    loads: list[int] = []
    monkeypatch.setattr(tasks.sources.loaders, "load_sources", lambda sources: loads.append(1))
    prepared = prepare(cfg, tmp_path / "root" / "v1", staged=staging)
    assert loads == [] and not staging.exists()
    assert prepared.plans == plans and prepared.problems == 3 and prepared.quarantined == 1
    assert sorted(p.name for p in (tmp_path / "root" / "v1").iterdir()) == [
        "build.json", "ingest.json", "problems.parquet", "quarantine.jsonl", "rejected"]


class _WordChatTokenizer:
    """A chat tokenizer in miniature, as render_prompt uses one: a chat template that writes every message, and
    one token per word."""

    chat_template = "one line per message, then the assistant's turn"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}> {m['content']}\n" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens  # a chat template writes its own special tokens
        return text.split()


def test_a_chat_prompt_longer_than_the_context_is_rejected(tmp_path):
    """With `prompt_template: chat` the prompt is the chat template over the system prompt and the question,
    measured as the labeller renders it (the literal string "chat", measured before, always fitted)."""
    from tasks.sources.problems import Problem

    cfg = parse_config(build_config(write_jsonl(tmp_path / "p.jsonl", toy_questions(1)), policy={
        "model_path": str(REPO_ROOT / "assets" / "toy-policy"), "backend": "transformers", "max_model_len": 64,
        "prompt_template": "chat", "system_prompt": "Think step by step. " * 10}))
    short = Problem.make("jsonl", "What is 1+1?", "2")
    long = Problem.make("jsonl", "add one more " * 10, "10")  # 30 words: under 64 alone, not with the system prompt
    fits, too_long = split_by_context(cfg, [short, long], _WordChatTokenizer())
    # <system> + 40 words + <user> + the question + <assistant>: 46 tokens fit in 64, 73 do not
    assert fits == [short]
    assert [(r.problem_id, r.source) for r in too_long] == [(long.problem_id, "jsonl")]
    assert too_long[0].reason.startswith("prompt_too_long: the prompt is 73 tokens, the policy's context ")


class _NoRowsLabeller:
    """A labeller that labels nothing: the stages around it run without an engine."""

    tok = _WordChatTokenizer()

    def label(self, problems):
        from tasks.cost import ShardCost
        from tasks.labelling.tree_labeller import ShardResult

        return ShardResult([], ShardCost())


def test_verify_names_a_damaged_problems_file(tmp_path):
    """ingest.json records the sha256 of problems.parquet as written; verify checks the file against it."""
    from typer.testing import CliRunner

    from prm_factory.cli import app
    from tasks.build import run_shard
    from tasks.store.versions import verify_path

    cfg, _ = _config(tmp_path, toy_questions(3))
    out = tmp_path / "ds"
    for plan in prepare(cfg, out).plans:
        run_shard(cfg, out, plan, _NoRowsLabeller)
    finalize(cfg, out)
    assert verify_path(out)["ok"]

    problems = out / "problems.parquet"
    data = bytearray(problems.read_bytes())
    data[len(data) // 2] ^= 0x01
    problems.write_bytes(bytes(data))
    report = verify_path(out)
    assert not report["ok"] and report["datasets"][0]["problems"] == [
        f"sha256 mismatch: problems.parquet is {sha256_file(problems)}, ingest.json says "
        f"{json.loads((out / 'ingest.json').read_text())['problems_sha256']}"]
    cli = CliRunner().invoke(app, ["verify", str(out)])
    assert cli.exit_code == 1 and "problems.parquet" in cli.output

    # A dataset written before ingest.json recorded the sha256: nothing to check the file against, not a failure.
    ingest_report = json.loads((out / "ingest.json").read_text())
    del ingest_report["problems_sha256"]
    (out / "ingest.json").write_text(json.dumps(ingest_report))
    assert verify_path(out)["ok"]
    # Neither is a dataset without problems.parquet (a relabelled version: its rows come from another's shards).
    problems.unlink()
    (out / "ingest.json").unlink()
    assert verify_path(out)["ok"]
