"""Loaders: real ../shared/data files load in full; every kind of bad row is quarantined with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from configs.schema import REPO_ROOT, FileSource, ToySource
from tasks.sources.loaders import (
    MAX_RAW_CHARS,
    REASONS,
    LoadResult,
    SourceError,
    load_source,
    load_sources,
    write_quarantine,
)

DATA = REPO_ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA} (../shared/data)")


def _reasons(result: LoadResult) -> dict[int, str]:
    return {q.line: q.reason for q in result.quarantined}


def _write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------- real data files


@needs_data
@pytest.mark.parametrize(
    ("kind", "rel", "rows"),
    [
        ("gsm8k", "gsm8k/test.jsonl", 1319),
        ("gsm8k", "gsm8k/train.jsonl", 7473),
        ("math", "math500/test.jsonl", 500),
        ("processbench", "processbench/gsm8k.json", 400),
        ("processbench", "processbench/math.json", 1000),
        ("processbench", "processbench/olympiadbench.json", 1000),
        ("processbench", "processbench/omnimath.json", 1000),
    ],
)
def test_real_files_load_in_full(kind, rel, rows):
    result = load_source(FileSource(kind=kind, path=f"../shared/data/{rel}", split="test"))
    assert result.quarantined == []
    assert len(result.problems) == rows
    assert len({p.problem_id for p in result.problems}) == rows
    assert all(p.source == kind and p.split == "test" and p.question.strip() for p in result.problems)


@needs_data
def test_gsm8k_gold_and_rationale():
    first = load_source(FileSource(kind="gsm8k", path="../shared/data/gsm8k/test.jsonl", limit=1)).problems[0]
    assert first.question.startswith("Janet")
    assert first.answer == "18"
    assert first.meta["rationale"].endswith("every day at the farmer\u2019s market.")
    train = load_source(FileSource(kind="gsm8k", path="../shared/data/gsm8k/train.jsonl")).problems
    assert all("," not in p.answer and float(p.answer) == float(p.answer) for p in train)  # commas stripped


@needs_data
def test_math500_meta():
    first = load_source(FileSource(kind="math", path="../shared/data/math500/test.jsonl")).problems[0]
    assert first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.meta["subject"] == "Precalculus" and first.meta["level"] == 2
    assert first.meta["unique_id"] == "test/precalculus/807.json" and "\\boxed" in first.meta["solution"]


@needs_data
def test_processbench_rows_are_samples_without_gold():
    src = FileSource(kind="processbench", path="../shared/data/processbench/olympiadbench.json")
    problems = load_source(src).problems
    assert len(problems) == 1000
    # Several generators' solutions share a question: all are kept, grouped by question_id.
    assert len({p.meta["question_id"] for p in problems}) < 1000
    p = problems[0]
    assert p.answer == "" and p.meta["has_gold"] is False
    assert p.meta["id"] == "olympiadbench-0" and p.meta["subset"] == "olympiadbench"
    assert isinstance(p.meta["steps"], list) and -1 <= p.meta["label"] < len(p.meta["steps"])
    assert isinstance(p.meta["final_answer_correct"], bool) and p.meta["generator"]


@needs_data
def test_limit_caps_problems_kept():
    result = load_source(FileSource(kind="gsm8k", path="../shared/data/gsm8k/test.jsonl", limit=10))
    assert len(result.problems) == 10 and result.rows_read == 10


# ------------------------------------------------------------------------------------------ malformed files


def test_gsm8k_every_quarantine_reason(tmp_path):
    long_question = "x" * (MAX_RAW_CHARS * 2)
    path = _write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            json.dumps({"question": "Q1 how many?", "answer": "1 + 1 = 2\n#### 2"}),  # 1 kept
            '{"question": "broken", "answer": ',  # 2
            json.dumps({"question": "Q3"}),  # 3
            json.dumps({"question": 5, "answer": "#### 1"}),  # 4
            json.dumps({"question": "   ", "answer": "#### 1"}),  # 5
            json.dumps({"question": "Q6", "answer": "the answer is 6"}),  # 6
            json.dumps({"question": "Q1   how many? ", "answer": "#### 3"}),  # 7: same question up to whitespace
            "[1, 2]",  # 8
            "   ",  # 9: whitespace only, not a row
            json.dumps({"question": None, "answer": "#### 1"}),  # 10
            json.dumps({"question": "Q11", "answer": "#### eleven"}),  # 11
            json.dumps({"question": long_question, "answer": "#### 1,000"}),  # 12 kept
        ],
    )
    result = load_source(FileSource(kind="gsm8k", path=path))
    assert [p.question[:12] for p in result.problems] == ["Q1 how many?", "x" * 12]
    assert result.problems[1].answer == "1000"
    assert _reasons(result) == {
        2: "invalid_json",
        3: "missing_field",
        4: "wrong_type",
        5: "empty_question",
        6: "unparseable_answer",
        7: "duplicate",
        8: "wrong_type",
        10: "missing_field",
        11: "unparseable_answer",
    }
    assert result.rows_read == 11 == len(result.problems) + len(result.quarantined)  # 12 lines, one blank
    details = {q.line: q.detail for q in result.quarantined}
    assert "'answer'" in details[3] and "'question' is int" in details[4] and "null" in details[10]
    assert "list" in details[8]
    assert all(q.source == "gsm8k" and q.path == path and q.reason in REASONS for q in result.quarantined)
    assert json.loads([q.raw for q in result.quarantined if q.line == 7][0])["answer"] == "#### 3"
    assert [q.raw for q in result.quarantined if q.line == 2] == ['{"question": "broken", "answer": ']


def test_raw_is_truncated(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [json.dumps({"question": "Q", "answer": "y" * (3 * MAX_RAW_CHARS)})])
    (bad,) = load_source(FileSource(kind="gsm8k", path=path)).quarantined
    assert bad.reason == "unparseable_answer"
    assert len(bad.raw) < MAX_RAW_CHARS + 20 and bad.raw.endswith("[truncated]")


def test_math_answer_field_or_boxed_solution(tmp_path):
    path = _write_jsonl(
        tmp_path / "math.jsonl",
        [
            json.dumps({"problem": "P1", "answer": "\\frac12", "level": 3, "subject": "Algebra"}),  # kept
            json.dumps({"problem": "P2", "solution": "so \\boxed{\\sqrt{2}}.", "type": "Geometry"}),  # kept
            json.dumps({"problem": "P3", "solution": "no box here"}),  # unparseable
            json.dumps({"problem": "P4"}),  # missing
            json.dumps({"problem": "P5", "answer": "  "}),  # unparseable (empty)
            json.dumps({"problem": "P6", "answer": ["1"]}),  # wrong type
            json.dumps({"problem": "", "answer": "1"}),  # empty question
        ],
    )
    result = load_source(FileSource(kind="math", path=path))
    assert [(p.answer, p.meta["answer_from"]) for p in result.problems] == [("\\frac12", "answer"),
                                                                           ("\\sqrt{2}", "solution")]
    assert result.problems[1].meta["subject"] == "Geometry"
    assert _reasons(result) == {3: "unparseable_answer", 4: "missing_field", 5: "unparseable_answer",
                                6: "wrong_type", 7: "empty_question"}


def test_processbench_quarantine(tmp_path):
    good = {"id": "s-0", "generator": "g", "problem": "P", "steps": ["a", "b"], "final_answer_correct": True,
            "label": -1}
    rows = [
        good,  # 1 kept
        {**good, "id": "s-1", "label": 1},  # 2 kept: same question, another sample
        {**good, "label": 0},  # 3 duplicate sample id
        {**good, "id": "s-3", "label": 2},  # 4 label out of range
        {**good, "id": "s-4", "steps": []},  # 5 no steps
        {**good, "id": "s-5", "steps": "a"},  # 6 steps not a list
        {**good, "id": "s-6", "label": True},  # 7 label is a bool
        {k: v for k, v in good.items() if k != "generator"} | {"id": "s-7"},  # 8 missing generator
        "not an object",  # 9
    ]
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(rows))
    result = load_source(FileSource(kind="processbench", path=str(path)))
    assert [p.meta["id"] for p in result.problems] == ["s-0", "s-1"]
    assert result.problems[0].problem_id != result.problems[1].problem_id
    assert result.problems[0].meta["question_id"] == result.problems[1].meta["question_id"]
    assert _reasons(result) == {3: "duplicate", 4: "invalid_value", 5: "invalid_value", 6: "wrong_type",
                                7: "wrong_type", 8: "missing_field", 9: "wrong_type"}
    assert result.rows_read == len(rows)


def test_processbench_unreadable_file_is_a_source_error(tmp_path):
    (tmp_path / "a.json").write_text('{"id": 1}')
    (tmp_path / "b.json").write_text("[{")
    for name in ("a.json", "b.json"):
        with pytest.raises(SourceError, match=name):
            load_source(FileSource(kind="processbench", path=str(tmp_path / name)))


def test_user_jsonl_configurable_fields(tmp_path):
    path = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"prompt": "What is 6*7?", "target": 42, "source": "mine", "split": "x"}),  # number answer
            json.dumps({"prompt": "Capital of France?", "target": "Paris", "difficulty": 1}),
            '{"prompt": "nan?", "target": NaN}',
            json.dumps({"prompt": "empty?", "target": ""}),
            json.dumps({"prompt": "bool?", "target": True}),
            json.dumps({"question": "wrong field", "answer": "1"}),
        ],
    )
    src = FileSource(kind="jsonl", path=path, split="dev", question_field="prompt", answer_field="target")
    result = load_source(src)
    assert [(p.answer, p.split, p.source) for p in result.problems] == [("42", "dev", "jsonl"),
                                                                         ("Paris", "dev", "jsonl")]
    # Extra columns are meta, even ones named like Problem fields.
    assert result.problems[0].meta == {"source": "mine", "split": "x"}
    assert _reasons(result) == {3: "unparseable_answer", 4: "unparseable_answer", 5: "wrong_type",
                                6: "missing_field"}


def test_user_parquet(tmp_path):
    path = tmp_path / "mine.parquet"
    table = pa.table({"q": ["A?", "B?", None, "  ", "A?"], "a": ["1", None, "3", "4", "5"], "note": list("vwxyz")})
    pq.write_table(table, path, row_group_size=2)
    result = load_source(FileSource(kind="parquet", path=str(path), question_field="q", answer_field="a"))
    assert [(p.question, p.answer, p.meta) for p in result.problems] == [("A?", "1", {"note": "v"})]
    assert _reasons(result) == {2: "missing_field", 3: "missing_field", 4: "empty_question", 5: "duplicate"}
    limited = load_source(FileSource(kind="parquet", path=str(path), question_field="q", answer_field="a", limit=1))
    assert limited.rows_read == 1
    with pytest.raises(SourceError, match="no column 'question'"):
        load_source(FileSource(kind="parquet", path=str(path)))


def test_duplicates_across_sources_share_one_check(tmp_path):
    rows = [json.dumps({"question": f"Q{i}", "answer": f"#### {i}"}) for i in range(3)]
    path = _write_jsonl(tmp_path / "g.jsonl", rows)
    (_, a), (_, b) = load_sources([FileSource(kind="gsm8k", path=path), FileSource(kind="gsm8k", path=path)])
    assert len(a.problems) == 3 and a.quarantined == []
    assert b.problems == [] and [q.reason for q in b.quarantined] == ["duplicate"] * 3


def test_load_source_rejects_toy():
    with pytest.raises(ValueError, match="toy_world.generate_problems"):
        load_source(ToySource())


def test_write_quarantine_atomic_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", ["{oops", json.dumps({"question": "Q"})])
    rows = load_source(FileSource(kind="gsm8k", path=path)).quarantined
    out = write_quarantine(rows, tmp_path / "out" / "quarantine.jsonl")
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(w["line"], w["reason"]) for w in written] == [(1, "invalid_json"), (2, "missing_field")]
    assert set(written[0]) >= {"source", "line", "reason", "raw", "detail"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["quarantine.jsonl"]  # no temp file left behind


# ------------------------------------------------------------------------------------------------------- CLI


def test_ingest_command(tmp_path):
    from prm_factory.cli import app

    data = _write_jsonl(tmp_path / "mine.jsonl", [json.dumps({"question": "Q1", "answer": "1"}), "{bad"])
    config = tmp_path / "c.yaml"
    config.write_text(
        "name: ingest-test\n"
        f"sources:\n  - kind: jsonl\n    path: {data}\n  - kind: jsonl\n    path: {data}\n"
        "policy:\n  model_path: /not/on/this/machine\n  backend: transformers\n"  # ingest does not need the model
    )
    out = tmp_path / "ingest"
    result = CliRunner().invoke(app, ["ingest", "--config", str(config), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kept"] == 1 and summary["quarantined"] == 3
    assert summary["sources"][1]["reasons"] == {"duplicate": 1, "invalid_json": 1}
    table = pq.read_table(out / "problems.parquet")
    assert table.column_names == ["problem_id", "source", "question", "answer", "split", "meta"]
    assert json.loads(table.column("meta")[0].as_py()) == {}
    assert len((out / "quarantine.jsonl").read_text().splitlines()) == 3

    config.write_text(config.read_text().replace(data, str(tmp_path / "missing.jsonl"), 1))
    result = CliRunner().invoke(app, ["ingest", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 2 and "missing.jsonl" in result.output
