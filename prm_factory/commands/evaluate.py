"""Commands that measure: eval-policy (the policy on held-out toy problems), ruler (build or check the toy
ruler), eval (a step scorer on the toy ruler, best-of-N and ProcessBench)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from prm_factory.commands import ConfigOpt, JsonOpt, _fails, _load, console


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
