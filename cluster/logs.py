"""Where the engines' and Ray's start-up chatter goes: a log file in the output directory, unless --verbose.

A toy build used to print ~40 lines of vLLM and Ray INFO before its first progress bar. The terminal now
shows our own progress and summary; the engines' output goes to ``<out>/logs/engines.log``:

- engines in Ray actors: the actor points its stdout and stderr (file descriptors 1 and 2, so C++ warnings
  and vLLM's engine-core child process are caught too) at the log file for its lifetime, and the driver joins
  Ray without streaming worker output (``log_to_driver=False``) and with Ray's own logger at WARNING;
- an engine in this process (``--local``): file descriptors 1 and 2 point at the log file while it starts
  (its engine-core child keeps them), then vLLM's terminal handlers are raised to WARNING and a file handler
  takes its INFO lines.

A detached engine actor reattached by a later run keeps writing where it was started. On a multi-node
cluster the path is created on the engine's node. When an engine fails to start, the CLI prints a one-line
pointer to the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

ENGINE_LOG = Path("logs") / "engines.log"


def engine_log_path(out_dir: str | Path) -> Path:
    """The engines' log file of a run writing to `out_dir`."""
    return Path(out_dir) / ENGINE_LOG


def redirect_output(log_file: str | Path) -> None:
    """Point this process's stdout and stderr (fds 1 and 2) at `log_file`, appended, for good (engine actors)."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


@contextlib.contextmanager
def output_to(log_file: str | Path) -> Iterator[None]:
    """While inside, fds 1 and 2 of this process write to `log_file`; child processes started inside keep it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        redirect_output(log_file)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a full disk must not keep the terminal redirected
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def vllm_info_to_file(log_file: str | Path) -> None:
    """For an in-process vLLM: its INFO lines go to `log_file`; only WARNING and above reach the terminal."""
    logger = logging.getLogger("vllm")
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
    logger.addHandler(file_handler)
