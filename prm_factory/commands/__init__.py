"""The `prm-factory` subcommands, one module per family (prm_factory/cli.py registers them on the app), and what
every command shares: the console, the common options, the one error handler and the one config loader.

Heavy imports (torch, vLLM, Ray, Prefect) happen inside the commands, so `--help` and `validate`
answer in well under a second.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from configs.env import set_quiet_env, use_hub_offline

set_quiet_env()  # telemetry off always; hub offline-ness follows each config (`offline:`), set in _load

console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="engine and Ray logs on the terminal, not in "
                                                           "OUT/logs/engines.log")]

# Errors of the output's file system (read-only, no permission, full): one line and this exit code, no traceback.
_DISK_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
EXIT_UNWRITABLE = 3


def _unwritable(err: OSError, out_dir: Path | str) -> typer.Exit:
    """Print why the output cannot be written, in one line; the caller raises the returned Exit."""
    console.print(f"cannot write {err.filename or out_dir}: {err.strerror or err} (make the output writable or "
                  "free space, then re-run: finished shards are kept)", style="red", markup=False, soft_wrap=True)
    return typer.Exit(EXIT_UNWRITABLE)


@contextlib.contextmanager
def _fails(*errors: type[BaseException], code: int = 2, out: Path | str | None = None, note: str = ""
           ) -> Iterator[None]:
    """The CLI's one error handler: an expected error of the wrapped step (one of `errors`) prints its message
    (plus `note`) as one red line and exits `code`, without a traceback. With `out`, an error of the output's file
    system (read-only, no permission, full) prints where and why and exits 3 (finished work is kept).
    Exit codes: 2 bad input or config (nothing ran), 1 the run itself failed, 3 the output cannot be written."""
    try:
        yield
    except errors as err:
        console.print(f"{err}{note}", style="red", markup=False, soft_wrap=True)
        raise typer.Exit(code) from None
    except OSError as err:
        if out is None or err.errno not in _DISK_ERRNOS:
            raise
        raise _unwritable(err, out) from None


def _load(config: Path, check_paths: bool = True):
    """The config at `config` through the one loader (configs.schema.load_config); its offline switch applied."""
    from configs.schema import ConfigError, load_config

    with _fails(ConfigError):
        cfg = load_config(config, check_paths=check_paths)
    use_hub_offline(cfg.offline)
    return cfg

