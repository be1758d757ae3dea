"""Commands on the PRM itself: train (Ray Train), score (a checkpoint, an export or a running server), and
export (a directory vLLM serves)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from prm_factory.commands import ConfigOpt, JsonOpt, _fails, _load, console


def train_cmd(
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="a dataset version dir (manifest.json + shards/)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run dir; the same dir again resumes from its checkpoint")],
    config: ConfigOpt = Path("configs/toy.yaml"),
    json_out: JsonOpt = False,
) -> None:
    """Train the PRM of the config's `train:` section on Ray Train; RUN/model is the scorer's checkpoint.

    Exit 2: bad config or dataset (checked before Ray starts); exit 1: the run failed (a NaN loss names its batch).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster.connect import ClusterConnectError
    from cluster.train import train_on_ray
    from tasks.prm.training import TrainError, dataset_shards

    cfg = _load(config)
    with _fails(TrainError):
        dataset_shards(dataset)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=json_out) as bar:
        epochs = bar.add_task(f"Ray Train: {cfg.train.num_workers} workers, PRM on {cfg.train.target}",
                              total=cfg.train.epochs)

        def on_epoch(record: dict) -> None:
            bar.update(epochs, completed=record["epoch"] + 1,
                       description=f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, "
                                   f"held-out AUROC {record.get('eval_auroc', float('nan')):.3f}")

        with _fails(ClusterConnectError), _fails(TrainError, code=1):
            result = train_on_ray(cfg, dataset, out, on_epoch=on_epoch)
    if json_out:
        print(json.dumps(result.to_dict()))
        return
    from rich.table import Table

    table = Table(title=f"PRM run {result.run_dir} ({result.global_step} steps, {result.seconds:.0f}s)")
    for col in ("epoch", "step", "train loss", "held-out loss", "held-out AUROC", "held-out acc", "samples/s"):
        table.add_column(col, justify="right")
    for r in result.history:
        table.add_row(str(r["epoch"]), str(r["global_step"]), f"{r['train_loss']:.4f}",
                      f"{r.get('eval_loss', float('nan')):.4f}", f"{r.get('eval_auroc', float('nan')):.3f}",
                      f"{r.get('eval_acc', float('nan')):.3f}", f"{r['samples_per_s']:.1f}")
    console.print(table)
    resumed = "" if result.resumed_from_epoch is None else f" (resumed after epoch {result.resumed_from_epoch})"
    console.print(f"[green]model[/green] {result.model_dir}{resumed}", markup=True)


def score_cmd(
    input_path: Annotated[Path, typer.Argument(help="JSONL or Parquet with `prompt` and `completions` columns")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output file, same format as the input")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="a run dir from `train` (or its model/ "
                                                                         "dir), or an export")] = None,
    url: Annotated[str | None, typer.Option("--url", help="score through a running server of an ensemble export "
                                                          "(http://HOST:PORT) instead of --checkpoint")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="VLLM_API_KEY",
                                                help="--url: the server's --api-key")] = None,
    max_in_flight: Annotated[int, typer.Option(help="--url: requests in flight at once")] = 4,
    retries: Annotated[int, typer.Option(help="--url: retries of a request on connection errors")] = 3,
    batch_size: Annotated[int, typer.Option(help="trajectories per forward pass (--url: per request)")] = 16,
    device: Annotated[str, typer.Option(help="torch device")] = "cpu",
    engine: Annotated[str, typer.Option(help="transformers: a checkpoint from `train`, or an export, in torch; "
                                             "vllm: the same through vLLM pooling engines")] = "transformers",
    local: Annotated[bool, typer.Option("--local", help="--engine vllm: the engine in this process, not Ray")]
    = False,
    engines: Annotated[int, typer.Option(help="--engine vllm: scoring actors in the Ray pool")] = 1,
    gpus_per_engine: Annotated[float | None, typer.Option(help="--engine vllm: GPUs per scoring actor (default: 1 "
                                                               "when this machine has a CUDA device, else 0)")]
    = None,
    json_out: JsonOpt = False,
) -> None:
    """Add `step_scores` (ensemble mean per step) and `step_std` to every row; other columns pass through.

    An export (`prm-factory export`) has one head: it scores each line at its newline and its `step_std` is 0.
    `--engine vllm` serves the model from vLLM pooling engines in Ray actors (a local Ray when none is running),
    the pool the build's generation engines use; `--local` keeps one engine in this process. An export is served
    whole (Qwen2ForProcessRewardModel, token_classify); a checkpoint is served whole by the package's vLLM plugin
    model (PRMFactoryEnsembleForProcessReward: backbone, token features, heads and step rule in vLLM), so the
    scores, `step_std` and the
    token features are the checkpoint's, as through transformers.

    `--url http://HOST:PORT` scores through a running server of an export (`export --format vllm-ensemble`, served
    by the command in its serve.json): text goes out, each step's mean and std come back, the same columns. A row
    the server refuses (a step that does not end on its newline, a text past the context) is named, left unscored
    (null) and counted; the other rows are scored. Exit 1 when the server cannot be reached after the retries.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks.prm.model import CheckpointError, is_checkpoint, load_prm
    from tasks.prm.score import ScoreInputError, read_trajectories, score_file

    if batch_size < 1:
        console.print(f"--batch-size must be >= 1, got {batch_size}", style="red")
        raise typer.Exit(2)
    if engine not in ("transformers", "vllm"):
        console.print(f"--engine must be transformers or vllm, got {engine!r}", style="red")
        raise typer.Exit(2)
    from tasks.prm.export import ExportError

    if (checkpoint is None) == (url is None):
        console.print("give one of --checkpoint (score here) and --url (score through a running server)",
                      style="red")
        raise typer.Exit(2)
    if url is not None:
        _score_remote(input_path, out, url, api_key, batch_size, max_in_flight, retries, json_out)
        return
    with _fails(CheckpointError, ScoreInputError, ExportError):
        _, _, prompts, _ = read_trajectories(input_path)
        # an export has a Hugging Face config.json and no prm_config.json; what is neither goes to load_prm,
        # which names what is missing
        exported = not is_checkpoint(checkpoint) and (checkpoint / "config.json").is_file()
        if engine == "vllm":
            from cluster.connect import ClusterConnectError
            from cluster.pooling_engine import PooledPRM, PoolingUnsupported, open_scorer

            # neither a checkpoint nor an export fails in one line, before vLLM; so does a cluster that does not answer
            with _fails(PoolingUnsupported, ClusterConnectError):
                if gpus_per_engine is None:
                    import torch

                    gpus_per_engine = 1.0 if torch.cuda.is_available() else 0.0
                prm = open_scorer(checkpoint) if local else PooledPRM(checkpoint, num_engines=engines,
                                                                      gpus_per_engine=gpus_per_engine)
        elif exported:
            from tasks.prm.export import ExportedPRM

            prm = ExportedPRM(checkpoint, device=device)
        else:
            prm = load_prm(checkpoint, device=device)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  disable=json_out) as bar:
        task = bar.add_task("rows", total=len(prompts))
        try:
            with _fails(ExportError):  # an export refuses a line that does not end on its own tag, naming it
                summary = score_file(prm, input_path, out, batch_size=batch_size,
                                     progress=lambda n: bar.update(task, advance=n))
        finally:
            if hasattr(prm, "close"):  # the Ray scoring actors
                prm.close()
    if json_out:
        print(json.dumps(summary))
        return
    console.print(f"[green]scored[/green] {summary['rows']} rows ({summary['steps']} steps) into {summary['output']}; "
                  f"{summary['truncated_rows']} truncated to the backbone's {prm.max_length} tokens")
    if "quality" in summary:
        from tasks.evaluation.summary import f3

        q = summary["quality"]
        console.print(f"against the file's `{q['against']}` ({q['rows']} rows): within-position AUROC "
                      f"{f3(q['within_position_auroc'])}, first-error F1 {f3(q['first_error_f1'])}; step AUROC "
                      f"{f3(q['step_auroc'])}", markup=False, soft_wrap=True)


def _score_remote(input_path: Path, out: Path, url: str, api_key: str | None, batch_size: int, max_in_flight: int,
                  retries: int, json_out: bool) -> None:
    """`score --url`: the file through a running server (prm_factory.client), refused rows named and counted."""
    from prm_factory.client import RemotePRM, ServerUnavailable
    from tasks.prm.score import ScoreInputError, read_trajectories, score_file

    if max_in_flight < 1 or retries < 0:
        console.print(f"--max-in-flight must be >= 1 and --retries >= 0, got {max_in_flight}, {retries}", style="red")
        raise typer.Exit(2)
    with _fails(ScoreInputError):
        read_trajectories(input_path)
    prm = RemotePRM(url, api_key=api_key, max_in_flight=max_in_flight, options={"retries": retries})
    with _fails(ServerUnavailable, code=1):
        # Each score() call keeps max_in_flight requests of batch_size rows going at once.
        summary = score_file(prm, input_path, out, batch_size=batch_size * max_in_flight * 4)
    summary.update(url=url, refused_rows=len(prm.refused), refusals=prm.refused[:20])
    for line in prm.refused[:20]:
        console.print(f"refused {line}", style="yellow", markup=False, soft_wrap=True)
    if json_out:
        print(json.dumps(summary))
        return
    console.print(f"[green]scored[/green] {summary['rows'] - len(prm.refused)} of {summary['rows']} rows through "
                  f"{url} into {summary['output']}; {len(prm.refused)} refused by the server (null scores)")


def export_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="a run dir from `train` (or its model/ dir)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the export directory to write")],
    fmt: Annotated[str, typer.Option("--format", help="vllm-ensemble: the whole ensemble for the prm-factory vLLM "
                                                      "plugin; qwen2-prm: one distilled head any vLLM serves")]
    = "vllm-ensemble",
    data: Annotated[Path | None, typer.Option("--data", help="qwen2-prm: trajectories to distill the head on: a "
                                                             "dataset dir, or a JSONL/Parquet file with `prompt` "
                                                             "and `completions`")] = None,
    limit: Annotated[int, typer.Option(help="qwen2-prm: distill on at most this many trajectories (0: all)")] = 0,
    epochs: Annotated[int, typer.Option(help="qwen2-prm: passes of the student's distillation over --data")] = 8,
    extra_layers: Annotated[int, typer.Option(help="qwen2-prm: decoder layers the student adds on top of the "
                                                   "backbone")] = 2,
    backbone_lr: Annotated[float, typer.Option(help="qwen2-prm: learning rate of the backbone's own layers in the "
                                                    "student (0: frozen; the new layers and the head learn at "
                                                    "1e-3)")] = 1e-4,
    force: Annotated[bool, typer.Option("--force", help="replace an existing OUT")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a Hugging Face directory that vLLM serves as a pooling model (OUT/serve.json: the server command).

    --format vllm-ensemble (default): PRMFactoryEnsembleForProcessReward, the checkpoint's backbone, token features,
    E heads and step rule, served by this package's vLLM plugin: each step's ensemble mean, std and every head's
    probability, as `score --engine transformers` gives them. A checkpoint whose heads, token features or backbone
    the plugin does not know is refused, naming them.

    --format qwen2-prm: Qwen2ForProcessRewardModel, which any vLLM serves without the plugin: a student of vLLM's
    shape (the backbone, --extra-layers new decoder layers, one head) distilled from the ensemble mean on --data;
    a step is a line, scored at its newline (its id in OUT/config.json `step_tag_id`); no spread.

    Exit 2: a checkpoint, backbone or tokenizer the format cannot take, or bad data; nothing is left at OUT.
    """
    import shutil

    from tasks.prm.export import ExportError, export_ensemble, export_prm
    from tasks.prm.model import BACKBONE_DIR, CheckpointError, find_checkpoint_dir, load_prm
    from tasks.prm.score import ScoreInputError, read_trajectories
    from tasks.store.dataset import DatasetError, read_dataset, read_manifest

    if fmt not in ("vllm-ensemble", "qwen2-prm"):
        console.print(f"--format must be vllm-ensemble or qwen2-prm, got {fmt!r}", style="red")
        raise typer.Exit(2)
    if fmt == "qwen2-prm" and data is None:
        console.print("--format qwen2-prm distills a head: give --data", style="red")
        raise typer.Exit(2)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        console.print(f"{out} exists; pass --force to replace it", style="red")
        raise typer.Exit(2)
    work = out.parent / f".{out.name}.export-tmp"
    with _fails(CheckpointError, ScoreInputError, ExportError, DatasetError):
        shutil.rmtree(work, ignore_errors=True)
        if fmt == "vllm-ensemble":
            try:
                summary = export_ensemble(checkpoint, work, serve_path=out)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        else:
            if data.is_dir():
                read_manifest(data)
                table = read_dataset(data)
                prompts, completions = table.column("prompt").to_pylist(), table.column("completions").to_pylist()
            else:
                _, _, prompts, completions = read_trajectories(data)
            if limit > 0:
                prompts, completions = prompts[:limit], completions[:limit]
            prm = load_prm(checkpoint)
            source = find_checkpoint_dir(checkpoint) / BACKBONE_DIR
            try:
                with console.status(f"distilling one head from {prm.config['num_heads']} on {len(prompts)} "
                                    f"trajectories", spinner="dots") if not json_out else contextlib.nullcontext():
                    summary = export_prm(prm, source, prompts, completions, work, epochs=epochs,
                                         extra_layers=extra_layers, backbone_lr=backbone_lr, serve_path=out)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    summary["path"] = str(out)
    if json_out:
        print(json.dumps(summary))
        return
    if fmt == "vllm-ensemble":
        console.print(f"[green]exported[/green] {out} ({summary['architecture']}: {summary['num_heads']} heads, "
                      f"reads {summary['reads']}, token features {summary['token_features']}, step tag id "
                      f"{summary['step_tag_id']})")
    else:
        fit = summary["distillation"]
        console.print(f"[green]exported[/green] {out} ({summary['architecture']}, step tag id "
                      f"{summary['step_tag_id']}); head distilled from {summary['heads_distilled']} heads on "
                      f"{fit['steps']} steps: held-out mean |diff| "
                      f"{fit.get('held_out_mean_abs_diff', float('nan')):.3f}, correlation "
                      f"{fit.get('held_out_correlation', float('nan')):.3f}")
    console.print(f"serve: {json.loads((out / 'serve.json').read_text())['cli']}", markup=False, soft_wrap=True)
