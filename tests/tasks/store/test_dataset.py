"""The Parquet dataset contract: atomic shards, manifest, provenance, relabelling, and loading in every reader."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tasks.io import PROVENANCE_KEY, read_provenance, shard_path
from tasks.labelling.label_rule import er_label, step_labels
from tasks.store.dataset import (
    ROW_SCHEMA,
    SCHEMA_VERSION,
    DatasetError,
    read_dataset,
    read_manifest,
    rows_to_table,
    shard_done,
    shard_info,
    verify_dataset,
    write_manifest,
    write_shard,
)
from tasks.store.relabel import relabel, relabel_dataset, subsample_rollouts

PROVENANCE = {"config_hash": "abc123", "code_version": "test", "partitioner": {"name": "edu", "tau": 1.0}}


def make_row(i: int, successes: list[int], rollouts: list[int], final_correct: bool = True, eta: float = 1.0) -> dict:
    """A valid row whose last step is labelled by the final answer (as the labelling stage does)."""
    n = len(successes)
    origins = ["rollout"] * (n - 1) + ["final"] if n else []
    labels = step_labels(successes, rollouts, origins, eta, [None] * (n - 1) + [final_correct] if n else [])
    return {
        "prompt": f"What is {i} + {i}?\n",
        "completions": [f"step {j} of problem {i}\n" for j in range(n)],
        "labels": labels.hard_list(),
        "successes": successes,
        "rollouts": rollouts,
        "soft_labels": labels.soft_list(),
        "er_labels": labels.er_list(),
        "tree_value": labels.soft_list(),
        "eta": eta,
        "step_entropies": [1.0 + 0.25 * j for j in range(n)],
        "entropy_kind": "exact",
        "problem_id": f"p{i:04d}",
        "source": "toy",
        "split": "train",
        "policy_model": "assets/toy-policy",
        "partitioner": "edu",
        "partitioner_params": json.dumps({"tau": 1.0}),
        "step_origin": origins,
        "answer": str(2 * i),
        "final_correct": final_correct,
        "prompt_tokens": 10 + i,
        "completion_tokens": 20 + i,
        "rollout_tokens": 300 + i,
        "tree_id": f"p{i:04d}-tree",
    }


ROWS_A = [
    make_row(0, [3, 1, 0, 1], [4, 4, 4, 1], final_correct=True),
    make_row(1, [4, 2, 1], [4, 4, 4], final_correct=False),
    make_row(2, [1], [1], final_correct=True),
]
ROWS_B = [make_row(3, [0, 0], [16, 1], final_correct=False), make_row(4, [16, 8, 1], [16, 16, 1], True)]


@pytest.fixture
def dataset_dir(tmp_path):
    """A complete two-shard dataset with a manifest (5 rows, 12 steps)."""
    root = tmp_path / "ds"
    infos = [write_shard(root, 0, ROWS_A, PROVENANCE), write_shard(root, 1, ROWS_B, PROVENANCE)]
    write_manifest(
        root,
        schema_version=SCHEMA_VERSION,
        config_hash="abc123",
        code_version="test",
        shards=infos,
        parents=[],
        extra={"note": "fixture"},
    )
    return root


N_ROWS = len(ROWS_A) + len(ROWS_B)
N_STEPS = sum(len(r["labels"]) for r in ROWS_A + ROWS_B)
ALL_SUCCESSES = [r["successes"] for r in ROWS_A + ROWS_B]


def _flat(table: pa.Table, column: str) -> list[float]:
    return [x for row in table.column(column).to_pylist() for x in row]


# -- shards --------------------------------------------------------------------------------------------------


def test_round_trip(dataset_dir):
    table = read_dataset(dataset_dir)
    assert table.schema.equals(ROW_SCHEMA)
    expected = [{**r, "shard": 0} for r in ROWS_A] + [{**r, "shard": 1} for r in ROWS_B]
    assert table.to_pylist() == expected
    assert N_ROWS == 5 and N_STEPS == 13


def test_schema_is_a_superset_of_trl_stepwise_supervision():
    assert ROW_SCHEMA.field("prompt").type == pa.string()
    assert ROW_SCHEMA.field("completions").type == pa.list_(pa.string())
    assert ROW_SCHEMA.field("labels").type == pa.list_(pa.bool_())


def test_shard_info_and_done(tmp_path):
    info = write_shard(tmp_path, 3, ROWS_A, PROVENANCE)
    assert info.path == tmp_path / "shards" / "part-00003.parquet" == shard_path(tmp_path, 3)
    assert info.rows == 3 and info.bytes == info.path.stat().st_size
    assert shard_done(tmp_path, 3) and not shard_done(tmp_path, 4)
    assert shard_info(tmp_path, 3) == info


def test_same_rows_give_identical_bytes(tmp_path):
    a = write_shard(tmp_path / "a", 0, ROWS_A, PROVENANCE)
    b = write_shard(tmp_path / "b", 0, ROWS_A, PROVENANCE)
    assert a.sha256 == b.sha256 and a.path.read_bytes() == b.path.read_bytes()


def test_kill_before_rename_leaves_no_shard_and_rerun_is_identical(tmp_path, monkeypatch):
    reference = write_shard(tmp_path / "reference", 0, ROWS_A, PROVENANCE)
    root = tmp_path / "ds"
    seen_temp = []

    def killed(src, dst):
        seen_temp.append((os.path.basename(src), os.path.getsize(src)))  # the temp file was fully written
        raise KeyboardInterrupt("killed before rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_shard(root, 0, ROWS_A, PROVENANCE)
    monkeypatch.undo()

    assert seen_temp and seen_temp[0][0].startswith(".part-00000.parquet.tmp-")
    assert seen_temp[0][1] == reference.bytes
    assert not shard_path(root, 0).exists()
    assert list((root / "shards").iterdir()) == []  # the temp file went too
    assert shard_done(root, 0) is False

    info = write_shard(root, 0, ROWS_A, PROVENANCE)
    assert shard_done(root, 0)
    assert info.sha256 == reference.sha256


def test_sigkill_leftover_is_ignored_and_cleaned(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    leftover = shards / ".part-00000.parquet.tmp-999-deadbeef"
    leftover.write_bytes(b"PAR1 half a file")
    assert shard_done(tmp_path, 0) is False
    assert not leftover.exists()
    assert read_dataset(tmp_path).num_rows == 0


def test_empty_shard_is_a_valid_shard(tmp_path):
    info = write_shard(tmp_path, 0, [], PROVENANCE)  # every problem of the shard was quarantined
    assert info.rows == 0 and shard_done(tmp_path, 0)
    assert read_dataset(tmp_path).schema.equals(ROW_SCHEMA)


def test_corrupt_final_file_is_not_done(tmp_path):
    p = shard_path(tmp_path, 0)
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not parquet")
    assert shard_done(tmp_path, 0) is False


def test_provenance_in_schema_metadata(dataset_dir):
    path = shard_path(dataset_dir, 1)
    assert read_provenance(path) == PROVENANCE
    raw = pq.read_schema(path).metadata[PROVENANCE_KEY]
    assert json.loads(raw)["partitioner"] == {"name": "edu", "tau": 1.0}


# -- validation ----------------------------------------------------------------------------------------------


def _broken(**changes) -> list[dict]:
    row = {**make_row(0, [1, 1], [2, 1]), **changes}
    return [make_row(1, [1], [1]), row]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{k: v for k, v in make_row(0, [1], [1]).items() if k != "eta"}], r"missing columns \['eta'\]"),
        ([{**make_row(0, [1], [1]), "label": [True]}], r"unknown columns \['label'\]"),
        (_broken(labels="yes"), r"row 1: column 'labels' expects list<item: bool>"),
        (_broken(prompt_tokens="ten"), r"row 1: column 'prompt_tokens'"),
        (_broken(successes=[1, 2**40]), r"row 1: column 'successes'"),
        (_broken(prompt=None), r"row 1: column 'prompt' is null"),
        (_broken(completions=["a", None]), r"row 1: column 'completions' holds a null"),
        (_broken(er_labels=[0.5]), r"row 1: step columns differ in length"),
        (_broken(successes=[3, 1]), r"row 1 step 0: columns 'successes'/'rollouts'"),
        ([make_row(0, [], [])], r"row 0: column 'completions' is empty"),
    ],
)
def test_rows_are_validated_with_the_column_named(tmp_path, rows, match):
    with pytest.raises(DatasetError, match=match):
        write_shard(tmp_path, 0, rows, {})
    assert not shard_path(tmp_path, 0).exists()


def test_nullable_columns_and_nan_entropy(tmp_path):
    row = {**make_row(0, [1], [1]), "answer": None, "final_correct": None, "tree_id": None}
    row["step_entropies"] = [float("nan")]
    write_shard(tmp_path, 0, [row], {})
    out = read_dataset(tmp_path).to_pylist()[0]
    assert out["answer"] is None and out["final_correct"] is None and np.isnan(out["step_entropies"][0])


def test_shard_column_must_match(tmp_path):
    with pytest.raises(DatasetError, match="column 'shard' is 2 but this is shard 0"):
        write_shard(tmp_path, 0, [{**make_row(0, [1], [1]), "shard": 2}], {})
    with pytest.raises(DatasetError, match="provenance"):
        write_shard(tmp_path, 0, [make_row(0, [1], [1])], {"bad": object()})


# -- manifest ------------------------------------------------------------------------------------------------


def test_manifest_contents(dataset_dir):
    m = read_manifest(dataset_dir)
    assert m["schema_version"] == SCHEMA_VERSION and m["config_hash"] == "abc123" and m["code_version"] == "test"
    assert m["num_rows"] == N_ROWS and m["num_shards"] == 2
    assert [(s["path"], s["rows"]) for s in m["shards"]] == [
        ("shards/part-00000.parquet", 3),
        ("shards/part-00001.parquet", 2),
    ]
    assert m["shards"][0]["sha256"] == shard_info(dataset_dir, 0).sha256
    assert len(m["dataset_version"]) == 16 and m["parents"] == [] and m["extra"] == {"note": "fixture"}
    assert m["created_at"].endswith("+00:00")
    assert m["columns"]["labels"] == "list<item: bool>"
    assert verify_dataset(dataset_dir) == []


def test_dataset_version_depends_only_on_shards(dataset_dir, tmp_path):
    infos = [shard_info(dataset_dir, 1), shard_info(dataset_dir, 0)]  # order does not matter
    m = write_manifest(
        dataset_dir, schema_version=SCHEMA_VERSION, config_hash="other", code_version="x", shards=infos,
        parents=["p"], extra={}
    )
    assert m["dataset_version"] == read_manifest(dataset_dir)["dataset_version"]
    other = write_shard(tmp_path / "other", 0, ROWS_B, PROVENANCE)
    m2 = write_manifest(
        tmp_path / "other",
        schema_version=SCHEMA_VERSION,
        config_hash="c",
        code_version="x",
        shards=[other],
        parents=[m["dataset_version"]],
        extra={},
    )
    assert m2["dataset_version"] != m["dataset_version"] and m2["parents"] == [m["dataset_version"]]


def test_manifest_rejects_outside_shards(dataset_dir, tmp_path):
    outside = write_shard(tmp_path / "elsewhere", 0, ROWS_B, PROVENANCE)
    with pytest.raises(DatasetError, match="not inside"):
        write_manifest(
            dataset_dir, schema_version=SCHEMA_VERSION, config_hash="c", code_version="x", shards=[outside],
            parents=[], extra={}
        )


def test_relative_dataset_dir_gives_root_relative_manifest_paths(tmp_path, monkeypatch):
    """A dataset written to a path relative to the working directory lists its shards relative to its root."""
    monkeypatch.chdir(tmp_path)
    rel = Path("runs") / "ds"
    info = write_shard(rel, 0, ROWS_A, PROVENANCE)
    m = write_manifest(rel, schema_version=SCHEMA_VERSION,
                       config_hash="c", code_version="x", shards=[info], parents=[], extra={})
    assert [s["path"] for s in m["shards"]] == ["shards/part-00000.parquet"]
    assert verify_dataset(rel) == [] and verify_dataset(tmp_path / rel) == []
    assert read_dataset(tmp_path / rel).num_rows == 3


def test_verify_catches_tampered_shard(dataset_dir, tmp_path):
    tampered = write_shard(tmp_path / "t", 0, [make_row(9, [1], [1])], PROVENANCE)
    shard_path(dataset_dir, 0).write_bytes(tampered.path.read_bytes())
    problems = verify_dataset(dataset_dir)
    assert len(problems) == 1 and problems[0].startswith("sha256 mismatch: shards/part-00000.parquet")


def test_verify_catches_missing_and_extra_shards(dataset_dir):
    shard_path(dataset_dir, 1).unlink()
    write_shard(dataset_dir, 7, ROWS_B, PROVENANCE)
    assert verify_dataset(dataset_dir) == [
        "missing shard: shards/part-00001.parquet",
        "extra shard not in manifest: shards/part-00007.parquet",
    ]


def test_verify_without_manifest(tmp_path):
    write_shard(tmp_path, 0, ROWS_A, PROVENANCE)
    assert verify_dataset(tmp_path) == [f"missing manifest: {tmp_path / 'manifest.json'}"]
    assert read_dataset(tmp_path).num_rows == 3  # an unfinished run still reads its complete shards


# -- relabel -------------------------------------------------------------------------------------------------


def test_relabel_recomputes_er_and_keeps_final(dataset_dir):
    table = read_dataset(dataset_dir)
    out = relabel(table, 5.0)
    assert out.column("eta").to_pylist() == [5.0] * N_ROWS
    er = out.column("er_labels").to_pylist()
    # row 0: successes [3, 1, 0, 1] of [4, 4, 4, 1], final step correct
    assert er[0] == pytest.approx([er_label(3, 4, 5.0), er_label(1, 4, 5.0), 0.0, 1.0], abs=1e-15)
    assert er[0][0] == pytest.approx(np.log(0.25 + 0.75 * np.exp(5.0)) / 5.0, abs=1e-15)
    # row 1: final answer wrong: the last step stays 0.0 although its counts say 1/4
    assert er[1][-1] == 0.0 and er[1][:2] == pytest.approx([1.0, er_label(2, 4, 5.0)], abs=1e-15)
    # row 4: [16, 8, 1] of [16, 16, 1]
    assert er[4] == pytest.approx([1.0, er_label(8, 16, 5.0), 1.0], abs=1e-15)
    # everything else is untouched, and relabelling back restores the stored labels
    for name in ROW_SCHEMA.names:
        if name not in ("er_labels", "eta"):
            assert out.column(name).equals(table.column(name)), name
    back = relabel(out, 1.0)
    assert _flat(back, "er_labels") == pytest.approx(_flat(table, "er_labels"), abs=1e-15)
    assert back.schema.equals(ROW_SCHEMA)


def test_relabel_sliced_and_chunked_tables(dataset_dir):
    table = read_dataset(dataset_dir)
    assert table.column("successes").num_chunks == 2
    sliced = table.slice(1, 3)
    out = relabel(sliced, 2.0).column("er_labels").to_pylist()
    assert out == relabel(table, 2.0).column("er_labels").to_pylist()[1:4]
    assert out[0] == pytest.approx([1.0, er_label(2, 4, 2.0), 0.0], abs=1e-15)
    assert relabel(ROW_SCHEMA.empty_table(), 2.0).num_rows == 0


def test_relabel_needs_rollouts_for_non_final_steps():
    row = make_row(0, [1, 1], [1, 1], final_correct=True)
    row["successes"], row["rollouts"] = [0, 1], [0, 1]  # step 0 claims a rollout origin with N = 0
    with pytest.raises(DatasetError, match="'rollout' step needs rollouts >= 1, got 0"):
        rows_to_table([{**row, "shard": 0}])
    table = pa.Table.from_pylist([{**row, "shard": 0}], schema=ROW_SCHEMA)  # unvalidated: relabel checks too
    with pytest.raises(ValueError, match="N"):
        relabel(table, 1.0)


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**r, "shard": 0} for r in rows], schema=ROW_SCHEMA)


def test_subsample_rollouts_keeps_the_own_outcome_and_draws_the_rest():
    # Row 0's solution is right: step 0 won 16 of 16 (every draw wins), step 1 only its own outcome (1 of 16:
    # every fresh rollout lost), step 2 won 8 = own + 7 of the 15 fresh. Row 1's solution is wrong: step 0 lost all.
    rows = [make_row(0, [16, 1, 8, 1], [16, 16, 16, 1], final_correct=True),
            make_row(1, [0, 5, 0], [16, 16, 1], final_correct=False)]
    drawn = [subsample_rollouts(_table(rows), 4, seed).to_pylist() for seed in range(400)]
    for out in drawn:
        assert out[0]["rollouts"] == [4, 4, 4, 1] and out[1]["rollouts"] == [4, 4, 1]
        assert out[0]["successes"][:2] == [4, 1] and out[1]["successes"][0] == 0
        assert out[0]["successes"][3] == 1 and out[1]["successes"][2] == 0  # the final step keeps the outcome
        assert 1 <= out[0]["successes"][2] <= 4 and 0 <= out[1]["successes"][1] <= 3
        labels = step_labels(out[0]["successes"], out[0]["rollouts"], out[0]["step_origin"], 1.0,
                             [None, None, None, True])
        assert out[0]["labels"] == labels.hard_list() and out[0]["er_labels"] == labels.er_list()
        assert out[0]["soft_labels"][2] == out[0]["successes"][2] / 4
    # A hypergeometric draw of 3 from 15 holding 7 successes: mean 1.4, so k averages 2.4 (its sd over 400
    # draws is about 0.04); 3 from 15 holding 5 (row 1, own outcome lost): mean 1.0.
    assert statistics.mean(o[0]["successes"][2] for o in drawn) == pytest.approx(2.4, abs=0.15)
    assert statistics.mean(o[1]["successes"][1] for o in drawn) == pytest.approx(1.0, abs=0.15)
    assert {o[0]["successes"][2] for o in drawn} == {1, 2, 3, 4}
    # The same seed draws the same; tokens: the solution's plus 3/15 of the fresh rollouts' (300 - 20 = 280).
    assert drawn[7] == subsample_rollouts(_table(rows), 4, 7).to_pylist()
    assert drawn[0][0]["rollout_tokens"] == 20 + round(280 * 3 / 15)
    same = subsample_rollouts(_table(rows), 16, 0).to_pylist()
    assert [r["successes"] for r in same] == [r["successes"] for r in rows]
    assert [r["er_labels"] for r in same] == [r["er_labels"] for r in rows]


def test_relabel_dataset_with_fewer_rollouts_writes_a_seeded_child_version(tmp_path):
    src = tmp_path / "ms8"
    shards = [[make_row(0, [8, 5, 1], [8, 8, 1]), make_row(1, [3, 0, 0], [8, 8, 1], final_correct=False)],
              [make_row(2, [7, 4, 2, 1], [8, 8, 8, 1])]]
    infos = [write_shard(src, i, rows, PROVENANCE) for i, rows in enumerate(shards)]
    parent = write_manifest(src, schema_version=SCHEMA_VERSION, config_hash="abc123", code_version="test",
                            shards=infos, parents=[], extra={"cost": {"rollout_tokens": 900}})
    child = relabel_dataset(src, tmp_path / "ms4", rollouts=4, seed=3)
    assert verify_dataset(tmp_path / "ms4") == [] and child["parents"] == [parent["dataset_version"]]
    assert child["extra"]["cost"] == {"rollout_tokens": 900}  # what was spent stays the parent's
    table = read_dataset(tmp_path / "ms4")
    assert [r["rollouts"] for r in table.to_pylist()] == [[4, 4, 1], [4, 4, 1], [4, 4, 4, 1]]
    # Each row: solution 20 + i tokens, the rest the fresh rollouts', 3 of 7 kept.
    expected = [20 + i + round((300 + i - 20 - i) * 3 / 7) for i in range(3)]
    assert table.column("rollout_tokens").to_pylist() == expected
    assert child["extra"]["subsampled"] == {"rollouts": 4, "seed": 3, "expected_generated_tokens": sum(expected)}
    ks = [r["successes"] for r in table.to_pylist()]
    assert ks[0][0] == 4 and ks[1][1] == 0 and ks[1][2] == 0  # all won, all lost: decided
    assert read_provenance(shard_path(tmp_path / "ms4", 0))["subsampled_rollouts"] == 4
    # The same seed draws the same shards; with an η too, the ER labels are that η's.
    again = relabel_dataset(src, tmp_path / "again", rollouts=4, seed=3)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in child["shards"]]
    relabel_dataset(src, tmp_path / "both", eta=5.0, rollouts=4, seed=3)
    both = read_dataset(tmp_path / "both")
    assert both.column("successes").to_pylist() == ks
    assert both.column("er_labels").to_pylist() == relabel(table, 5.0).column("er_labels").to_pylist()
    with pytest.raises(DatasetError, match="needs a new eta, a smaller rollouts count, or both"):
        relabel_dataset(src, tmp_path / "none")


def test_relabel_dataset_with_fewer_rollouts_names_the_shard_it_refuses(dataset_dir, tmp_path):
    # The fixture's row 0 lost step 2's 4 of 4 although its own answer is right: not a Math-Shepherd build.
    with pytest.raises(DatasetError, match=r"shards/part-00000.parquet: row 0 step 2: 0 successes of 4 cannot "
                                           "hold the solution's own right answer"):
        relabel_dataset(dataset_dir, tmp_path / "out", rollouts=2)


@pytest.mark.parametrize(("rows", "n", "match"), [
    ([make_row(0, [3, 1], [4, 1]), make_row(0, [2, 1], [4, 1])], 2, "one row per problem"),
    ([make_row(0, [3, 1], [4, 1]), make_row(1, [2, 1], [8, 1])], 2, r"one N for every step, found \[4, 8\]"),
    ([make_row(0, [3, 1], [4, 1])], 5, r"n in 1..4"),
    ([make_row(0, [0, 1], [4, 1], final_correct=True)], 2, "cannot hold the solution's own right answer"),
])
def test_subsample_rollouts_refuses_tables_it_does_not_hold_for(rows, n, match):
    with pytest.raises(DatasetError, match=match):
        subsample_rollouts(_table(rows), n, 0)
    tree = make_row(0, [3, 1], [4, 1])
    tree["step_origin"] = ["tree", "final"]
    with pytest.raises(DatasetError, match="plain rollout steps only, found \\['tree'\\]"):
        subsample_rollouts(_table([tree]), 2, 0)


# -- interop: each library really reads the dataset ------------------------------------------------------------


@pytest.fixture
def glob_path(dataset_dir):
    # a leftover temp file from a killed writer sits beside the shards: no reader may pick it up
    (dataset_dir / "shards" / ".part-00002.parquet.tmp-1-00000000").write_bytes(b"PAR1 partial")
    return str(dataset_dir / "shards" / "*.parquet")


def test_interop_pandas(dataset_dir, glob_path):
    import pandas as pd

    df = pd.read_parquet(dataset_dir / "shards")
    assert len(df) == N_ROWS
    assert sorted([list(x) for x in df["successes"]]) == sorted(ALL_SUCCESSES)
    one = pd.read_parquet(shard_path(dataset_dir, 0))
    assert [bool(x) for x in one["labels"][0]] == ROWS_A[0]["labels"]


def test_interop_pyarrow(dataset_dir, glob_path):
    t = pq.read_table(shard_path(dataset_dir, 0))
    assert t.num_rows == 3 and t.column("labels").to_pylist()[0] == [True, True, False, True]
    ds = pads.dataset(dataset_dir / "shards", format="parquet")
    assert ds.count_rows() == N_ROWS
    assert sorted(ds.to_table(columns=["successes"]).column(0).to_pylist()) == sorted(ALL_SUCCESSES)
    assert pq.read_table(dataset_dir / "shards").num_rows == N_ROWS


def test_interop_hf_datasets(dataset_dir, glob_path, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("parquet", data_files=glob_path, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == N_ROWS
    assert sorted(ds["successes"]) == sorted(ALL_SUCCESSES)
    row = next(r for r in ds if r["problem_id"] == "p0000")
    assert row["labels"] == [True, True, False, True]
    assert row["er_labels"] == pytest.approx(ROWS_A[0]["er_labels"])
    assert {"prompt", "completions", "labels"} <= set(ds.column_names)


def test_interop_duckdb(glob_path):
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    count, steps = con.execute(f"SELECT count(*), sum(len(labels)) FROM read_parquet('{glob_path}')").fetchone()
    assert (count, steps) == (N_ROWS, N_STEPS)
    got = con.execute(f"SELECT successes FROM read_parquet('{glob_path}') ORDER BY problem_id").fetchall()
    assert [list(r[0]) for r in got] == ALL_SUCCESSES


def test_interop_polars(glob_path):
    pl = pytest.importorskip("polars")
    df = pl.read_parquet(glob_path).sort("problem_id")
    assert df.height == N_ROWS
    assert df["successes"].to_list() == ALL_SUCCESSES
    lazy = pl.scan_parquet(glob_path).select(pl.len(), pl.col("labels").list.len().sum()).collect()
    assert lazy.row(0) == (N_ROWS, N_STEPS)


# -- steps without a fixed-size policy sample: null soft/ER, real counts --------------------------------------


def _unsampled_row() -> dict:
    """Step 0 early-stopped at its first success (1 of 2 drawn), step 1 estimated by rule with the tree's
    single sample (0 of 1), step 2 sampled N = 4 times, step 3 the outcome."""
    row = make_row(7, [1, 0, 3, 1], [2, 1, 4, 1], final_correct=True)
    row["step_origin"] = ["early_stop", "estimated", "rollout", "final"]
    row["labels"] = [True, False, True, True]
    row["soft_labels"] = [None, None, 0.75, 1.0]
    row["er_labels"] = [None, None, er_label(3, 4, 1.0), 1.0]
    return {**row, "shard": 0}


def test_unsampled_steps_store_real_counts_and_null_soft_er(tmp_path):
    write_shard(tmp_path, 0, [_unsampled_row()], PROVENANCE)
    back = read_dataset(tmp_path).to_pylist()[0]
    assert back["successes"] == [1, 0, 3, 1] and back["rollouts"] == [2, 1, 4, 1]
    assert back["soft_labels"] == [None, None, 0.75, 1.0]
    assert back["labels"] == [True, False, True, True]  # hard labels stay complete for TRL
    relabelled = relabel(read_dataset(tmp_path), 5.0).to_pylist()[0]["er_labels"]
    assert relabelled[:2] == [None, None]
    assert relabelled[2] == pytest.approx(er_label(3, 4, 5.0), abs=1e-15) and relabelled[3] == 1.0


@pytest.mark.parametrize("column, step, value, match", [
    ("soft_labels", 0, 0.5, "must be null exactly for"),  # an early-stop step claiming a soft label
    ("er_labels", 2, None, "must be null exactly for"),  # a sampled step without its ER label
    ("step_origin", 1, "guess", "unknown|expected one of"),
    # the stored labels must be the label rule's for the counts: 3 of 4 successes is a positive step ...
    ("labels", 2, False, r"row 0 step 2: column 'labels' is False, the label rule gives True for a 'rollout' step"),
    # ... whose ER label at eta 1 is ln(1/4 + 3e/4), and the final step's soft label is its outcome
    ("er_labels", 2, 0.5, r"row 0 step 2: column 'er_labels' is 0.5, the label rule gives 0.827988939242869"),
    ("soft_labels", 3, 0.0, r"row 0 step 3: column 'soft_labels' is 0.0, the label rule gives 1.0"),
    ("rollouts", 2, 0, r"row 0 step 2: need 0 <= k <= N|successes'/'rollouts' need 0 <= k <= N"),
])
def test_null_rule_is_enforced(column, step, value, match):
    row = _unsampled_row()
    row[column] = [*row[column][:step], value, *row[column][step + 1:]]
    with pytest.raises(DatasetError, match=match):
        rows_to_table([row])


def test_relabel_names_the_row_and_step_the_rule_refuses():
    good = _unsampled_row()
    bad = {**_unsampled_row(), "step_origin": ["early_stop", "guess", "rollout", "final"]}
    table = pa.Table.from_pylist([good, bad], schema=ROW_SCHEMA)  # unvalidated: relabel checks on its own
    with pytest.raises(DatasetError, match=r"row 1 step 1: unknown step origin 'guess'"):
        relabel(table, 2.0)
