"""Commands that check a config and build a dataset from it: validate, doctor (preflight), ingest, build, and
partition (a look at the EDU trees a build grows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from prm_factory.commands import ConfigOpt, JsonOpt, VerboseOpt, _fails, _load, console


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


def ingest_cmd(
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
    from tasks.build import ingest, write_ingest
    from tasks.sources.loaders import SourceError

    cfg = _load(config, check_paths=False)
    out_dir = out or resolve_path(f"runs/{cfg.name}/ingest")
    with _fails(SourceError):
        ingested = ingest(cfg)
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


def build_cmd(
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
    from tasks.build import BuildError, build
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
            report = build(cfg, out_dir, _engine_factory(cfg, local, log_file), progress=on_requests,
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
