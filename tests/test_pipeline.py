"""The build pipeline's stages without an engine: prepare reads the sources once and writes what later stages read.

(Labelling a shard needs an engine: tests/test_build.py and tests/test_flows.py run the whole pipeline.)
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from integrity_helpers import build_config, toy_questions, write_jsonl

from configs.schema import parse_config
from tasks.build import (
    BuildError,
    finalize,
    ingest,
    plan_shards,
    prepare,
    read_plan,
    read_plans,
    read_problems,
    stage_ingest,
)


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
    import tasks.loaders

    cfg, _ = _config(tmp_path, toy_questions(3))
    staging = tmp_path / "root" / ".ingest-run"
    plans = stage_ingest(cfg, staging)
    loads: list[int] = []
    monkeypatch.setattr(tasks.loaders, "load_sources", lambda sources: loads.append(1))
    prepared = prepare(cfg, tmp_path / "root" / "v1", staged=staging)
    assert loads == [] and not staging.exists()
    assert prepared.plans == plans and prepared.problems == 3 and prepared.quarantined == 1
    assert sorted(p.name for p in (tmp_path / "root" / "v1").iterdir()) == [
        "build.json", "ingest.json", "problems.parquet", "quarantine.jsonl", "rejected"]
