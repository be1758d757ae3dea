"""Dataset versions under one root, and what a refresh can reuse from the latest one.

A dataset root holds complete dataset directories and a pointer to the newest::

    <root>/versions/<version-id>/   shards/part-XXXXX.parquet + manifest.json (tasks/store/dataset.py)
    <root>/LATEST                   the id of the newest complete version (replaced atomically)
    <root>/refresh.jsonl            one line per refresh: what it did (also "up to date" runs)

A version id is ``<seq>-<content>``: a sequence number that sorts, and 8 hex of the hash over the
planned shard keys, so an interrupted refresh finds its own unfinished directory again and resumes it.

A shard is reused when the parent version holds a shard with the same key (the key hashes the labelling
config and the shard's problem ids: same key, same rows). The file is hard-linked (copied across file
systems) and its sha256 checked against the parent's manifest (whose hashes were recorded when the shards
were written); a parent shard whose bytes do not match its manifest, or whose own provenance names another
key than the manifest (a manifest written by an older build that did not compare keys), is not reused but
relabelled. The new version gets a completion record for every reused shard, so a resumed refresh checks
it like any other shard. Everything here is plain file I/O: no engine, no Prefect.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.io import atomic_write_text, fsync_dir, read_provenance, reject_path, sha256_file, shard_path
from tasks.store.dataset import MANIFEST_NAME, SCHEMA_VERSION, ShardInfo, read_manifest, write_completion

VERSIONS_DIR = "versions"
LATEST_NAME = "LATEST"
REFRESH_LOG = "refresh.jsonl"


class VersionError(RuntimeError):
    """A dataset root or version that cannot be used as asked (the message says which file)."""


@dataclass(frozen=True)
class ReusableShard:
    """A parent shard that a planned shard can take as is: same key; `index` may differ from the parent's."""

    index: int
    key: str
    parent_index: int
    parent_path: Path
    sha256: str


@dataclass
class ReusePlan:
    """For each planned shard: reuse it from the parent, or label it."""

    parent: str | None
    reuse: list[ReusableShard] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    parent_shards: int = 0

    @property
    def up_to_date(self) -> bool:
        """Every planned shard is in the parent at the same index, and the parent has no others."""
        return (self.parent is not None and not self.label and len(self.reuse) == self.parent_shards
                and all(r.index == r.parent_index for r in self.reuse))


def versions_dir(root: str | Path) -> Path:
    return Path(root) / VERSIONS_DIR


def version_dir(root: str | Path, version_id: str) -> Path:
    return versions_dir(root) / version_id


def read_latest(root: str | Path) -> str | None:
    """The id LATEST points to, or None for a root without versions. A dangling pointer is an error."""
    pointer = Path(root) / LATEST_NAME
    if not pointer.is_file():
        return None
    version_id = pointer.read_text().strip()
    if not (version_dir(root, version_id) / MANIFEST_NAME).is_file():
        raise VersionError(f"{pointer} names version {version_id!r}, which has no {MANIFEST_NAME}")
    return version_id


def write_latest(root: str | Path, version_id: str) -> None:
    """Point LATEST at a complete version (temp file, fsync, rename: readers see the old or the new id)."""
    if not (version_dir(root, version_id) / MANIFEST_NAME).is_file():
        raise VersionError(f"version {version_id!r} under {root} is not complete (no {MANIFEST_NAME})")
    atomic_write_text(Path(root) / LATEST_NAME, version_id + "\n")


def content_id(shard_keys: Sequence[str]) -> str:
    """8 hex over the ordered shard keys: the same plan gets the same suffix."""
    return hashlib.sha256("\n".join(shard_keys).encode()).hexdigest()[:8]


def next_version_id(root: str | Path, shard_keys: Sequence[str]) -> str:
    """The version a refresh of this plan writes into: its own unfinished directory if one exists, else a new one."""
    suffix = content_id(shard_keys)
    existing = sorted(p.name for p in versions_dir(root).glob("*-*") if p.is_dir())
    for name in existing:
        if name.endswith("-" + suffix) and not (versions_dir(root) / name / MANIFEST_NAME).is_file():
            return name  # an interrupted refresh of the same plan: resume it
    seqs = [int(name.split("-", 1)[0]) for name in existing if name.split("-", 1)[0].isdigit()]
    return f"{max(seqs, default=0) + 1:04d}-{suffix}"


def plan_reuse(parent: str | None, parent_dir: Path | None, shard_keys: Sequence[str]) -> ReusePlan:
    """Which planned shards (given by their keys, in index order) the parent version already holds.

    The parent's keys come from its manifest (``extra.shard_keys``, in index order) and its shard hashes
    from the manifest's shard list; a planned key seen twice in the parent is taken from its first index.
    A parent written with another row schema version is not reused at all.
    """
    plan = ReusePlan(parent)
    if parent is None or parent_dir is None:
        plan.label = list(range(len(shard_keys)))
        return plan
    manifest = read_manifest(parent_dir)
    if manifest.get("schema_version") != SCHEMA_VERSION:  # rows of another schema cannot join this version
        plan.label = list(range(len(shard_keys)))
        return plan
    parent_keys: list[str] = manifest.get("extra", {}).get("shard_keys", [])
    plan.parent_shards = len(parent_keys)
    sha_by_path = {e["path"]: e["sha256"] for e in manifest.get("shards", [])}
    where: dict[str, int] = {}
    for j, key in enumerate(parent_keys):
        where.setdefault(key, j)
    for i, key in enumerate(shard_keys):
        j = where.get(key)
        rel = shard_path("", j).as_posix() if j is not None else None
        if j is None or rel not in sha_by_path:
            plan.label.append(i)
            continue
        plan.reuse.append(ReusableShard(i, key, j, parent_dir / rel, sha_by_path[rel]))
    return plan


def link_shard(shard: ReusableShard, dest_dir: str | Path) -> str:
    """Put a parent shard into `dest_dir` as shard `shard.index`; returns "link", "copy" or "rewrite".

    Same index: hard link (a copy where linking fails, e.g. across file systems), then the sha256 is
    checked against the parent's manifest. Another index: the rows are rewritten with the new ``shard``
    column (a new file, no engine work). A parent file that does not match its manifest raises
    VersionError before anything is written.
    """
    src = shard.parent_path
    actual = sha256_file(src)
    if actual != shard.sha256:
        raise VersionError(f"{src} has sha256 {actual}, its manifest says {shard.sha256}: not reusing it")
    stored_key = read_provenance(src).get("shard_key")
    if stored_key != shard.key:
        raise VersionError(f"{src} holds rows for shard key {stored_key!r}, its manifest says {shard.key!r}: "
                           "not reusing it")
    _copy_rejects(src.parent.parent, shard.parent_index, Path(dest_dir), shard.index)
    dest = shard_path(dest_dir, shard.index)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if shard.index != shard.parent_index:
        import pyarrow.parquet as pq

        from tasks.store.dataset import write_shard

        rows = pq.read_table(src).replace_schema_metadata(None).to_pylist()
        for row in rows:
            row["shard"] = shard.index
        write_shard(dest_dir, shard.index, rows, read_provenance(src), key=shard.key)
        return "rewrite"
    tmp = dest.with_name(f".{dest.name}.tmp-link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        how = "link"
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        how = "copy"
    if sha256_file(tmp) != shard.sha256:
        tmp.unlink(missing_ok=True)
        raise VersionError(f"{how} of {src} to {dest} does not match sha256 {shard.sha256}")
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    import pyarrow.parquet as pq

    rows = pq.read_metadata(dest).num_rows
    write_completion(dest_dir, shard.index, ShardInfo(dest, rows, shard.sha256, dest.stat().st_size), shard.key)
    return how


def _copy_rejects(parent_dir: Path, parent_index: int, dest_dir: Path, index: int) -> None:
    """The problems that produced no row in a reused shard stay on record (rejected/part-XXXXX.jsonl)."""
    src, dest = reject_path(parent_dir, parent_index), reject_path(dest_dir, index)
    if src.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def append_refresh_log(root: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append one JSON line to ``<root>/refresh.jsonl`` (with a UTC timestamp) and return the record."""
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), **record}
    path = Path(root) / REFRESH_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return record


def read_refresh_log(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / REFRESH_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lineage_problems(root: Path, version_id: str, manifest: dict[str, Any]) -> list[str]:
    """A version's reused shards must carry the bytes their parent recorded (hard links share them)."""
    lineage = manifest.get("extra", {}).get("lineage") or {}
    parent_id = lineage.get("parent")
    if not parent_id or not lineage.get("reused_shards"):
        return []
    parent_dir = version_dir(root, parent_id)
    try:
        parent = read_manifest(parent_dir)
    except FileNotFoundError:
        return [f"lineage: parent version {parent_id} of {version_id} is missing"]
    parent_sha = {e["path"]: e["sha256"] for e in parent.get("shards", [])}
    own_sha = {e["path"]: e["sha256"] for e in manifest.get("shards", [])}
    problems = []
    for r in lineage["reused_shards"]:
        if r.get("how") not in ("link", "copy", "present"):
            continue  # "rewrite": new bytes (another shard index), checked as this version's own shard
        mine, theirs = shard_path("", r["index"]).as_posix(), shard_path("", r["parent_index"]).as_posix()
        if own_sha.get(mine) != parent_sha.get(theirs):
            problems.append(f"lineage mismatch: {mine} was reused ({r.get('how')}) from {parent_id}/{theirs}, but "
                            f"the manifests record {own_sha.get(mine)} and {parent_sha.get(theirs)}")
    return problems


_SHARD_RE = re.compile(r"shards/part-\d+\.parquet|problems\.parquet")  # the files a problem names


def _bad_shards(problems: Sequence[str]) -> list[str]:
    return sorted({m for p in problems for m in _SHARD_RE.findall(p)})


def verify_path(path: str | Path) -> dict[str, Any]:
    """Check a dataset directory, or a refresh root (every version, LATEST, and the reused / hard-linked shards).

    Returns ``{"ok", "path", "kind": "dataset"|"root", "problems": [...root-level...], "datasets": [{"dir",
    "version", "ok", "complete", "shards", "rows", "problems", "bad_shards"}]}``. A version directory without a
    manifest is an interrupted refresh: listed with ``complete: False``, not an error (LATEST never points
    at one). Hashes are compared with the manifests, whose values were recorded when each shard was written.
    """
    from tasks.store.dataset import verify_dataset

    root = Path(path)
    report: dict[str, Any] = {"path": str(root), "problems": [], "datasets": []}

    def one(directory: Path, version: str | None, extra: list[str]) -> None:
        complete = (directory / MANIFEST_NAME).is_file()
        problems = (verify_dataset(directory) if complete else []) + extra
        try:
            manifest = read_manifest(directory) if complete else {}
        except ValueError:  # unreadable JSON: verify_dataset already said so
            manifest = {}
        report["datasets"].append({
            "dir": str(directory), "version": version, "complete": complete, "ok": not problems,
            "shards": manifest.get("num_shards"), "rows": manifest.get("num_rows"),
            "dataset_version": manifest.get("dataset_version"),
            "problems": problems, "bad_shards": _bad_shards(problems),
        })

    if versions_dir(root).is_dir() or (root / LATEST_NAME).exists():
        report["kind"] = "root"
        try:
            read_latest(root)
        except VersionError as err:
            report["problems"].append(str(err))
        for vdir in sorted(p for p in versions_dir(root).glob("*") if p.is_dir()):
            extra: list[str] = []
            if (vdir / MANIFEST_NAME).is_file():
                try:
                    extra = _lineage_problems(root, vdir.name, read_manifest(vdir))
                except ValueError as err:
                    extra = [str(err)]
            one(vdir, vdir.name, extra)
    elif (root / MANIFEST_NAME).is_file():
        report["kind"] = "dataset"
        one(root, None, [])
    else:
        report["kind"] = "unknown"
        report["problems"].append(f"{root} holds neither manifest.json nor a versions/ folder: nothing to verify")
    report["ok"] = not report["problems"] and all(d["ok"] for d in report["datasets"])
    return report
