"""tasks/io.py: atomic writes, sha256, the dataset's file layout, provenance."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.io import (
    PROVENANCE_KEY,
    OutputLockedError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_lines,
    atomic_write_text,
    completion_path,
    lock_path,
    provenance_metadata,
    read_provenance,
    reject_path,
    sha256_bytes,
    sha256_file,
    shard_files,
    shard_index,
    shard_path,
    temp_glob,
    writer_lock,
)

# sha256("abc"), FIPS 180-2 appendix B.1
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sha256_of_bytes_and_of_a_file(tmp_path):
    assert sha256_bytes(b"abc") == SHA256_ABC
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == SHA256_ABC
    big = tmp_path / "big.bin"  # more than one 1 MiB block
    data = os.urandom(3 * (1 << 20) + 17)
    big.write_bytes(data)
    assert sha256_file(big) == sha256_bytes(data)


def test_atomic_writes_give_the_exact_bytes(tmp_path):
    atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    atomic_write_text(tmp_path / "t", "é\n")
    atomic_write_json(tmp_path / "j", {"b": 1, "a": [1, 2]})
    atomic_write_json(tmp_path / "c", {"b": 1, "a": 2}, indent=None)
    atomic_write_lines(tmp_path / "l", iter(["x", "y"]))
    atomic_write_lines(tmp_path / "e", [])
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_bytes() == "é\n".encode()
    assert (tmp_path / "j").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert (tmp_path / "c").read_text() == '{"a": 2, "b": 1}\n'
    assert (tmp_path / "l").read_text() == "x\ny\n"
    assert (tmp_path / "e").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c", "e", "j", "l", "t"]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})  # fails before any byte is written
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails inside the temp file: it is removed
    assert json.loads(path.read_text()) == {"v": 1}
    assert list(tmp_path.glob(temp_glob(path))) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_temp_glob_matches_what_a_dead_writer_leaves(tmp_path):
    final = shard_path(tmp_path, 3)
    final.parent.mkdir(parents=True)
    left = final.parent / f".{final.name}.tmp-123-abcdef01"
    left.write_bytes(b"partial")
    other = final.parent / ".part-00004.parquet.tmp-1-00000000"
    other.write_bytes(b"partial")
    assert list(final.parent.glob(temp_glob(final))) == [left]


def test_dataset_layout(tmp_path):
    assert shard_path(tmp_path, 7) == tmp_path / "shards" / "part-00007.parquet"
    assert completion_path(tmp_path, 7) == tmp_path / "completions" / "part-00007.json"
    assert reject_path(tmp_path, 123456) == tmp_path / "rejected" / "part-123456.jsonl"
    assert shard_path("", 0).as_posix() == "shards/part-00000.parquet"
    with pytest.raises(ValueError, match="shard_index must be >= 0"):
        reject_path(tmp_path, -1)
    assert shard_index(shard_path(tmp_path, 42)) == 42 and shard_index("shards/part-00007.parquet") == 7
    assert shard_index(".part-00001.parquet.tmp-1-ab") is None and shard_index("manifest.json") is None
    shard_path(tmp_path, 2).parent.mkdir(parents=True)
    for name in ("part-00002.parquet", "part-00000.parquet", ".part-00001.parquet.tmp-9-00", "notes.txt"):
        (tmp_path / "shards" / name).write_bytes(b"x")
    assert shard_files(tmp_path) == [shard_path(tmp_path, 0), shard_path(tmp_path, 2)]


def test_provenance_round_trip(tmp_path):
    prov = {"shard_key": "k", "cost": {"b": 2, "a": 1}}
    meta = provenance_metadata(prov)
    assert meta == {PROVENANCE_KEY: b'{"cost":{"a":1,"b":2},"shard_key":"k"}'}
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata(meta), path)
    assert read_provenance(path) == prov
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    assert read_provenance(plain) == {}
    with pytest.raises(TypeError):
        provenance_metadata({"bad": object()})


HOLD = ("import sys, time; from tasks.io import writer_lock\n"
        "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")


def _holder(out, seconds: float):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_writer_lock_refuses_a_second_writer_then_takes_a_dead_holders_lock_over(tmp_path, caplog):
    out = tmp_path / "ds"
    holder = _holder(out, 60)
    with pytest.raises(OutputLockedError, match=rf"is being written by pid {holder.pid} \(`-c {out} 60"):
        with writer_lock(out):
            pass
    holder.kill()  # SIGKILL: no chance to release; the kernel drops the flock, the record stays
    holder.wait()
    assert str(holder.pid) in lock_path(out).read_text()
    with caplog.at_level("WARNING", logger="tasks.io"), writer_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {holder.pid}" in caplog.text
    assert lock_path(out).read_text() == "" and lock_path(out).parent == tmp_path, "emptied; beside OUT, not in it"
    with caplog.at_level("WARNING", logger="tasks.io"), writer_lock(out):  # a clean release: nothing to take over
        pass
    assert caplog.text.count("took over") == 1


def test_writer_lock_waits_for_a_live_holder_when_asked(tmp_path):
    out = tmp_path / "ds"
    holder = _holder(out, 1.5)
    lines = []
    with writer_lock(out, wait=True, on_wait=lines.append):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
        assert holder.wait(timeout=10) == 0, "entered once the holder finished"
    assert len(lines) == 1 and f"waiting for pid {holder.pid}" in lines[0]
