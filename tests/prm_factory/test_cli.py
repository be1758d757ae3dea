"""The CLI's own rules (prm_factory/commands/): one error handler with one meaning per exit code, one config loader.

The commands' behaviour is tested beside the code each one runs (tests/tasks/..., tests/cluster/...); here, what
every command shares.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import typer

from configs.schema import REPO_ROOT, ConfigError, load_config
from prm_factory import commands


def test_fails_turns_an_expected_error_into_one_red_line_and_its_exit_code(capsys):
    with pytest.raises(typer.Exit) as exit_info, commands._fails(KeyError, ValueError):
        raise ValueError("train.lr: must be > 0")
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "train.lr: must be > 0"

    with pytest.raises(typer.Exit) as exit_info, commands._fails(RuntimeError, code=1, note="; see the log"):
        raise RuntimeError("training failed")
    assert exit_info.value.exit_code == 1
    assert capsys.readouterr().err.strip() == "training failed; see the log"


def test_fails_lets_unexpected_errors_through_with_their_traceback():
    with pytest.raises(ZeroDivisionError), commands._fails(ValueError):
        raise ZeroDivisionError
    # an OS error is the output's only when it is a disk error and an output was named
    with pytest.raises(OSError), commands._fails(ValueError):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ConnectionResetError), commands._fails(out="runs/x"):
        raise ConnectionResetError(errno.ECONNRESET, "reset")


def test_fails_reports_an_unwritable_output_with_exit_3(capsys, tmp_path):
    with pytest.raises(typer.Exit) as exit_info, commands._fails(ValueError, out=tmp_path):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "shards"))
    assert exit_info.value.exit_code == commands.EXIT_UNWRITABLE == 3
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'shards'}: Read-only file system" in " ".join(err.split())


def test_the_one_loader_finds_a_repo_config_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/toy.yaml").name == "toy"  # not in the cwd: taken from the repository
    (tmp_path / "configs").mkdir()
    local = (REPO_ROOT / "configs" / "toy.yaml").read_text().replace("name: toy\n", "name: toy-here\n")
    (tmp_path / "configs" / "toy.yaml").write_text(local)
    assert load_config("configs/toy.yaml").name == "toy-here"  # a file in the cwd wins
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")


def test_a_bad_config_exits_2_naming_the_field_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO_ROOT / "configs" / "toy.yaml").read_text().replace("  n: 4\n", "  n: 0\n"))
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "prm_factory.cli", "build", "--config", str(bad), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "rollouts.n" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
