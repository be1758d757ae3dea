"""File IO for every stage: atomic writes, sha256, where a dataset's files live, and shard provenance.

The one home of these rules, so that a writer and a reader can never disagree:

- **atomic writes**: a file is written to a hidden temp name in its own directory, flushed and fsynced,
  renamed over the final name, then the directory is fsynced: the final name holds the old bytes or the new
  ones, never a partial file (a crash can leave a temp file; ``temp_glob`` finds it);
- **sha256** of bytes and of a file (read in 1 MiB blocks);
- **the dataset layout**: ``shards/part-XXXXX.parquet`` (rows), ``completions/part-XXXXX.json`` (the shard's
  completion record), ``rejected/part-XXXXX.jsonl`` (problems that gave no row, with the reason);
- **provenance**: a JSON dict in a Parquet file's schema metadata under ``b"prm_factory"``;
- **one writer per output**: ``writer_lock``, an advisory lock beside the output directory.

Plain functions over paths and bytes; no schema, no engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

PROVENANCE_KEY = b"prm_factory"
MANIFEST_NAME = "manifest.json"  # a dataset version's and the ruler's manifest
SHARDS_DIR = "shards"
COMPLETIONS_DIR = "completions"
REJECTED_DIR = "rejected"


# -- atomic writes ------------------------------------------------------------------------------------


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` never holds a partial file: temp file, fsync, rename, fsync dir."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of `text` as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any, *, indent: int | None = 2) -> None:
    """`payload` as JSON (sorted keys, `indent`, a final newline), written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=indent, sort_keys=True) + "\n")


def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """One line per item (each ended by a newline; an empty iterable gives an empty file), written atomically."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def temp_glob(final: str | Path) -> str:
    """The glob pattern of the temp files ``atomic_write_bytes`` leaves beside `final` when a writer dies."""
    return f".{Path(final).name}.tmp-*"


# -- sha256 -------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the dataset layout -------------------------------------------------------------------------------


def shard_stem(shard_index: int) -> str:
    """``part-XXXXX``: the name every file of one shard shares (shard, completion record, rejects)."""
    if shard_index < 0:
        raise ValueError(f"shard_index must be >= 0, got {shard_index}")
    return f"part-{shard_index:05d}"


def shard_path(dataset_dir: str | Path, shard_index: int) -> Path:
    """``<dataset_dir>/shards/part-XXXXX.parquet``: the shard's rows."""
    return Path(dataset_dir) / SHARDS_DIR / f"{shard_stem(shard_index)}.parquet"


def shard_index(path: str | Path) -> int | None:
    """The index in a shard file's name (``.../part-00012.parquet`` -> 12), None for any other name."""
    stem = Path(path).stem
    tail = stem.rsplit("-", 1)[-1]
    return int(tail) if stem.startswith("part-") and tail.isdigit() else None


def shard_files(dataset_dir: str | Path) -> list[Path]:
    """The shard files on disk (``shards/part-*.parquet``) in name order; a writer's temp files never match."""
    return sorted((Path(dataset_dir) / SHARDS_DIR).glob("part-*.parquet"))


def completion_path(dataset_dir: str | Path, shard_index: int) -> Path:
    """``<dataset_dir>/completions/part-XXXXX.json``: the shard's completion record."""
    return Path(dataset_dir) / COMPLETIONS_DIR / f"{shard_stem(shard_index)}.json"


def reject_path(dataset_dir: str | Path, shard_index: int) -> Path:
    """``<dataset_dir>/rejected/part-XXXXX.jsonl``: the shard's problems that produced no row, with the reason."""
    return Path(dataset_dir) / REJECTED_DIR / f"{shard_stem(shard_index)}.jsonl"


# -- provenance ---------------------------------------------------------------------------------------


def provenance_metadata(provenance: dict[str, Any]) -> dict[bytes, bytes]:
    """Schema metadata holding `provenance` (compact JSON, sorted keys) under ``b"prm_factory"``.

    Raises TypeError / ValueError when `provenance` is not JSON-serialisable.
    """
    return {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, separators=(",", ":")).encode()}


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance dict stored in a Parquet file's schema metadata (``{}`` if it has none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


class OutputLockedError(RuntimeError):
    """Another live process is writing the same output directory."""


def lock_path(out: str | Path) -> Path:
    """The lock file of output directory `out`: beside it (``.NAME.lock``), so that the output holds only data."""
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def writer_lock(out: str | Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
                ) -> Iterator[None]:
    """Hold the one-writer lock of output directory `out` for the block (``fcntl.flock``, advisory).

    Taken: the lock file records this process (pid, command, since) until the block ends, when it is emptied.
    Held by a live process: ``OutputLockedError`` naming it, or with `wait`, a line to `on_wait` and a wait for it.
    The kernel drops the lock of a process that dies, so a dead holder's lock is simply taken; its record,
    still in the file, is logged as taken over.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(_read_holder(fd))
            if not wait:
                raise OutputLockedError(f"{out} is being written by {holder}; let it finish (or stop it), re-run "
                                        "with --wait to queue behind it, or write elsewhere") from None
            (on_wait or logging.getLogger(__name__).warning)(f"waiting for {holder} to finish writing {out}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        previous = _read_holder(fd)
        if previous:
            logging.getLogger(__name__).warning(
                "took over the lock of %s on %s: it ended without releasing it", _describe_holder(previous), out)
        record = {"pid": os.getpid(), "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 65536, 0)
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return {"pid": "?", "command": raw[:200].decode(errors="replace")}


def _describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return f"pid {holder.get('pid')} (`{holder.get('command')}`, since {holder.get('since', '?')})"
