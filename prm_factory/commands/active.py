"""The ActPRM active-labelling command: label only what the ensemble is unsure about, train, repeat."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from prm_factory.commands import ConfigOpt, JsonOpt, _fails, _load, console


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
