"""Dataset versions: LATEST pointer, version ids, reuse planning and sha256-checked shard linking."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tasks.store.dataset import SCHEMA_VERSION, read_dataset, shard_info, shard_path, write_manifest, write_shard
from tasks.store.versions import (
    ReusableShard,
    VersionError,
    append_refresh_log,
    content_id,
    link_shard,
    next_version_id,
    plan_reuse,
    read_latest,
    read_refresh_log,
    version_dir,
    write_latest,
)


def row(problem_id: str, shard: int) -> dict:
    return {
        "prompt": f"q {problem_id}\n", "completions": ["a", "b"], "labels": [True, False], "successes": [2, 0],
        "rollouts": [2, 1], "soft_labels": [1.0, 0.0], "er_labels": [1.0, 0.0], "tree_value": [1.0, 0.0], "eta": 1.0,
        "step_entropies": [0.1, 1.5], "entropy_kind": "exact", "problem_id": problem_id, "source": "toy",
        "split": "train", "policy_model": "m", "partitioner": "edu", "partitioner_params": "{}",
        "step_origin": ["rollout", "final"], "answer": "1", "final_correct": False, "prompt_tokens": 3,
        "completion_tokens": 4, "rollout_tokens": 5, "tree_id": "t", "shard": shard,
    }


def make_version(root: Path, version_id: str, keys: list[str], schema_version: int = SCHEMA_VERSION) -> Path:
    """A complete version whose shard i holds one row for problem `p<key>` and is keyed `keys[i]`."""
    out = version_dir(root, version_id)
    infos = [write_shard(out, i, [row(f"p{k}", i)], {"shard_key": k}) for i, k in enumerate(keys)]
    write_manifest(out, schema_version=schema_version, config_hash="c", code_version="0", shards=infos, parents=[],
                   extra={"shard_keys": keys})
    return out


def test_latest_is_none_then_points_at_a_complete_version_only(tmp_path):
    assert read_latest(tmp_path) is None
    with pytest.raises(VersionError, match="not complete"):
        write_latest(tmp_path, "0001-aaaa")
    make_version(tmp_path, "0001-aaaa", ["k0"])
    write_latest(tmp_path, "0001-aaaa")
    assert read_latest(tmp_path) == "0001-aaaa"
    assert (tmp_path / "LATEST").read_text() == "0001-aaaa\n"
    assert not list(tmp_path.glob(".LATEST.tmp*"))  # the temp file was renamed, not left behind


def test_dangling_latest_is_an_error(tmp_path):
    (tmp_path / "LATEST").write_text("0009-gone\n")
    with pytest.raises(VersionError, match="0009-gone"):
        read_latest(tmp_path)


def test_next_version_id_counts_up_and_resumes_an_unfinished_plan(tmp_path):
    keys = ["a", "b"]
    suffix = content_id(keys)
    assert next_version_id(tmp_path, keys) == f"0001-{suffix}"
    make_version(tmp_path, f"0001-{suffix}", keys)
    assert next_version_id(tmp_path, keys) == f"0002-{suffix}"  # complete: a refresh of it starts a new one
    version_dir(tmp_path, f"0002-{content_id(['x'])}").mkdir(parents=True)  # unfinished, another plan
    assert next_version_id(tmp_path, ["x"]) == f"0002-{content_id(['x'])}"  # resumed
    assert next_version_id(tmp_path, keys) == f"0003-{suffix}"


def test_content_id_depends_on_keys_and_their_order():
    assert content_id(["a", "b"]) == hashlib.sha256(b"a\nb").hexdigest()[:8]
    assert content_id(["a", "b"]) != content_id(["b", "a"])


def test_plan_reuse_without_parent_labels_everything():
    plan = plan_reuse(None, None, ["a", "b", "c"])
    assert plan.label == [0, 1, 2] and plan.reuse == [] and not plan.up_to_date


def test_plan_reuse_grown_source_reuses_unchanged_shards(tmp_path):
    parent = make_version(tmp_path, "0001-x", ["k0", "k1", "k2-partial"])
    plan = plan_reuse("0001-x", parent, ["k0", "k1", "k2-full", "k3"])
    assert [(r.index, r.parent_index) for r in plan.reuse] == [(0, 0), (1, 1)]
    assert plan.label == [2, 3]
    assert plan.reuse[0].sha256 == shard_info(parent, 0).sha256
    assert not plan.up_to_date


def test_plan_reuse_same_keys_is_up_to_date_but_not_when_parent_has_more(tmp_path):
    parent = make_version(tmp_path, "0001-x", ["k0", "k1"])
    assert plan_reuse("0001-x", parent, ["k0", "k1"]).up_to_date
    shrunk = plan_reuse("0001-x", parent, ["k0"])  # a source lost problems: a new version without shard 1
    assert shrunk.label == [] and not shrunk.up_to_date
    moved = plan_reuse("0001-x", parent, ["k1", "k0"])  # same shards, other order: a rewrite, not up to date
    assert [(r.index, r.parent_index) for r in moved.reuse] == [(0, 1), (1, 0)] and not moved.up_to_date


def test_plan_reuse_never_reuses_a_parent_of_another_schema_version(tmp_path):
    parent = make_version(tmp_path, "0001-x", ["k0", "k1"], schema_version=SCHEMA_VERSION - 1)
    plan = plan_reuse("0001-x", parent, ["k0", "k1"])
    assert plan.reuse == [] and plan.label == [0, 1] and not plan.up_to_date


def test_link_shard_hard_links_and_checks_sha256(tmp_path):
    parent = make_version(tmp_path, "0001-x", ["k0"])
    src = shard_path(parent, 0)
    shard = ReusableShard(0, "k0", 0, src, shard_info(parent, 0).sha256)
    child = version_dir(tmp_path, "0002-y")
    assert link_shard(shard, child) == "link"
    dest = shard_path(child, 0)
    assert dest.stat().st_ino == src.stat().st_ino and dest.read_bytes() == src.read_bytes()


def test_link_shard_carries_the_shards_rejects(tmp_path):
    parent = make_version(tmp_path, "0001-x", ["k0", "k1"])
    (parent / "rejected").mkdir()
    (parent / "rejected" / "part-00001.jsonl").write_text('{"problem_id": "p9", "reason": "empty"}\n')
    shard = ReusableShard(0, "k1", 1, shard_path(parent, 1), shard_info(parent, 1).sha256)
    child = version_dir(tmp_path, "0002-y")
    link_shard(shard, child)
    assert (child / "rejected" / "part-00000.jsonl").read_text() == '{"problem_id": "p9", "reason": "empty"}\n'


def test_link_shard_refuses_a_parent_file_that_does_not_match_its_manifest(tmp_path):
    parent = make_version(tmp_path, "0001-x", ["k0"])
    shard = ReusableShard(0, "k0", 0, shard_path(parent, 0), "0" * 64)
    child = version_dir(tmp_path, "0002-y")
    with pytest.raises(VersionError, match="manifest says"):
        link_shard(shard, child)
    assert not shard_path(child, 0).exists()


def test_link_shard_to_another_index_rewrites_the_shard_column(tmp_path):
    parent = make_version(tmp_path, "0001-x", ["k0", "k1"])
    shard = ReusableShard(0, "k1", 1, shard_path(parent, 1), shard_info(parent, 1).sha256)
    child = version_dir(tmp_path, "0002-y")
    assert link_shard(shard, child) == "rewrite"
    rows = read_dataset(child).to_pylist()
    assert [(r["problem_id"], r["shard"]) for r in rows] == [("pk1", 0)]


def test_link_falls_back_to_copy_when_hard_links_fail(tmp_path, monkeypatch):
    parent = make_version(tmp_path, "0001-x", ["k0"])
    shard = ReusableShard(0, "k0", 0, shard_path(parent, 0), shard_info(parent, 0).sha256)

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    child = version_dir(tmp_path, "0002-y")
    assert link_shard(shard, child) == "copy"
    assert shard_path(child, 0).stat().st_ino != shard_path(parent, 0).stat().st_ino
    assert shard_path(child, 0).read_bytes() == shard_path(parent, 0).read_bytes()


def test_refresh_log_appends_records(tmp_path):
    append_refresh_log(tmp_path, {"status": "new_version", "version": "0001-x"})
    append_refresh_log(tmp_path, {"status": "up_to_date", "version": "0001-x"})
    log = read_refresh_log(tmp_path)
    assert [r["status"] for r in log] == ["new_version", "up_to_date"] and all("at" in r for r in log)
