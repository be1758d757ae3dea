"""The quiet terminal's mechanism: output (this process's fds and its children's) goes to the run's log file."""

from __future__ import annotations

import os
import subprocess

from cluster.logs import engine_log_path, output_to


def test_output_to_catches_children_and_raw_fds_then_restores_the_terminal(tmp_path, capfd):
    log = engine_log_path(tmp_path)
    assert log == tmp_path / "logs" / "engines.log"
    print("before", flush=True)
    with output_to(log):
        # What vLLM's engine core does: a child process writing to the fds it inherited, C code writing to fd 2.
        subprocess.run(["sh", "-c", "echo child-out; echo child-err >&2"], check=True)
        os.write(2, b"raw-fd2\n")
    print("after", flush=True)
    out, err = capfd.readouterr()
    # (Python-level prints are not checked: under pytest, sys.stdout is pytest's own object, not fd 1.)
    assert log.read_text() == "child-out\nchild-err\nraw-fd2\n"
    assert out == "before\nafter\n" and err == ""
