"""Commands on a finished dataset: relabel (new labels from the stored rollouts), verify, inspect, and
export-dataset (the layout another PRM trainer reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from prm_factory.commands import JsonOpt, _fails, console


def relabel(
    dataset: Annotated[Path, typer.Argument(help="dataset directory written by `build`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the relabelled dataset version")],
    eta: Annotated[float | None, typer.Option("--eta", help="new ER-PRM eta (> 0)")] = None,
    rollouts: Annotated[int | None, typer.Option("--rollouts", help="keep n of each step's N rollouts, drawn at "
                                                 "random: the rows a build with rollouts.n = n would give "
                                                 "(Math-Shepherd builds: no tree, no early stop)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the --rollouts draw")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Labels again from the stored (successes, rollouts), no engine, seconds: ER labels for another eta, and/or
    the labels of a smaller rollout budget."""
    from tasks.store.dataset import DatasetError
    from tasks.store.relabel import relabel_dataset

    if eta is None and rollouts is None:
        console.print("give --eta, --rollouts or both", style="red")
        raise typer.Exit(2)
    if eta is not None and not eta > 0:
        console.print(f"--eta must be > 0, got {eta}", style="red")
        raise typer.Exit(2)
    if rollouts is not None and rollouts < 1:
        console.print(f"--rollouts must be >= 1, got {rollouts}", style="red")
        raise typer.Exit(2)
    with _fails(DatasetError, FileNotFoundError, out=out):
        manifest = relabel_dataset(dataset, out, eta, rollouts, seed)
    sub = manifest["extra"].get("subsampled")
    if json_out:
        print(json.dumps({"out_dir": str(out), "dataset_version": manifest["dataset_version"],
                          "parents": manifest["parents"], "rows": manifest["num_rows"], "eta": eta,
                          "rollouts": rollouts,
                          "expected_generated_tokens": sub["expected_generated_tokens"] if sub else None}))
    else:
        what = [f"eta={eta:g}"] if eta is not None else []
        if sub:
            what.append(f"{rollouts} rollouts per step (a build of that size: about "
                        f"{sub['expected_generated_tokens']:,} generated tokens)")
        console.print(f"[green]relabelled[/green] {manifest['num_rows']} rows with {' and '.join(what)} into {out} "
                      f"(version {manifest['dataset_version']}, parent {manifest['parents'][0]})")


def verify(
    path: Annotated[Path, typer.Argument(help="a dataset dir (manifest.json + shards/) or a refresh root")],
    json_out: JsonOpt = False,
) -> None:
    """Check every shard's sha256, rows, schema version, key and provenance against the manifest(s).

    On a refresh root: every version, LATEST, and the shards reused (hard-linked) from a parent. Exit 0 when
    everything matches, 1 naming each bad shard, 2 when PATH holds nothing to verify.
    """
    from tasks.store.versions import verify_path

    report = verify_path(path)
    if json_out:
        print(json.dumps(report))
    else:
        for line in report["problems"]:
            console.print(line, style="red", markup=False, soft_wrap=True)
        for d in report["datasets"]:
            where = d["version"] or d["dir"]
            if not d["complete"]:
                console.print(f"{where}: incomplete (no manifest; an interrupted refresh), not checked",
                              markup=False, soft_wrap=True)
            elif d["ok"]:
                console.print(f"ok {where}: {d['shards']} shards, {d['rows']} rows, version {d['dataset_version']}",
                              markup=False, soft_wrap=True)
            else:
                console.print(f"BAD {where}: {', '.join(d['bad_shards']) or 'manifest'}", style="red",
                              markup=False, soft_wrap=True)
                for line in d["problems"]:
                    console.print(f"  {line}", markup=False, soft_wrap=True)
    if report["kind"] == "unknown":
        raise typer.Exit(2)
    raise typer.Exit(0 if report["ok"] else 1)


def inspect(
    dataset_dir: Annotated[Path, typer.Argument(help="a dataset dir (manifest.json + shards/) or a refresh root")],
    json_out: JsonOpt = False,
) -> None:
    """Counts, label distributions, step entropies and cost per labelled step of a finished dataset."""
    from tasks.store.report import dataset_stats, render_markdown
    from tasks.store.versions import read_latest, version_dir

    target = dataset_dir
    if not (target / "manifest.json").is_file() and (target / "LATEST").is_file():
        target = version_dir(target, read_latest(target))  # a refresh root: its latest version
    if not (target / "manifest.json").is_file():
        console.print(f"{dataset_dir} holds no manifest.json (not a finished dataset)", style="red", markup=False)
        raise typer.Exit(2)
    stats = dataset_stats(target)
    if json_out:
        print(json.dumps({k: v for k, v in stats.items() if k != "entropies"}, default=str))
    else:
        print(render_markdown(stats))


def export_dataset_cmd(
    dataset_dir: Annotated[Path, typer.Argument(help="a dataset dir (manifest.json + shards/) or a refresh root")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="math-shepherd (Math-Shepherd / OpenRLHF: text with a "
                                     "step tag after every step, +/- labels) | qwen-prm (steps each followed by "
                                     "<extra_0>, 0/1 labels) | trl-stepwise (TRL PRMTrainer: prompt, completions, "
                                     "bool labels)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory: data/<split>-*.parquet + README.md "
                                      "(the dataset card)")],
    label: Annotated[str, typer.Option("--label", help="the column that makes a step good or bad: labels (hard, "
                                       "k>0) | soft_labels (k/N) | er_labels (ER-PRM), the last two against "
                                       "--threshold")] = "labels",
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="soft_labels/er_labels: a step is good when its value is >= this (default 0.5); a step "
                            "with a null soft/ER label keeps its hard label")] = None,
    file_format: Annotated[str, typer.Option("--file-format", help="parquet | jsonl")] = "parquet",
    step_tag: Annotated[str | None, typer.Option(
        "--step-tag", help="math-shepherd's tag after every step (default ' ки', as Math-Shepherd writes it)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace OUT when it exists and is not empty")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a verified dataset in the layout another PRM trainer reads, with a dataset card (OUT/README.md).

    The card holds the config and its hash, the code version, counts and label balance, what each label column
    estimates, the sources and the cost in tokens, all read from the dataset. A row whose text holds the format's
    step tag is refused (exit 2), never escaped. OUT is written whole or not at all (temp dir, then rename).
    """
    from tasks.store.dataset import DatasetError
    from tasks.store.trainer_export import ExportError, export_dataset
    from tasks.store.versions import VersionError, read_latest, version_dir

    target = dataset_dir
    with _fails(VersionError, ExportError, DatasetError, out=out):
        if not (target / "manifest.json").is_file() and (target / "LATEST").is_file():
            target = version_dir(target, read_latest(target))  # a refresh root: its latest version
        summary = export_dataset(target, out, fmt, label=label, threshold=threshold, file_format=file_format,
                                 step_tag=step_tag, force=force)
    if json_out:
        print(json.dumps({**summary.to_dict(), "dataset_dir": str(target)}))
        return
    balance = f"{summary.good_steps:,} good / {summary.steps - summary.good_steps:,} bad steps"
    console.print(f"[green]exported[/green] {summary.rows:,} rows ({summary.steps:,} steps, {balance} by "
                  f"{summary.label}) from {target} as {summary.format} into {out}; card {out / 'README.md'}",
                  soft_wrap=True)
