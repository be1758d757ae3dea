"""The `prm-factory` command. Each subcommand is a thin shell over functions in tasks/, cluster/ and flows/.

Heavy imports (torch, vLLM, Ray, Prefect) happen inside the commands, so `--help` and `validate`
answer in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Build step-labelled PRM training data: EDU partitioning, ER-PRM labels, Parquet datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]


@app.callback()
def main() -> None:
    """Build step-labelled PRM training data: EDU partitioning, ER-PRM labels, Parquet datasets."""


def _load(config: Path):
    from configs.schema import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as err:
        console.print(str(err), style="red", markup=False)
        raise typer.Exit(2) from None


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML config to check")], json_out: JsonOpt = False) -> None:
    """Check a config without starting anything; exit 2 naming each bad field."""
    cfg = _load(config)
    if json_out:
        print(json.dumps({"ok": True, "name": cfg.name, "config_hash": cfg.config_hash()}))
    else:
        console.print(f"[green]ok[/green] {config}: '{cfg.name}' (hash {cfg.config_hash()})")


if __name__ == "__main__":
    app()
