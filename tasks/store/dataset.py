"""The Parquet dataset contract: the row schema, atomic shards, completion records, a manifest, verification.

A dataset version is one directory::

    shards/part-00000.parquet ...   one file per shard, each written whole or not at all
    manifest.json                   schema/config/code versions, rows and sha256 per shard, parents

Rows are a superset of TRL's stepwise-supervision format (``prompt``, ``completions``, ``labels``), plus
the rollout counts (k ``successes`` of N ``rollouts`` per step) from which ER-PRM (arXiv 2412.11006)
labels are recomputed for any η (tasks/store/relabel.py), the EDU-PRM (arXiv 2503.22233) step entropies and
partitioner provenance, and token costs. Partition values (``split``, ``source``, ``shard``) are plain
columns: HF ``datasets`` ignores hive directories. The files load as-is in pandas, pyarrow, HF
``datasets``, DuckDB and polars (tests/tasks/store/test_dataset.py runs each).

A shard exists under its final name only once complete (``tasks.io.atomic_write_bytes``: temp file in the
same directory, fsync, atomic rename, fsync of the directory; file names and provenance also live in
``tasks/io.py``). After it, a completion record ``completions/part-XXXXX.json`` (datatrove's
completion markers) is written the same way: the shard's key, sha256, bytes and rows as they were when the
bytes were written. A shard is done only when its record exists, names the planned key and the file still
hashes to the recorded sha256 (``check_shard``); the manifest's hashes come from those records, never from
whatever file is on disk at the end, so a corrupted or stale shard is rebuilt, not blessed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.io import (
    MANIFEST_NAME,
    atomic_write_bytes,
    atomic_write_json,
    completion_path,
    provenance_metadata,
    read_provenance,
    sha256_bytes,
    sha256_file,
    shard_files,
    shard_index,
    shard_path,
    temp_glob,
)
from tasks.labelling.label_rule import UNSAMPLED_ORIGINS, step_labels

SCHEMA_VERSION = 2  # 2: tree_value column; null soft/ER for early-stop and rule-estimated steps
NOT_WRITTEN = "not written yet"  # check_shard's reason for a shard with no file
# A build's (and a refresh version's) ingest, beside its shards (tasks/build.py writes them; named here, where
# verify reads them): the problems the shards were labelled from, and the counts with that file's sha256.
PROBLEMS_FILE = "problems.parquet"
INGEST_REPORT = "ingest.json"
PROBLEMS_SHA256 = "problems_sha256"  # the key in INGEST_REPORT
# A build's config (name, hash, code version, the whole config), written when the build claims the directory
# (tasks/build.py); the report and the export's dataset card read it. A relabelled or active-loop version has none.
BUILD_MARKER = "build.json"

ROW_SCHEMA = pa.schema(
    [
        # TRL stepwise supervision (trl<=1.13 PRMTrainer): one prompt, its steps, a hard label per step.
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("completions", pa.list_(pa.string()), nullable=False),
        pa.field("labels", pa.list_(pa.bool_()), nullable=False),
        # ER-PRM: per step, k of N completions sampled from the step prefix reached the right answer;
        # soft/ER labels derived from them, null where the counts are no fixed-size sample (early stop,
        # rule-estimated steps; see tasks.labelling.label_rule.step_labels).
        pa.field("successes", pa.list_(pa.int32()), nullable=False),
        pa.field("rollouts", pa.list_(pa.int32()), nullable=False),
        pa.field("soft_labels", pa.list_(pa.float64()), nullable=False),
        pa.field("er_labels", pa.list_(pa.float64()), nullable=False),
        # The generation tree's own value estimate per step (policy-probability-weighted sub-tree outcomes).
        pa.field("tree_value", pa.list_(pa.float64()), nullable=False),
        pa.field("eta", pa.float64(), nullable=False),
        # EDU-PRM: entropy (nats) at each step's first token, and how it was measured.
        pa.field("step_entropies", pa.list_(pa.float64()), nullable=False),
        pa.field("entropy_kind", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("policy_model", pa.string(), nullable=False),
        pa.field("partitioner", pa.string(), nullable=False),
        pa.field("partitioner_params", pa.string(), nullable=False),  # JSON
        # Per step: where the label came from: "rollout"/"tree" (N policy samples), "early_stop",
        # "estimated" (binary-search rule), "final" (the outcome). See tasks.labelling.label_rule.STEP_ORIGINS.
        pa.field("step_origin", pa.list_(pa.string()), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("final_correct", pa.bool_()),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
        pa.field("rollout_tokens", pa.int64(), nullable=False),  # generated tokens spent to label this row
        pa.field("tree_id", pa.string()),
        pa.field("shard", pa.int32(), nullable=False),
    ]
)

# Columns holding one entry per step: all of a row's must have the same length.
STEP_COLUMNS = (
    "completions",
    "labels",
    "successes",
    "rollouts",
    "soft_labels",
    "er_labels",
    "tree_value",
    "step_entropies",
    "step_origin",
)
# Step columns whose entries may be null: soft and ER labels of steps without a fixed-size policy sample.
NULLABLE_STEP_COLUMNS = ("soft_labels", "er_labels")


class DatasetError(ValueError):
    """Rows or files that do not satisfy the dataset contract; the message names the column or file."""


@dataclass(frozen=True)
class ShardInfo:
    """One complete shard file: where, how many rows, its sha256 and size in bytes."""

    path: Path
    rows: int
    sha256: str
    bytes: int


# -- rows -> table ------------------------------------------------------------------------------------


def _column_array(name: str, values: list[Any], field: pa.Field) -> pa.Array:
    try:
        return pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as err:
        for i, v in enumerate(values):  # name the first row that does not convert
            try:
                pa.array([v], type=field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
                raise DatasetError(f"row {i}: column {name!r} expects {field.type}, got {v!r:.200}: {err}") from None
        raise DatasetError(f"column {name!r} expects {field.type}: {err}") from None


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Validate rows (dicts with exactly the ``ROW_SCHEMA`` columns) and build a table with that schema.

    Checks, each failure a ``DatasetError`` naming the column (and row): missing or unknown columns,
    values that do not convert to the column's type, nulls in non-nullable columns or inside step lists,
    step lists of different lengths within a row, rows without steps, counts outside
    ``0 <= successes <= rollouts``, and labels that are not what the label rule
    (``tasks.labelling.label_rule.step_labels``) gives for the row's counts, origins and η.
    """
    names = ROW_SCHEMA.names
    expected = set(names)
    for i, row in enumerate(rows):
        keys = set(row)
        if keys != expected:
            missing, unknown = sorted(expected - keys), sorted(keys - expected)
            raise DatasetError(f"row {i}: missing columns {missing}, unknown columns {unknown}")
    arrays = []
    for field in ROW_SCHEMA:
        values = [row[field.name] for row in rows]
        arr = _column_array(field.name, values, field)
        if not field.nullable and arr.null_count:
            i = next(j for j, v in enumerate(values) if v is None)
            raise DatasetError(f"row {i}: column {field.name!r} is null but the schema does not allow nulls")
        if field.name in STEP_COLUMNS and field.name not in NULLABLE_STEP_COLUMNS and arr.flatten().null_count:
            i = next(j for j, v in enumerate(values) if any(x is None for x in v))
            raise DatasetError(f"row {i}: column {field.name!r} holds a null step value")
        arrays.append(arr)
    table = pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)
    for i, row in enumerate(rows):
        lengths = {c: len(row[c]) for c in STEP_COLUMNS}
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"row {i}: step columns differ in length: {lengths}")
        if lengths["completions"] == 0:
            raise DatasetError(f"row {i}: column 'completions' is empty: a row needs at least one step")
        for j, (k, n) in enumerate(zip(row["successes"], row["rollouts"], strict=True)):
            if not 0 <= k <= n:
                raise DatasetError(f"row {i} step {j}: columns 'successes'/'rollouts' need 0 <= k <= N, got {k}/{n}")
        _check_labels(i, row)
    return table


def _check_labels(i: int, row: dict[str, Any]) -> None:
    """Row `i`'s labels must be what the label rule (tasks.labelling.label_rule.step_labels) gives for its counts and
    origins: the hard label of count-labelled steps, and soft / ER exactly where the rule has them."""
    try:
        rule = step_labels(row["successes"], row["rollouts"], row["step_origin"], row["eta"], row["labels"])
    except ValueError as err:
        raise DatasetError(f"row {i} {err}" if str(err).startswith("step ") else f"row {i}: {err}") from None
    for j, origin in enumerate(row["step_origin"]):
        if row["labels"][j] != rule.hard[j]:
            raise DatasetError(f"row {i} step {j}: column 'labels' is {row['labels'][j]!r}, the label rule gives "
                               f"{bool(rule.hard[j])!r} for a {origin!r} step with "
                               f"{row['successes'][j]}/{row['rollouts'][j]} successes")
        for name, expected in (("soft_labels", rule.soft[j]), ("er_labels", rule.er[j])):
            value = row[name][j]
            if (value is None) == bool(rule.valued[j]):
                raise DatasetError(f"row {i} step {j}: column {name!r} must be null exactly for "
                                   f"{sorted(UNSAMPLED_ORIGINS)} steps (origin {origin!r}, value {value!r})")
            if value is not None and not math.isclose(value, expected, rel_tol=1e-12, abs_tol=1e-12):
                raise DatasetError(f"row {i} step {j}: column {name!r} is {value!r}, the label rule gives "
                                   f"{float(expected)!r} for a {origin!r} step with "
                                   f"{row['successes'][j]}/{row['rollouts'][j]} successes at eta {row['eta']}")


# -- shards -------------------------------------------------------------------------------------------


_KEY_FROM_PROVENANCE = object()


def write_shard(
    dataset_dir: str | Path, shard_index: int, rows: list[dict[str, Any]], provenance: dict[str, Any],
    key: Any = _KEY_FROM_PROVENANCE,
) -> ShardInfo:
    """Validate ``rows`` and write them atomically as ``shards/part-XXXXX.parquet``.

    The ``shard`` column is filled with ``shard_index`` where a row leaves it out (a row that sets it to
    another value is an error). ``provenance`` (JSON-serialisable: config hash, code version, ...) goes
    into the file's schema metadata under ``b"prm_factory"`` (see ``read_provenance``); keep it free of
    timestamps if re-runs should give byte-identical files. The file is written to a hidden temp name in
    the same directory, fsynced, renamed over the final name and the directory fsynced: the final name
    never holds a partial file. Then the completion record is written (``write_completion``) with ``key``
    (default: ``provenance["shard_key"]``, None when absent). Returns the shard's ``ShardInfo``.
    """
    final = shard_path(dataset_dir, shard_index)
    record_key = provenance.get("shard_key") if key is _KEY_FROM_PROVENANCE else key
    filled = []
    for i, row in enumerate(rows):
        if "shard" in row and row["shard"] != shard_index:
            raise DatasetError(f"row {i}: column 'shard' is {row['shard']!r} but this is shard {shard_index}")
        filled.append({**row, "shard": shard_index})
    table = rows_to_table(filled)
    try:
        meta = provenance_metadata(provenance)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"provenance is not JSON-serialisable: {err}") from None
    table = table.replace_schema_metadata(meta)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    final.parent.mkdir(parents=True, exist_ok=True)
    # A stale record must not outlive the bytes it vouched for: drop it before the new file lands.
    completion_path(dataset_dir, shard_index).unlink(missing_ok=True)
    atomic_write_bytes(final, data)  # a SIGKILL mid-write can leave the temp file: shard_done cleans it up
    info = ShardInfo(final, table.num_rows, sha256_bytes(data), len(data))
    write_completion(dataset_dir, shard_index, info, record_key)
    return info


def write_completion(dataset_dir: str | Path, shard_index: int, info: ShardInfo, key: str | None) -> dict[str, Any]:
    """Record, atomically and after the shard file, what was written: key, sha256, bytes, rows, schema version.

    ``key`` is the planned shard key the rows were made for (None: rows no build plan can claim, e.g. a
    relabelled version). The sha256 is that of the bytes written, computed before they reached the disk.
    """
    record = {"index": int(shard_index), "key": key, "sha256": info.sha256, "bytes": int(info.bytes),
              "rows": int(info.rows), "schema_version": SCHEMA_VERSION}
    path = completion_path(dataset_dir, shard_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record, indent=None)
    return record


def read_completion(dataset_dir: str | Path, shard_index: int) -> dict[str, Any] | None:
    """The shard's completion record, or None when there is none (or it is not a readable record)."""
    path = completion_path(dataset_dir, shard_index)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"sha256", "key", "rows", "bytes"} <= set(record) else None


def check_shard(dataset_dir: str | Path, shard_index: int, key: str | None = None) -> str | None:
    """Why shard `shard_index` is not done (None: it is): no file, no completion record, another key, or bytes
    that do not hash to the recorded sha256. `key` None skips the key check (any complete shard).

    Removes the shard's temp leftovers first. Only a writer that died leaves temp files, so do not call this
    for a shard another live process is writing at the same moment (one shard has one writer in a run).
    """
    final = shard_path(dataset_dir, shard_index)
    if final.parent.is_dir():
        for leftover in final.parent.glob(temp_glob(final)):
            leftover.unlink(missing_ok=True)
    if not final.is_file():
        return NOT_WRITTEN
    record = read_completion(dataset_dir, shard_index)
    if record is None:
        return "no completion record (written before records existed, or interrupted before its record)"
    if key is not None and record["key"] != key:
        return f"stored key {record['key']} is not the planned key {key} (its problems or config changed)"
    if final.stat().st_size != record["bytes"]:
        return f"{final.stat().st_size} bytes on disk, {record['bytes']} recorded when it was written"
    sha = sha256_file(final)
    if sha != record["sha256"]:
        return f"sha256 {sha} on disk, {record['sha256']} recorded when it was written (corrupted)"
    return None


def shard_done(dataset_dir: str | Path, shard_index: int, key: str | None = None) -> bool:
    """Whether the shard is complete, made for `key` (when given) and intact: see ``check_shard``."""
    return check_shard(dataset_dir, shard_index, key) is None


def shard_info(dataset_dir: str | Path, shard_index: int) -> ShardInfo:
    """The ``ShardInfo`` of a done shard, from its completion record (the hash recorded when it was written).

    Raises DatasetError when the shard is not done (see ``check_shard``).
    """
    reason = check_shard(dataset_dir, shard_index)
    if reason is not None:
        raise DatasetError(f"shard {shard_index} of {dataset_dir}: {reason}")
    record = read_completion(dataset_dir, shard_index)
    assert record is not None  # check_shard found it
    return ShardInfo(shard_path(dataset_dir, shard_index), int(record["rows"]), record["sha256"], int(record["bytes"]))


# -- manifest -----------------------------------------------------------------------------------------


def _dataset_version(entries: list[dict[str, Any]]) -> str:
    blob = "\n".join(f"{e['path']} {e['sha256']}" for e in entries).encode()
    return sha256_bytes(blob)[:16]


def write_manifest(
    dataset_dir: str | Path,
    *,
    schema_version: int,
    config_hash: str,
    code_version: str,
    shards: list[ShardInfo],
    parents: list[str],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write ``manifest.json`` atomically and return it.

    It records the versions, ``created_at`` (UTC), ``parents`` (dataset versions this one derives from),
    the row schema, total ``num_rows`` and per shard its relative path, rows, sha256 and bytes (sorted by
    path), and ``dataset_version``: the first 16 hex of the sha256 over the shards' paths and hashes, so
    the same shards give the same version id whenever they are written.
    """
    root = Path(dataset_dir)
    entries = []
    for s in shards:
        p = Path(s.path)  # as write_shard/shard_info return it: absolute, or relative to the working directory
        try:
            rel = p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise DatasetError(f"shard {s.path} is not inside the dataset directory {root}") from None
        entries.append({"path": rel, "rows": int(s.rows), "sha256": s.sha256, "bytes": int(s.bytes)})
    entries.sort(key=lambda e: e["path"])
    paths = [e["path"] for e in entries]
    if len(set(paths)) != len(paths):
        raise DatasetError(f"a shard is listed twice: {sorted(p for p in paths if paths.count(p) > 1)}")
    manifest = {
        "format": "prm_factory.dataset",
        "schema_version": schema_version,
        "dataset_version": _dataset_version(entries),
        "config_hash": config_hash,
        "code_version": code_version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parents": list(parents),
        "num_rows": sum(e["rows"] for e in entries),
        "num_shards": len(entries),
        "shards": entries,
        "columns": {f.name: str(f.type) for f in ROW_SCHEMA},
        "extra": extra,
    }
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json``; ``FileNotFoundError`` if absent, ``DatasetError`` if not valid JSON."""
    path = Path(dataset_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from None


def _listed_shard(root: Path, rel_path: Any) -> Path:
    """The file a manifest entry names; only ``shards/part-XXXXX.parquet`` inside the dataset is accepted, so a
    crafted manifest cannot point a reader (or a relabel, which writes by index) outside the directory."""
    if not isinstance(rel_path, str) or re.fullmatch(r"shards/part-\d{5,}\.parquet", rel_path) is None:
        raise DatasetError(f"{root / MANIFEST_NAME}: shard path {rel_path!r} is not shards/part-XXXXX.parquet")
    return root / rel_path


def manifest_shards(dataset_dir: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """The shard files `manifest` lists, in its order, each through the same guard (`_listed_shard`)."""
    root = Path(dataset_dir)
    entries = manifest.get("shards", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DatasetError(f"{root / MANIFEST_NAME}: 'shards' is not a list of entries")
    return [_listed_shard(root, e.get("path")) for e in entries]


def verify_dataset(dataset_dir: str | Path) -> list[str]:
    """Problems found in a dataset directory (empty list: it matches its manifest).

    Reports a missing or unreadable manifest, missing shards, sha256 / size / row-count mismatches, a shard
    whose row schema or provenance (schema version, shard key) disagrees with the manifest, a completion
    record that disagrees with the manifest, shard files on disk that the manifest does not list, and a
    ``dataset_version``, ``num_rows`` or ``schema_version`` that does not match. Each problem names the shard.
    Where the directory holds a build's ingest, ``problems.parquet`` is checked too (``_ingest_problems``).
    """
    root = Path(dataset_dir)
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        return [f"missing manifest: {root / MANIFEST_NAME}"]
    except DatasetError as err:
        return [str(err)]
    problems = []
    if manifest.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {manifest.get('schema_version')!r}: this code reads {SCHEMA_VERSION}")
    entries = manifest.get("shards", [])
    keys = manifest.get("extra", {}).get("shard_keys")
    for e in entries:
        try:
            p = _listed_shard(root, e.get("path"))
        except DatasetError as err:
            problems.append(str(err))
            continue
        if not p.is_file():
            problems.append(f"missing shard: {e['path']}")
            continue
        sha = sha256_file(p)
        if sha != e["sha256"]:
            problems.append(f"sha256 mismatch: {e['path']} is {sha}, manifest says {e['sha256']}")
            continue
        if p.stat().st_size != e["bytes"]:
            problems.append(f"size mismatch: {e['path']} is {p.stat().st_size} bytes, manifest says {e['bytes']}")
        rows = pq.read_metadata(p).num_rows
        if rows != e["rows"]:
            problems.append(f"row count mismatch: {e['path']} has {rows} rows, manifest says {e['rows']}")
        schema = pq.read_schema(p)
        if not schema.remove_metadata().equals(ROW_SCHEMA):
            problems.append(f"schema mismatch: {e['path']} does not have the row schema v{SCHEMA_VERSION}")
        prov = read_provenance(p)
        if prov.get("schema_version", manifest.get("schema_version")) != manifest.get("schema_version"):
            problems.append(f"schema version mismatch: {e['path']} provenance says {prov.get('schema_version')!r}, "
                            f"manifest says {manifest.get('schema_version')!r}")
        index = shard_index(e["path"])
        planned = keys[index] if isinstance(keys, list) and index is not None and index < len(keys) else None
        record = read_completion(root, index) if index is not None else None
        if planned is not None and prov.get("shard_key") != planned:
            problems.append(f"key mismatch: {e['path']} holds rows of shard key {prov.get('shard_key')!r}, "
                            f"manifest plans {planned!r}")
        elif record is not None and planned is not None and record["key"] not in (None, planned):
            problems.append(f"key mismatch: {e['path']} was written for key {record['key']!r}, "
                            f"manifest plans {planned!r}")
        if record is not None and (record["sha256"] != e["sha256"] or record["rows"] != e["rows"]):
            problems.append(f"completion record mismatch: {e['path']} was recorded as {record['sha256']} "
                            f"({record['rows']} rows) when written, manifest says {e['sha256']} ({e['rows']} rows)")
    listed = {e["path"] for e in entries}
    for p in shard_files(root):
        rel = p.relative_to(root).as_posix()
        if rel not in listed:
            problems.append(f"extra shard not in manifest: {rel}")
    if manifest.get("dataset_version") != _dataset_version(entries):
        problems.append(f"dataset_version {manifest.get('dataset_version')!r} does not match the listed shards")
    if manifest.get("num_rows") != sum(e["rows"] for e in entries):
        problems.append(f"num_rows {manifest.get('num_rows')!r} is not the sum of the shards' rows")
    return problems + _ingest_problems(root)


def _ingest_problems(root: Path) -> list[str]:
    """``problems.parquet`` against the sha256 that ``ingest.json`` recorded when the two were written.

    Only where both files are present: a relabelled dataset or an active-loop version has neither (its rows
    come from another dataset's shards). An ``ingest.json`` written before the sha256 was recorded cannot vouch
    for the file, so the file is not checked then (a rebuild or refresh writes both anew).
    """
    problems_path, report_path = root / PROBLEMS_FILE, root / INGEST_REPORT
    if not (problems_path.is_file() and report_path.is_file()):
        return []
    try:
        expected = json.loads(report_path.read_text()).get(PROBLEMS_SHA256)
    except (ValueError, AttributeError):  # not JSON, or not an object
        return [f"{INGEST_REPORT} is not a JSON object: the ingest report is damaged"]
    if expected is None:
        return []
    sha = sha256_file(problems_path)
    if sha != expected:
        return [f"sha256 mismatch: {PROBLEMS_FILE} is {sha}, {INGEST_REPORT} says {expected}"]
    return []


def read_dataset(dataset_dir: str | Path, verify: bool = True) -> pa.Table:
    """All rows as one table with ``ROW_SCHEMA`` (no provenance metadata; see ``read_provenance``).

    Reads the shards the manifest lists, in its order, and (``verify``, the default) checks each file's
    sha256 against the manifest first: a shard whose bytes changed after it was written is a DatasetError,
    never silently read. Without a manifest (a run still in progress), the done shards (completion record
    present, bytes matching it: ``check_shard``) in name order. A shard with another schema is an error.
    ``verify=False`` skips the hashing (one extra read of every file) for callers that just verified.
    """
    root = Path(dataset_dir)
    if (root / MANIFEST_NAME).is_file():
        manifest = read_manifest(root)
        entries, paths = manifest["shards"], manifest_shards(root, manifest)
        if verify:
            for p, e in zip(paths, entries, strict=True):
                if not p.is_file():
                    raise DatasetError(f"{p}: listed in the manifest but missing (see `prm-factory verify`)")
                sha = sha256_file(p)
                if sha != e["sha256"]:
                    raise DatasetError(f"{p}: sha256 {sha} does not match the manifest's {e['sha256']}; "
                                       "the file changed after it was written (see `prm-factory verify`)")
    else:
        paths = [p for p in shard_files(root)
                 if (i := shard_index(p)) is not None and (not verify or shard_done(root, i))]
    tables = []
    for p in paths:
        t = pq.ParquetFile(p).read().replace_schema_metadata(None)
        if not t.schema.equals(ROW_SCHEMA):
            raise DatasetError(f"{p} does not have the row schema (schema_version {SCHEMA_VERSION}):\n{t.schema}")
        tables.append(t)
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
