"""The `prm-factory` command. Each subcommand is a thin shell over functions in tasks/, cluster/ and flows/.

Heavy imports (torch, vLLM, Ray, Prefect) happen inside the commands, so `--help` and `validate`
answer in well under a second.
"""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from configs.env import set_quiet_env, use_hub_offline

set_quiet_env()  # telemetry off always; hub offline-ness follows each config (`offline:`), set in _load

app = typer.Typer(
    help="Build step-labelled PRM training data: EDU partitioning, ER-PRM labels, Parquet datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config (see configs/)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="engine and Ray logs on the terminal, not in "
                                                           "OUT/logs/engines.log")]


@app.callback()
def main() -> None:
    """Build step-labelled PRM training data: EDU partitioning, ER-PRM labels, Parquet datasets."""


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


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="YAML config to check")],
    json_out: JsonOpt = False,
    check_paths: Annotated[bool, typer.Option(
        "--check-paths/--no-check-paths",
        help="check that data files and the model exist (--no-check-paths: a config for another machine)")] = True,
) -> None:
    """Check a config without starting anything; exit 2 naming each bad field, or the part that does not fit the GPU.

    The memory planner (cluster/memory_plan.py) estimates training and vLLM engine memory per GPU from the models'
    config.json and checks it against train.gpu_memory_gb (or the GPU nvidia-smi reports here)."""
    from cluster.memory_plan import plan_config, report_lines

    cfg = _load(config, check_paths)
    memory = plan_config(cfg)
    if json_out:
        print(json.dumps({"ok": memory.ok, "name": cfg.name, "config_hash": cfg.config_hash(),
                          "memory": memory.as_dict()}))
    else:
        for line in report_lines(memory):
            console.print(line, markup=False, soft_wrap=True, style="dim")
        for problem in memory.problems:
            console.print(f"does not fit: {problem}", style="red", markup=False, soft_wrap=True)
        if memory.ok:
            console.print(f"[green]ok[/green] {config}: '{cfg.name}' (hash {cfg.config_hash()})")
    if not memory.ok:
        raise typer.Exit(2)


@app.command()
def ingest(
    config: ConfigOpt,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory (default: runs/<name>/ingest)")]
    = None,
    json_out: JsonOpt = False,
) -> None:
    """Load every source of a config; write problems.parquet and quarantine.jsonl; print counts per source.

    The same ingest as a build's first stage (tasks.build.ingest): what a build would quarantine, this does.
    The model is not needed here, so its path is not checked (a missing data file still fails, exit 2).
    """
    from rich.table import Table

    from configs.schema import resolve_path
    from tasks.build import ingest as run_ingest
    from tasks.build import write_ingest
    from tasks.sources.loaders import SourceError

    cfg = _load(config, check_paths=False)
    out_dir = out or resolve_path(f"runs/{cfg.name}/ingest")
    with _fails(SourceError):
        ingested = run_ingest(cfg)
    problems, quarantined, per_source = ingested.problems, ingested.quarantined, ingested.per_source
    with _fails(out=out_dir):
        problems_path, quarantine_path = write_ingest(cfg, ingested, out_dir)
    if json_out:
        print(json.dumps({"ok": True, "problems": str(problems_path), "quarantine": str(quarantine_path),
                          "kept": len(problems), "quarantined": len(quarantined), "sources": per_source}))
        return
    table = Table(title=f"ingest '{cfg.name}' -> {out_dir}")
    for col, justify in (("#", "right"), ("source", "left"), ("path", "left"), ("kept", "right"),
                         ("quarantined", "right"), ("top reasons", "left")):
        table.add_column(col, justify=justify)
    for row in per_source:
        reasons = ", ".join(f"{r} {n}" for r, n in list(row["reasons"].items())[:3])
        table.add_row(str(row["index"]), row["kind"], row["path"], f"{row['kept']:,}", f"{row['quarantined']:,}",
                      reasons or "-")
    console.print(table)
    console.print(f"[green]wrote[/green] {problems_path} ({len(problems):,} problems) and {quarantine_path} "
                  f"({len(quarantined):,} quarantined)")


def _engine_factory(cfg, local: bool, log_file: Path | None = None):
    """cluster.engines' factory; when the engines do not start, a line says where their log is.

    `log_file`: where the engines' start-up output goes (cluster.logs); None (--verbose) leaves it on the terminal.
    """
    from cluster.engines import start_policy_engines

    def start():
        try:
            return start_policy_engines(cfg, local=local, log_file=log_file)
        except Exception:
            if log_file is not None and log_file.exists():
                console.print(f"the engine did not start; its log: {log_file}", style="red", markup=False)
            raise

    return start


@app.command()
def build(
    config: ConfigOpt = Path("configs/toy.yaml"),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="dataset directory (default: dataset.out_dir)")] = (
        None
    ),
    local: Annotated[bool, typer.Option("--local", help="run the engine in this process instead of on Ray")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="when another build is writing OUT, wait for it instead of "
                                                      "refusing")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ingest, partition, roll out, label and write the Parquet dataset (resumes an interrupted build).

    One build writes OUT at a time: a second one refuses, naming the first (exit 2), or waits with --wait. Ray:
    no cluster.address starts a Ray of the build's own on 127.0.0.1 (or joins this checkout's `cluster up`).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster.connect import ClusterConnectError
    from cluster.engine_metrics import record_anchors
    from cluster.logs import engine_log_path
    from configs.models import ModelNotFoundError
    from configs.schema import resolve_path
    from tasks.build import BuildError
    from tasks.build import build as run_build
    from tasks.io import OutputLockedError
    from tasks.sources.prompts import PromptTemplateError

    cfg = _load(config)
    out_dir = out or resolve_path(cfg.dataset.out_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=json_out) as bar:
        shards = bar.add_task("shards", total=None)
        requests = bar.add_task("engine requests", total=None)

        def on_shard(plan, status):
            bar.update(shards, advance=1, description=f"shards (last: {plan.index} {status})")

        def on_requests(stage, n):
            bar.update(requests, advance=n, description=f"engine requests ({stage})")

        def on_plan(plans):
            bar.update(shards, total=len(plans))

        with _fails(BuildError, ModelNotFoundError, PromptTemplateError, ClusterConnectError, OutputLockedError,
                    out=out_dir):
            log_file = None if verbose else engine_log_path(out_dir)
            report = run_build(cfg, out_dir, _engine_factory(cfg, local, log_file), progress=on_requests,
                               on_plan=on_plan, on_shard=on_shard, wait=wait,
                               on_wait=lambda line: console.print(line, style="yellow", markup=False))
            record_anchors(report.cost.anchors)  # Ray metrics come from here, not from the labeller (no-op off Ray)
    summary = {
        "out_dir": str(report.out_dir), "version": report.manifest.get("dataset_version"), "rows": report.rows,
        "shards": report.shards_total, "shards_built": report.shards_built, "shards_skipped": report.shards_skipped,
        "quarantined": report.quarantined, "rejected": report.rejected, "cost": report.cost.to_dict(),
    }
    if json_out:
        print(json.dumps(summary))
        return
    console.print(f"[green]dataset written[/green] {report.out_dir} ({report.rows} rows, "
                  f"{report.shards_built} shards built, {report.shards_skipped} already done; "
                  f"{report.quarantined} problems quarantined, {report.rejected} rejected while labelling)")
    console.print(f"generated tokens this run: {report.cost.generated_tokens:,} "
                  f"(generate {report.cost.generate_tokens:,}, branch {report.cost.branch_tokens:,}, "
                  f"rollout {report.cost.rollout_tokens:,})")


@app.command("eval-policy")
def eval_policy(
    config: ConfigOpt = Path("configs/toy.yaml"),
    problems: Annotated[int, typer.Option("--problems", "-n", help="held-out toy problems to sample")] = 200,
    seed: Annotated[int, typer.Option(help="problem and sampling seed (the policy trained on 1000003/1000033)")] = 7,
    batch_size: Annotated[int, typer.Option(help="problems per generate() call")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Sample one temperature-1.0 solution per held-out toy problem; print accuracy, first errors, entropy."""
    from rich.table import Table

    from tasks.evaluation.policy_eval import TRAINING_SEEDS, eval_problems, evaluate_policy

    cfg = _load(config)
    if seed in TRAINING_SEEDS:
        console.print(f"[yellow]warning[/yellow]: seed {seed} is one the shipped policy was trained/stopped on")
    with _fails(ValueError):
        held_out = eval_problems(cfg, problems, seed)
    report = evaluate_policy(cfg.policy.model_path, held_out, cfg.policy.prompt_template, seed=seed,
                             batch_size=batch_size, max_new_tokens=cfg.rollouts.max_new_tokens,
                             show_progress=not json_out)
    if json_out:
        print(json.dumps(report.to_dict()))
        return
    console.print(f"{report.model_path} on {report.problems} held-out toy problems (seed {seed}, T=1.0): "
                  f"answer accuracy [bold]{report.accuracy:.1%}[/bold], every step right {report.fully_correct:.1%}, "
                  f"mean entropy {report.mean_entropy:.3f} nats/token, {report.mean_generated_tokens:.1f} "
                  f"tokens/solution ({report.seconds:.0f}s)")
    table = Table(title="first error (ProcessBench index)")
    table.add_column("where")
    table.add_column("solutions", justify="right")
    for where, count in report.first_error_by_position.items():
        table.add_row(where, str(count))
    console.print(table)


@app.command()
def partition(
    config: ConfigOpt = Path("configs/toy.yaml"),
    problems: Annotated[int, typer.Option("--problems", "-n", help="how many problems to show")] = 3,
    html_out: Annotated[Path | None, typer.Option("--html", help="write the first problem's tree as HTML")] = None,
    backend: Annotated[str | None, typer.Option(help="override policy.backend: vllm | transformers")] = None,
) -> None:
    """Grow EDU trees for a few problems and show their steps, high-entropy tokens highlighted."""
    from configs.schema import parse_config
    from tasks.build import ingest, load_tokenizer
    from tasks.cost import ShardCost
    from tasks.labelling.tree_labeller import ShardLabeller
    from tasks.labelling.tree_view import LeafView, leaf_text, tree_html

    cfg = _load(config)
    if backend:
        data = cfg.model_dump(mode="json")
        data["policy"]["backend"] = backend
        data["partition"]["entropy_source"] = "exact" if backend == "transformers" else "topk_lower"
        cfg = parse_config(data, f"{config} (backend {backend})")
    chosen = ingest(cfg).problems[:problems]
    from cluster.engines import start_policy_engines

    with console.status(f"starting the {cfg.policy.backend} engine"):
        engine = start_policy_engines(cfg, local=True)
    labeller = ShardLabeller(cfg, engine, load_tokenizer(cfg))
    cost = ShardCost()
    with console.status(f"growing {len(chosen)} trees"):
        _, trees = labeller.grow_trees(chosen, cost)
    tau = cfg.partition.tau
    for n, problem in enumerate(chosen):
        console.rule(f"problem {n}: {problem.question}  (answer {problem.answer})")
        views = []
        for leaf in trees[problem.problem_id]:
            view = LeafView(labeller.token_texts(leaf.token_ids), leaf.entropy, labeller.boundaries(leaf),
                            leaf.branch_at, leaf.depth, leaf.final_correct)
            views.append(view)
            console.print(leaf_text(view, tau))
        if n == 0 and html_out:
            html_out.write_text(tree_html(problem.question, views, tau, f"{cfg.name}: {problem.problem_id}"))
            console.print(f"tree written to {html_out}")
    console.print(f"partitioner {labeller.partitioner.name} {labeller.partitioner.params()}; "
                  f"{sum(len(t) for t in trees.values())} leaves, {cost.generated_tokens:,} generated tokens")


@app.command()
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


cluster_app = typer.Typer(help="A local single-node Ray cluster (dashboard on 127.0.0.1).", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(
    port: Annotated[int, typer.Option(help="GCS port")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="dashboard port (bound to 127.0.0.1)")] = 8265,
    metrics_export_port: Annotated[int, typer.Option(help="Prometheus metrics port")] = 8080,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs to offer (default: all)")] = None,
    num_gpus: Annotated[int | None, typer.Option(help="GPUs to offer (default: all)")] = None,
    node_ip: Annotated[str, typer.Option(
        help="interface the Ray listeners bind (127.0.0.1: this machine only; the head's address for multi-node)",
    )] = "127.0.0.1",
    json_out: JsonOpt = False,
) -> None:
    """Start a local Ray head node with the dashboard on 127.0.0.1 and token auth on."""
    from cluster.local import LocalClusterError, up

    with _fails(LocalClusterError, code=1):
        state = up(port=port, dashboard_port=dashboard_port, metrics_export_port=metrics_export_port,
                   num_cpus=num_cpus, num_gpus=num_gpus, node_ip=node_ip)
    if json_out:
        print(json.dumps(state))
        return
    console.print(f"[green]cluster up[/green] at {state['address']}; dashboard {state['dashboard_url']} "
                  f"(token: `ray get-auth-token`); metrics {state['metrics_url']}")


@cluster_app.command("status")
def cluster_status(
    address: Annotated[str | None, typer.Option(help="a cluster address (default: the local one)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Print the dashboard URL, resources and the live prm-factory actors."""
    from cluster.local import status

    info = status(address=address)
    if json_out:
        print(json.dumps(info, default=str))
        return
    if not info.get("running"):
        console.print(f"no cluster running {info.get('error', '')}", markup=False)
        raise typer.Exit(1)
    from cluster.local import format_resource

    console.print(f"[green]running[/green] {info['address']} ({info['nodes']} node(s)"
                  f"{', started by ' + info['started_by'] if info.get('started_by') else ''})", markup=True)
    console.print(f"  dashboard {info['dashboard_url']} (auth: {info['auth']})", markup=False)
    console.print(f"  metrics   {info['metrics_url'] or '-'}", markup=False)
    for key in sorted(info["resources"]):
        if not key.startswith("node:") and "_group_" not in key:
            free, total = info["available"].get(key, 0), info["resources"][key]
            console.print(f"  {key}: {format_resource(key, free)} free of {format_resource(key, total)}",
                          markup=False)
    console.print(f"prm-factory actors: {len(info['actors'])}")
    for actor in info["actors"]:
        health = actor.get("health") or {}
        detail = actor.get("error") or f"{health.get('backend', '?')} {health.get('model_path', '')}"
        console.print(f"  {actor['name']}: {detail}", markup=False)


@cluster_app.command("down")
def cluster_down(json_out: JsonOpt = False) -> None:
    """Stop the local cluster started by `cluster up` (no other Ray on this machine is touched)."""
    from cluster.local import down

    info = down()
    if json_out:
        print(json.dumps(info))
    else:
        console.print("stopped" if info["stopped"] else info["reason"], markup=False)



@app.command()
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


@app.command("export-dataset")
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


@app.command()
def serve(
    check: Annotated[bool, typer.Option("--check", help="start the server, deploy prefect.yaml, list, stop")] = False,
    port: Annotated[int | None, typer.Option("--port", help="Prefect server port (default: a free one)")] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url",
        help="Prefect database (default: SQLite under runs/prefect; e.g. postgresql+asyncpg://user:pw@host/prefect)",
    )] = None,
) -> None:
    """Local Prefect server + deployments + worker + Ray (every listener on 127.0.0.1) until Ctrl-C."""
    from cluster.prefect_stack import ServeError
    from cluster.prefect_stack import serve as run_serve

    with _fails(ServeError, code=1):
        code = run_serve(check=check, port=port, database_url=database_url,
                         echo=lambda line: console.print(line, markup=False, soft_wrap=True))
    raise typer.Exit(code)


@app.command()
def doctor(
    config: Annotated[Path, typer.Argument(help="YAML config to check a run of")],
    json_out: JsonOpt = False,
) -> None:
    """Preflight: data, model (path or id), torch/vLLM, GPUs, memory per GPU, Ray, disk; one line per check, then
    the memory planner's breakdown; exit 1 on a failure."""
    from cluster.memory_plan import plan_config, report_lines
    from cluster.preflight import report, run_checks

    cfg = _load(config, check_paths=False)  # missing files are reported as checks, not as a config error
    memory = plan_config(cfg)
    checks = run_checks(cfg, memory)
    if json_out:
        print(json.dumps({**report(checks), "memory": memory.as_dict()}))
    else:
        for check in checks:
            console.print(check.line(), style=None if check.ok else "red", markup=False, soft_wrap=True)
        for line in report_lines(memory):
            console.print(f"     {line}", style="dim", markup=False, soft_wrap=True)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@app.command("ruler")
def ruler_cmd(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="where to write it (default: --spec's shipped assets/toy-ruler or assets/toy-ruler-v2)")]
    = None,
    spec_name: Annotated[str, typer.Option("--spec", help="v1 (the toy policy's samples) | v2 (toy world v2: the "
                                                          "policy with confident misconceptions, issue 21)")] = "v1",
    force: Annotated[bool, typer.Option("--force", help="rebuild even if a valid ruler is there")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Build the toy ruler (fixed, seeded, held-out trajectories with exact step truth) or check the one there."""
    from rich.progress import Progress

    from configs.schema import resolve_path
    from tasks.evaluation.ruler import SHIPPED_RULERS, build_ruler, load_ruler
    from tasks.evaluation.scorers import EvaluationError

    if spec_name not in SHIPPED_RULERS:
        console.print(f"--spec must be one of {', '.join(SHIPPED_RULERS)}, got {spec_name!r}", style="red",
                      markup=False)
        raise typer.Exit(2)
    shipped_dir, spec = SHIPPED_RULERS[spec_name]
    target = resolve_path(out or shipped_dir)
    manifest = None
    if not force and (target / "manifest.json").is_file():
        with _fails(EvaluationError, note="; rebuild with --force"):
            manifest = load_ruler(target, spec).manifest
    if manifest is None:
        with Progress(console=console, disable=json_out, transient=True) as bar:
            task = bar.add_task(f"sampling {spec.version}", total=spec.num_problems)
            import torch

            from cluster.hf_engine import HFEngine

            # One thread: the model is tiny, and more threads on a shared 2-core machine spin against each other
            # (measured: 0.6 s per problem with 1 thread, 48 s with the default while other jobs ran).
            torch.set_num_threads(1)
            engine = HFEngine(str(resolve_path(spec.policy_path)), dtype="float32", seed=spec.sample_seed)
            manifest = build_ruler(target, spec, engine, progress=lambda n: bar.advance(task, n))
    keys = ("ruler_version", "spec_hash", "content_hash", "problems", "trajectories", "steps", "correct_steps",
            "final_correct")
    summary = {"path": str(target), **{k: manifest[k] for k in keys}}
    if json_out:
        print(json.dumps(summary))
    else:
        console.print(f"[green]ruler[/green] {summary['ruler_version']} at {target}: {summary['problems']} problems, "
                      f"{summary['trajectories']} trajectories, {summary['steps']} steps "
                      f"({summary['correct_steps']} correct), content {summary['content_hash'][:16]}")


def _parse_ns(text: str) -> list[int]:
    if text.strip().lower() in ("", "none", "0"):
        return []
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ns = [0]
    if not ns or min(ns) < 1:
        console.print(f"--bon must be a comma-separated list of N >= 1 (or 'none'), got {text!r}", style="red",
                      markup=False)
        raise typer.Exit(2)
    return ns


def _load_scorer(checkpoint: Path | None, scorer: str | None, device: str, ruler, model: Path | None = None):
    """The StepScorer for `eval`: a trained PRM checkpoint, or a reference scorer (policy-confidence reads the
    policy named in `ruler`'s manifest, model-confidence the `model` given)."""
    from tasks.evaluation.reference_scorers import REFERENCE_SCORERS, reference_scorer

    if (checkpoint is None) == (scorer is None):
        console.print(f"give exactly one of --checkpoint RUN or --scorer {'|'.join(REFERENCE_SCORERS)}", style="red")
        raise typer.Exit(2)
    if scorer is not None:
        if scorer not in REFERENCE_SCORERS:
            console.print(f"--scorer must be one of {list(REFERENCE_SCORERS)}, got {scorer!r}", style="red",
                          markup=False)
            raise typer.Exit(2)
        if (model is not None) != (scorer == "model-confidence"):
            console.print("--model PATH goes with --scorer model-confidence, and only with it", style="red")
            raise typer.Exit(2)
        name = scorer if model is None else f"{scorer} ({model})"
        return reference_scorer(scorer, ruler, device, model), name
    from tasks.prm.model import CheckpointError, load_prm

    with _fails(CheckpointError, FileNotFoundError):
        return load_prm(checkpoint, device=device), str(checkpoint)


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="PRM run directory written by `train`")]
    = None,
    scorer: Annotated[str | None, typer.Option(
        "--scorer", help="a reference scorer instead of a checkpoint (toy ruler/BoN only): oracle | constant | "
                         "position (earlier steps higher) | policy-confidence (the sampling policy's own token "
                         "probabilities) | model-confidence (--model's probabilities of the policy's tokens)")]
    = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="with --scorer model-confidence: the causal LM directory whose confidence scores the steps "
                        "(e.g. assets/toy-policy, which knows the v1 rules, on the v2 ruler)")] = None,
    processbench: Annotated[Path | None, typer.Option(
        "--processbench", help="ProcessBench directory (gsm8k/math/olympiadbench/omnimath .json)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="ProcessBench samples per subset (half erroneous)")]
    = None,
    ruler: Annotated[Path, typer.Option("--ruler", help="toy ruler directory (assets/toy-ruler-v2: toy world v2)")]
    = Path("assets/toy-ruler"),
    no_ruler: Annotated[bool, typer.Option("--no-ruler", help="skip the toy ruler and best-of-N")] = False,
    ruler_problems: Annotated[int | None, typer.Option("--ruler-problems", help="use the ruler's first K problems")]
    = None,
    bon: Annotated[str, typer.Option("--bon", help="best-of-N sizes, comma-separated ('none' to skip)")]
    = "1,2,4,8,16",
    dataset: Annotated[Path | None, typer.Option(
        "--dataset", help="the PRM's training dataset: refuse if it shares a problem with the ruler (default: "
                          "the problems the checkpoint records it was trained on)")] = None,
    threshold: Annotated[float, typer.Option(help="a step scoring below this is judged wrong")] = 0.5,
    batch_size: Annotated[int, typer.Option(help="trajectories per scorer batch")] = 16,
    device: Annotated[str, typer.Option(help="device for a checkpoint: cpu | cuda")] = "cpu",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the report as JSON here")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a step scorer on the toy ruler (within-position AUROC, first-error F1, best-of-N with 95% CIs,
    step AUROC beside them) and on ProcessBench (F1)."""
    import time

    from tasks.evaluation.processbench import evaluate_processbench
    from tasks.evaluation.ruler import check_disjoint, dataset_problem_ids, evaluate_ruler, load_ruler, shipped_spec
    from tasks.evaluation.scorers import EvaluationError
    from tasks.prm.model import CheckpointError, training_problem_ids

    ns = _parse_ns(bon)
    if scorer is not None and processbench is not None:
        console.print("--scorer: reference scorers know only the toy ruler; ProcessBench needs --checkpoint",
                      style="red")
        raise typer.Exit(2)
    if no_ruler and processbench is None:
        console.print("nothing to evaluate: --no-ruler without --processbench", style="red")
        raise typer.Exit(2)
    t0 = time.time()
    report: dict = {"threshold": threshold}
    with _fails(EvaluationError, CheckpointError):
        loaded_ruler = None
        if not no_ruler:
            # a shipped ruler (v1, v2) must be exactly its spec; another set (a fresh one) is checked by its own hashes
            loaded_ruler = load_ruler(ruler, shipped_spec(ruler)).limited(ruler_problems)
            if checkpoint is not None or dataset is not None:
                if dataset is not None:
                    trained_on, what = dataset_problem_ids(dataset), f"dataset {dataset}"
                else:  # what the trainer recorded in the checkpoint
                    trained_on, what = training_problem_ids(checkpoint)
                if trained_on is None:
                    console.print(f"[yellow]warning[/yellow]: {what}; the ruler's disjointness from the training "
                                  "data is not checked (give --dataset)", soft_wrap=True)
                else:
                    check_disjoint(loaded_ruler, trained_on, what)
                report["disjoint_from"] = what
            per_problem = loaded_ruler.manifest["spec"]["samples_per_problem"]
            if ns and max(ns) > per_problem:
                raise EvaluationError(f"--bon {max(ns)} exceeds the ruler's {per_problem} samples per problem")
        if processbench is not None and not processbench.is_dir():
            raise EvaluationError(f"ProcessBench directory not found: {processbench}")
        step_scorer, scorer_name = _load_scorer(checkpoint, scorer, device, loaded_ruler, model)
        report["scorer"] = scorer_name
        if loaded_ruler is not None:
            report["ruler"] = evaluate_ruler(step_scorer, loaded_ruler, ns, threshold, batch_size)
        if processbench is not None:
            report["processbench"] = evaluate_processbench(step_scorer, processbench, limit=limit,
                                                           threshold=threshold, batch_size=batch_size,
                                                           format_prompt=step_scorer.format_prompt)
    report["seconds"] = round(time.time() - t0, 1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    if json_out:
        print(json.dumps(report))
        return
    _print_eval(report)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _print_eval(report: dict) -> None:
    from rich.table import Table

    from tasks.evaluation.summary import best_of_n_rows, steps_line

    if "ruler" in report:
        st = report["ruler"]["steps"]
        console.print(f"ruler {st['ruler_version']} ({st['problems']} problems, {st['trajectories']} trajectories, "
                      f"{st['steps']} steps, {st['correct_steps']} correct), scorer {report['scorer']}:")
        console.print(f"  {steps_line(st)}", soft_wrap=True, markup=False)
        if "best_of_n" in report["ruler"]:
            b = report["ruler"]["best_of_n"]
            table = Table(title=f"best-of-N accuracy (95% CI over problems), scorer {report['scorer']}")
            table.add_column("selector")
            for n in b["ns"]:
                table.add_column(f"N={n}", justify="right")
            for name, cells in best_of_n_rows(b):
                table.add_row(name, *cells)
            console.print(table)
    if "processbench" in report:
        pb = report["processbench"]
        table = Table(title=f"ProcessBench (limit {pb['limit']}, threshold {pb['threshold']:g}), percent")
        for col in ("subset", "samples", "error acc", "correct acc", "F1", "truncated"):
            table.add_column(col, justify="left" if col == "subset" else "right")
        for r in pb["subsets"]:
            table.add_row(r["subset"], str(r["samples"]), _pct(r["error_acc"]), _pct(r["correct_acc"]), _pct(r["f1"]),
                          str(r["truncated"]))
        table.add_row("mean", "", "", "", _pct(pb["mean_f1"]), "")
        console.print(table)


@app.command("train")
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


@app.command("score")
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

    from tasks.prm.model import CheckpointError, load_prm
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
        exported = (checkpoint / "config.json").is_file() and not (checkpoint / "prm_config.json").is_file()
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
        q = summary["quality"]

        def f3(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

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


@app.command("export")
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


@app.command()
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


@app.command("active")
def active_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="the run's directory; the same dir again resumes it")],
    config: ConfigOpt = Path("configs/toy-active.yaml"),
    local: Annotated[bool, typer.Option("--local", help="run the engine in this process instead of on Ray")] = False,
    json_out: JsonOpt = False,
) -> None:
    """ActPRM active labelling: label only the trajectories the PRM ensemble is unsure about, train, repeat.

    Round 0 labels a random seed set; each later round scores the unlabelled pool with the last PRM, labels the
    uncertain trajectories (EDU tree + ER-PRM rollouts) and trains on Ray Train, warm-started. With
    active.schedule streaming: one pass over the pool in batches, each gated by the current PRM, only its uncertain
    part labelled and trained on. Every round prints the gate's trusted share. A killed run
    resumes at its last finished round and buys no label twice. Exit 2: bad config, empty pool, a budget below
    one problem's labelling cost, or an OUT of another config (all before any engine starts).
    """
    from cluster.active_run import run_active
    from cluster.connect import ClusterConnectError
    from tasks.active.loop import ActiveError, estimate_label_cost, format_round_line
    from tasks.prm.training import TrainError

    cfg = _load(config)
    act = cfg.active
    if not json_out:
        est = estimate_label_cost(cfg)
        budget = "no budget" if act.label_token_budget is None else f"budget {act.label_token_budget:,} tokens"
        sel = act.selection
        thresholds = (f"calibrated to a trusted share of {sel.calibrate_trusted_share}"
                      if sel.calibrate_trusted_share is not None
                      else sel.preset if sel.delta_pred is None else "custom")
        schedule = (f"{act.rounds} rounds" if act.schedule == "rounds"
                    else f"streaming in batches of {act.batch_size}")
        console.print(f"active loop '{cfg.name}': {schedule}, selector {act.selector} ({thresholds} thresholds), "
                      f"{budget}; one problem's labels estimated at {est['tokens']:,} tokens ({est['how']})",
                      markup=False, soft_wrap=True)

    def on_event(kind: str, payload: dict) -> None:
        if json_out:
            return
        if kind == "pool":
            console.print(f"pool: {payload['trajectories']} trajectories ({payload['pool_tokens']:,} tokens to "
                          f"generate); {payload['resumed_rounds']} rounds already done", markup=False)
        elif kind == "round":
            console.print(format_round_line(payload), markup=False, soft_wrap=True)
        elif kind == "stop":
            console.print(f"stopped: {payload['message']}", markup=False, soft_wrap=True)

    with _fails(ActiveError, ClusterConnectError, out=out), _fails(TrainError, code=1):
        result = run_active(cfg, out, local=local, on_event=on_event)
    if json_out:
        print(json.dumps(result.to_dict(), default=str))
        return
    from rich.table import Table

    table = Table(title=f"active run {result.out_dir}: {result.stop_reason}")
    for col in ("round", "pool", "uncertain", "bought", "steps", "tokens", "total", "loss", "AUROC"):
        table.add_column(col, justify="right")
    for r in result.rounds:
        auroc = r.get("heldout_step_auroc")
        table.add_row(str(r["round"]), str(r["unlabelled"]), "-" if r["selector"] == "random" else str(r["uncertain"]),
                      str(r["selected"]), str(r["labelled_steps"]), f"{r['label_tokens']:,}",
                      f"{r['cumulative_label_tokens']:,}",
                      "-" if r.get("train_loss") is None else f"{r['train_loss']:.3f}",
                      "-" if auroc is None else f"{auroc:.3f}")
    console.print(table)
    console.print(f"{result.message}; {result.label_tokens:,} labelling tokens in all (pool: unlabelled "
                  "trajectories at the round's start; bought: problems labelled; AUROC: held-out step AUROC on the "
                  f"toy ruler); every figure and hash per round in {result.out_dir / 'rounds.jsonl'}",
                  markup=False, soft_wrap=True)


if __name__ == "__main__":
    app()
