"""Shard identity and integrity (issue 12): stale or corrupted shards are rebuilt, never blessed; `verify`.

The engine tests build a 4-problem JSONL source (one problem per shard) with the shipped toy policy on the
transformers backend (newline steps, no tree, N = 1), against the session's reference build (conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from configs.schema import REPO_ROOT, parse_config
from tasks.build import build
from tasks.io import completion_path, read_provenance, shard_path
from tasks.store.dataset import (
    SCHEMA_VERSION,
    DatasetError,
    read_dataset,
    read_manifest,
    verify_dataset,
    write_manifest,
    write_shard,
)
from tasks.store.relabel import relabel_dataset
from tasks.store.versions import ReusableShard, link_shard, verify_path, version_dir, write_latest
from tests.integrity_helpers import build_config, problem_counts, rows_digest, toy_questions, write_jsonl


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prm_factory.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


# -- verify on synthetic datasets (no engine) -----------------------------------------------------------------


def row(pid: str, shard: int, eta: float = 1.0) -> dict:
    return {
        "prompt": f"q {pid}\n", "completions": ["a", "b"], "labels": [True, False], "successes": [2, 0],
        "rollouts": [2, 1], "soft_labels": [1.0, 0.0], "er_labels": [1.0, 0.0], "tree_value": [1.0, 0.0],
        "eta": eta,
        "step_entropies": [0.1, 1.5], "entropy_kind": "exact", "problem_id": pid, "source": "toy",
        "split": "train", "policy_model": "m", "partitioner": "newline", "partitioner_params": "{}",
        "step_origin": ["rollout", "final"], "answer": "1", "final_correct": False, "prompt_tokens": 3,
        "completion_tokens": 4, "rollout_tokens": 5, "tree_id": "t", "shard": shard,
    }


def make_dataset(out: Path, keys: list[str], parents: list[str] | None = None, extra: dict | None = None) -> dict:
    infos = [write_shard(out, i, [row(f"p-{k}", i)], {"shard_key": k, "schema_version": SCHEMA_VERSION}) for i, k in
             enumerate(keys)]
    return write_manifest(out, schema_version=SCHEMA_VERSION, config_hash="c", code_version="0", shards=infos,
                          parents=parents or [], extra={"shard_keys": keys, **(extra or {})})


def test_completion_record_is_written_after_the_shard_with_its_key_and_hash(tmp_path):
    info = write_shard(tmp_path, 4, [row("a", 4)], {"shard_key": "k4"})
    record = json.loads(completion_path(tmp_path, 4).read_text())
    assert record == {"index": 4, "key": "k4", "sha256": info.sha256, "bytes": info.bytes, "rows": 1,
                      "schema_version": SCHEMA_VERSION}


def test_verify_names_a_flipped_byte_and_read_dataset_refuses_it(tmp_path):
    make_dataset(tmp_path, ["k0", "k1", "k2"])
    assert verify_path(tmp_path)["ok"]
    # Inside the row's own text (a data page), so the file still reads: the damage is silent without the hash.
    flip_byte(shard_path(tmp_path, 1), shard_path(tmp_path, 1).read_bytes().index(b"q p-k1") + 2)
    report = verify_path(tmp_path)
    assert not report["ok"] and report["datasets"][0]["bad_shards"] == ["shards/part-00001.parquet"]
    with pytest.raises(DatasetError, match="part-00001.parquet: sha256"):
        read_dataset(tmp_path)
    assert read_dataset(tmp_path, verify=False).num_rows in (2, 3)  # opting out reads what is there


def test_verify_catches_a_shard_whose_key_is_not_the_manifests(tmp_path):
    """The issue's stale manifest: shard 0's file holds rows of another key than the manifest lists."""
    make_dataset(tmp_path, ["k0", "k1"])
    manifest = read_manifest(tmp_path)
    manifest["extra"]["shard_keys"][0] = "planned-later"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_dataset(tmp_path)
    assert problems == ["key mismatch: shards/part-00000.parquet holds rows of shard key 'k0', "
                        "manifest plans 'planned-later'"]


def test_verify_cli_exit_codes_and_json(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    make_dataset(good, ["k0", "k1"])
    make_dataset(bad, ["k0", "k1"])
    flip_byte(shard_path(bad, 0), 10)
    ok = cli("verify", str(good), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["datasets"][0]["rows"] == 2
    failed = cli("verify", str(bad))
    assert failed.returncode == 1
    assert "BAD" in failed.stderr and "shards/part-00000.parquet" in failed.stderr
    assert "part-00001" not in failed.stderr
    nothing = cli("verify", str(tmp_path / "empty-dir"))
    assert nothing.returncode == 2


def test_verify_a_refresh_root_every_version_and_the_hard_links(tmp_path):
    root = tmp_path / "root"
    v1 = version_dir(root, "0001-aaaa")
    make_dataset(v1, ["k0", "k1"])
    write_latest(root, "0001-aaaa")
    v2 = version_dir(root, "0002-bbbb")
    sha = read_manifest(v1)["shards"][0]["sha256"]
    assert link_shard(ReusableShard(0, "k0", 0, shard_path(v1, 0), sha), v2) == "link"
    new = write_shard(v2, 1, [row("p-k9", 1)], {"shard_key": "k9"})
    from tasks.store.dataset import shard_info

    lineage = {"version": "0002-bbbb", "parent": "0001-aaaa",
               "reused_shards": [{"index": 0, "parent_index": 0, "key": "k0", "how": "link"}]}
    write_manifest(v2, schema_version=SCHEMA_VERSION,
                   config_hash="c", code_version="0", shards=[shard_info(v2, 0), new],
                   parents=["0001-aaaa"], extra={"shard_keys": ["k0", "k9"], "lineage": lineage})
    write_latest(root, "0002-bbbb")
    (version_dir(root, "0003-cccc") / "shards").mkdir(parents=True)  # an interrupted refresh

    report = verify_path(root)
    assert report["kind"] == "root" and report["ok"], report
    assert [(d["version"], d["complete"], d["ok"]) for d in report["datasets"]] == [
        ("0001-aaaa", True, True), ("0002-bbbb", True, True), ("0003-cccc", False, True)]
    assert os.stat(shard_path(v1, 0)).st_ino == os.stat(shard_path(v2, 0)).st_ino

    flip_byte(shard_path(v1, 0))  # one byte, two versions: the file is hard-linked
    report = verify_path(root)
    assert not report["ok"]
    assert {d["version"]: d["bad_shards"] for d in report["datasets"]} == {
        "0001-aaaa": ["shards/part-00000.parquet"], "0002-bbbb": ["shards/part-00000.parquet"], "0003-cccc": []}
    out = cli("verify", str(root))
    assert out.returncode == 1 and "0001-aaaa" in out.stderr and "0002-bbbb" in out.stderr


def test_link_shard_refuses_a_parent_file_with_another_key(tmp_path):
    """A manifest written by the old code could list key K for a file holding other rows: never reused."""
    from tasks.store.versions import VersionError

    parent = tmp_path / "p"
    make_dataset(parent, ["k0"])
    sha = read_manifest(parent)["shards"][0]["sha256"]
    with pytest.raises(VersionError, match="holds rows for shard key 'k0'"):
        link_shard(ReusableShard(0, "other", 0, shard_path(parent, 0), sha), tmp_path / "child")
    assert not shard_path(tmp_path / "child", 0).exists()


def test_relabel_refuses_a_folder_it_did_not_write(tmp_path):
    src = tmp_path / "src"
    make_dataset(src, ["k0", "k1"])
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and was not started by this relabel"):
        relabel_dataset(src, out, 2.0)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    result = cli("relabel", str(src), "--eta", "2", "--out", str(out))
    assert result.returncode == 2 and "not started by this relabel" in result.stderr
    # --rollouts on rows that do not count the solution among the N (2 of 2 won, its own answer wrong): refused.
    result = cli("relabel", str(src), "--rollouts", "1", "--out", str(tmp_path / "fewer"))
    assert result.returncode == 2 and "cannot hold the solution's own wrong answer" in result.stderr
    assert cli("relabel", str(src), "--out", str(tmp_path / "nothing")).returncode == 2
    # Its own interrupted folder (marker present, no manifest) is resumed, not refused.
    mine = tmp_path / "mine"
    relabel_dataset(src, mine, 2.0)
    (mine / "manifest.json").unlink()
    shard_path(mine, 1).unlink()
    assert relabel_dataset(src, mine, 2.0)["num_rows"] == 2 and verify_dataset(mine) == []
    assert json.loads(completion_path(mine, 0).read_text())["key"] is None  # no build can claim these rows


# -- real builds (transformers engine) ------------------------------------------------------------------------


@pytest.mark.slow
def test_source_changed_between_crash_and_resume(tmp_path, integrity_engine, integrity_reference):
    """Issue repro 1: crash after shard 0, a problem added at the top of the source, resume: no stale shard."""
    questions = toy_questions(4)
    source = write_jsonl(tmp_path / "problems.jsonl", questions[1:])
    cfg = parse_config(build_config(source))
    out = tmp_path / "ds"
    build(cfg, out, lambda: integrity_engine)
    for path in (shard_path(out, 1), completion_path(out, 1), out / "manifest.json"):  # the crash
        path.unlink()
    write_jsonl(source, questions)  # a problem added at the top: every shard's problems move
    report = build(parse_config(build_config(source)), out, lambda: integrity_engine)
    assert 0 in report.rebuilt and "planned key" in report.rebuilt[0]
    assert report.shards_skipped == 0 and report.shards_built == 4
    table = read_dataset(out)
    assert problem_counts(table) == integrity_reference["counts"], "no problem twice, none missing"
    assert rows_digest(table) == integrity_reference["digest"]
    assert verify_dataset(out) == []
    keys = read_manifest(out)["extra"]["shard_keys"]
    assert [read_provenance(shard_path(out, i))["shard_key"] for i in range(4)] == keys


@pytest.mark.slow
def test_flipped_byte_is_named_by_verify_and_rebuilt_by_next_build(tmp_path, integrity_engine, integrity_reference):
    """Issue repro 2: one flipped byte; verify names the shard; a re-run rebuilds it instead of blessing it."""
    out = tmp_path / "ds"
    shutil.copytree(integrity_reference["dir"], out)
    flip_byte(shard_path(out, 1))
    result = cli("verify", str(out))
    assert result.returncode == 1 and "shards/part-00001.parquet" in result.stderr
    report = build(integrity_reference["cfg"], out, lambda: integrity_engine)
    assert set(report.rebuilt) == {1} and "sha256" in report.rebuilt[1]
    assert report.shards_skipped == 3 and report.shards_built == 1
    assert verify_dataset(out) == []
    assert rows_digest(read_dataset(out)) == integrity_reference["digest"]
    assert report.manifest["dataset_version"] == integrity_reference["version"], "the rebuilt shard has the same bytes"


@pytest.mark.slow
def test_relabelled_shards_in_a_build_folder_are_not_adopted(tmp_path, integrity_engine, integrity_reference):
    """Issue probe: relabel into an interrupted build folder is refused; relabelled files put there are rebuilt."""
    out = tmp_path / "ds"
    shutil.copytree(integrity_reference["dir"], out)
    (out / "manifest.json").unlink()
    shard_path(out, 2).unlink()  # an interrupted build
    with pytest.raises(DatasetError, match="not empty"):
        relabel_dataset(integrity_reference["dir"], out, 2.0)
    relabel_dataset(integrity_reference["dir"], tmp_path / "eta2", 2.0)
    for path in (shard_path, completion_path):  # the old behaviour: relabel wrote its shard into the folder
        shutil.copyfile(path(tmp_path / "eta2", 0), path(out, 0))
    report = build(integrity_reference["cfg"], out, lambda: integrity_engine)
    assert set(report.rebuilt) == {0} and report.shards_built == 2
    table = read_dataset(out)
    assert set(table.column("eta").to_pylist()) == {1.0}, "the rows say what build.json says"
    assert rows_digest(table) == integrity_reference["digest"] and verify_dataset(out) == []


@pytest.mark.slow
def test_over_long_question_is_one_rejected_problem(tmp_path, integrity_engine):
    """Issue probe: a question longer than the policy's context rejects that problem; the build goes on."""
    rows = toy_questions(1) + [{"question": "Start at 1. Apply in order: " + "+1, " * 60 + "+1.", "answer": "62"}]
    source = write_jsonl(tmp_path / "problems.jsonl", rows)
    config = build_config(source, name="too-long", dataset={"problems_per_shard": 2})
    report = build(parse_config(config), tmp_path / "ds", lambda: integrity_engine)
    assert report.rejected == 1 and report.rows >= 1
    rejects = (tmp_path / "ds" / "rejected" / "part-00000.jsonl").read_text().splitlines()
    rejected = [json.loads(line) for line in rejects]
    too_long = [r for r in rejected if r["reason"].startswith("prompt_too_long")]
    assert len(too_long) == 1 and "policy.max_model_len) is 128" in too_long[0]["reason"]
    kept = {r["problem_id"] for r in read_dataset(tmp_path / "ds").to_pylist()}
    assert too_long[0]["problem_id"] not in kept and len(kept) == 1
