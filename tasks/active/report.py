"""The active loop's report: a table of its rounds and the label-efficiency curve (held-out AUROC vs tokens)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

TABLE_COLUMNS = ("round", "selector", "unlabelled", "uncertain", "selected", "labelled_rows", "labelled_steps",
                 "label_tokens", "rollout_tokens", "cumulative_label_tokens", "train_loss", "heldout_step_auroc",
                 "trusted_share", "pseudo_label_acc", "error_share_selected", "error_share_scored",
                 "std_auroc_within_margin", "tokens_per_problem", "dataset_version", "version_id")
ROUNDED = ("train_loss", "heldout_step_auroc", "trusted_share", "pseudo_label_acc", "error_share_selected",
           "error_share_scored", "std_auroc_within_margin")


def round_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per round, the columns of ``TABLE_COLUMNS`` (floats rounded for display); tokens per problem
    is the round's labelling tokens over the problems it labelled (what a pick costs)."""
    rows = []
    for rec in records:
        row = {c: rec.get(c) for c in TABLE_COLUMNS}
        picks = rec.get("labelled_problems") or rec.get("selected")
        tokens = rec.get("label_tokens")
        row["tokens_per_problem"] = round(tokens / picks, 1) if picks and tokens else None
        for c in ROUNDED:
            if isinstance(row[c], float):
                row[c] = round(row[c], 4)
        rows.append(row)
    return rows


def curve_png(records: Sequence[dict[str, Any]], title: str) -> bytes:
    """The label-efficiency curve: held-out step AUROC after each round against cumulative labelling tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["cumulative_label_tokens"], r.get("heldout_step_auroc")) for r in records]
    points = [(x, y) for x, y in points if y is not None and x > 0]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o")
        for (x, y), rec in zip(points, [r for r in records if r.get("heldout_step_auroc") is not None], strict=False):
            ax.annotate(f"r{rec['round']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("labelling tokens generated (cumulative, log scale)")
    ax.set_ylabel("held-out step AUROC (toy ruler)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def report_markdown(title: str, records: Sequence[dict[str, Any]], stop: str, message: str,
                    curve_url: str | None) -> str:
    """The markdown report: stop reason, the rounds table, the curve (an image URL: a file name or a data URI)."""
    lines = [f"# {title}", "", f"Stopped: **{stop}** ({message}).", "",
             "| round | selector | unlabelled | uncertain | labelled | rows | steps | tokens | rollout tokens | "
             "cumulative | tokens per problem | train loss | held-out AUROC | trusted | pseudo-label acc | "
             "errors in picks | errors in scored | std AUROC within margin | dataset version |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in round_rows(records):
        fmt = {k: ("-" if v is None else v) for k, v in r.items()}
        lines.append(f"| {fmt['round']} | {fmt['selector']} | {fmt['unlabelled']} | {fmt['uncertain']} | "
                     f"{fmt['selected']} | {fmt['labelled_rows']} | {fmt['labelled_steps']} | "
                     f"{fmt['label_tokens']:,} | {fmt['rollout_tokens']:,} | {fmt['cumulative_label_tokens']:,} | "
                     f"{fmt['tokens_per_problem']} | {fmt['train_loss']} | {fmt['heldout_step_auroc']} | "
                     f"{fmt['trusted_share']} | {fmt['pseudo_label_acc']} | {fmt['error_share_selected']} | "
                     f"{fmt['error_share_scored']} | {fmt['std_auroc_within_margin']} | {fmt['dataset_version']} |")
    notes = [f"- round {r['round']}: {r['gate_note']}" for r in records if r.get("gate_note")]
    lines += ["", "Errors in picks / in scored: the share of trajectories with a wrong step (exact truth, toy world) "
              "among the round's picks and among all it scored, what a random pick gets. Std AUROC within margin: "
              "how well the heads' spread finds misclassified steps among steps of equal mean margin (0.5: it adds "
              "nothing to the mean)."]
    if notes:
        lines += ["", "## Gate", "", *notes]
    if curve_url:
        lines += ["", "## Label efficiency", "", f"![held-out step AUROC vs labelling tokens]({curve_url})"]
    return "\n".join(lines) + "\n"


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
