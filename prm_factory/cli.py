"""The `prm-factory` command: the app and its subcommands, registered in the order `--help` lists them.

Each subcommand is a thin shell over functions in tasks/, cluster/ and flows/, written in prm_factory/commands/
(one module per family of commands, with the console, options, error handler and config loader they share).
"""

from __future__ import annotations

import typer

from prm_factory.commands.active import active_cmd
from prm_factory.commands.build import build_cmd, doctor, ingest_cmd, partition, validate
from prm_factory.commands.cluster import cluster_down, cluster_status, cluster_up, serve_cmd
from prm_factory.commands.dataset import export_dataset_cmd, inspect, relabel, verify
from prm_factory.commands.evaluate import eval_cmd, eval_policy, ruler_cmd
from prm_factory.commands.prm import export_cmd, score_cmd, train_cmd

app = typer.Typer(
    help="Build step-labelled PRM training data: EDU partitioning, ER-PRM labels, Parquet datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Build step-labelled PRM training data: EDU partitioning, ER-PRM labels, Parquet datasets."""


app.command()(validate)
app.command("ingest")(ingest_cmd)
app.command("build")(build_cmd)
app.command("eval-policy")(eval_policy)
app.command()(partition)
app.command()(relabel)

cluster_app = typer.Typer(help="A local single-node Ray cluster (dashboard on 127.0.0.1).", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
cluster_app.command("up")(cluster_up)
cluster_app.command("status")(cluster_status)
cluster_app.command("down")(cluster_down)

app.command()(inspect)
app.command("export-dataset")(export_dataset_cmd)
app.command("serve")(serve_cmd)
app.command()(doctor)
app.command("ruler")(ruler_cmd)
app.command("eval")(eval_cmd)
app.command("train")(train_cmd)
app.command("score")(score_cmd)
app.command("export")(export_cmd)
app.command()(verify)
app.command("active")(active_cmd)


if __name__ == "__main__":
    app()
