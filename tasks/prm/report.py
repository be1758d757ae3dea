"""A trained PRM's held-out numbers and its training report (pure functions + matplotlib PNGs).

``held_out_metrics`` judges per-step scores against the row's targets (BCE), its hard labels (AUROC,
accuracy at 0.5, calibration bins) and, for toy-world rows, the exact step truth from ``tasks.sources.toy_world``
(the label noise of rollouts does not blur that one). ``render_training_report`` turns a run's per-epoch
history and those metrics into markdown with embedded plots (loss curve, calibration).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from tasks.evaluation.metrics import accuracy, auroc
from tasks.prm.model import StepScores

CALIBRATION_BINS = 10


def toy_step_truth(prompt: str, completions: Sequence[str], prompt_template: str) -> list[bool] | None:
    """Exact truth of each step prefix of a toy-world row, or None when the prompt is not a toy problem."""
    from tasks.sources.problems import Problem
    from tasks.sources.prompts import question_from_prompt
    from tasks.sources.toy_world import SOURCE, prefix_is_correct

    try:
        problem = Problem.make(SOURCE, question_from_prompt(prompt, prompt_template), "")
        return [prefix_is_correct(problem, "".join(completions[: i + 1])) for i in range(len(completions))]
    except ValueError:
        return None


def calibration_bins(scores: Sequence[float], truth: Sequence[bool], bins: int = CALIBRATION_BINS
                     ) -> list[dict[str, Any]]:
    """Per equal-width score bin: count, mean score and the fraction of true steps (empty bins left out)."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, s in enumerate(scores) if lo <= s < hi or (b == bins - 1 and s == 1.0)]
        if idx:
            out.append({"lo": lo, "hi": hi, "count": len(idx), "mean_score": sum(scores[i] for i in idx) / len(idx),
                        "fraction_true": sum(bool(truth[i]) for i in idx) / len(idx)})
    return out


def expected_calibration_error(bins: Sequence[dict[str, Any]]) -> float:
    """Count-weighted mean |mean score - fraction true| over the bins."""
    total = sum(b["count"] for b in bins)
    return sum(b["count"] * abs(b["mean_score"] - b["fraction_true"]) for b in bins) / total if total else math.nan


def held_out_metrics(rows: Sequence[dict[str, Any]], scores: Sequence[StepScores], target: str,
                     prompt_template: str | None = None) -> dict[str, Any]:
    """Step-level numbers of PRM scores on held-out rows (steps cut off by truncation are left out)."""
    means, hard, truth_scores, truth, losses = [], [], [], [], []
    for row, s in zip(rows, scores, strict=True):
        exact = toy_step_truth(row["prompt"], row["completions"], prompt_template) if prompt_template else None
        for j, m in enumerate(s.mean):
            if math.isnan(m):
                continue
            means.append(m)
            hard.append(bool(row["labels"][j]))
            if exact is not None:
                truth_scores.append(m)
                truth.append(exact[j])
            y = row[target][j]
            if y is not None and not math.isnan(float(y)):
                p = min(max(m, 1e-7), 1 - 1e-7)
                losses.append(-(float(y) * math.log(p) + (1 - float(y)) * math.log(1 - p)))
    bins = calibration_bins(means, hard)
    out = {"rows": len(rows), "steps": len(means), "truncated_rows": sum(s.truncated for s in scores),
           "loss": sum(losses) / len(losses) if losses else math.nan,
           "auroc_vs_labels": auroc(means, hard) if means else math.nan,
           "accuracy_vs_labels": accuracy(means, hard) if means else math.nan,
           "calibration": bins, "ece_vs_labels": expected_calibration_error(bins)}
    if truth:
        out.update({"truth_steps": len(truth), "truth_positive": sum(truth) / len(truth),
                    "auroc_vs_truth": auroc(truth_scores, truth), "accuracy_vs_truth": accuracy(truth_scores, truth)})
    return out


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def render_plots(history: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes: the loss curve per epoch (train and held-out) and the calibration plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = {}
    fig, ax = plt.subplots(figsize=(5, 3))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train (BCE + pull)")
    ax.plot(epochs, [h.get("eval_loss", math.nan) for h in history], marker="s", label="held-out BCE")
    ax.set(title="PRM loss", xlabel="epoch", ylabel="loss")
    ax.legend()
    pngs["loss"] = _png(fig)
    if metrics.get("calibration"):
        fig, ax = plt.subplots(figsize=(4, 4))
        bins = metrics["calibration"]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
        ax.plot([b["mean_score"] for b in bins], [b["fraction_true"] for b in bins], marker="o", label="PRM")
        ax.set(title="calibration vs hard labels (held out)", xlabel="mean step score",
               ylabel="fraction of steps labelled good", xlim=(0, 1), ylim=(0, 1))
        ax.legend()
        pngs["calibration"] = _png(fig)
    return pngs


def _f(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_training_report(title: str, summary: dict[str, Any], metrics: dict[str, Any]) -> tuple[str, dict]:
    """(markdown with the plots embedded as data URIs, the PNG bytes by name)."""
    history = summary["history"]
    pngs = render_plots(history, metrics)
    lines = [f"# {title}", "",
             f"Run `{summary['run_dir']}`: {summary['global_step']} optimizer steps over {summary['epochs']} epochs "
             f"on dataset version `{summary['dataset_version']}` (PRM config `{summary['prm_config_hash']}`)"
             + ("" if summary.get("resumed_from_epoch") is None
                else f"; resumed after epoch {summary['resumed_from_epoch']}") + ".", "",
             "| epoch | step | train loss | BCE | pull | held-out loss | held-out AUROC | samples/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in history:
        lines.append(f"| {h['epoch']} | {h['global_step']} | {_f(h['train_loss'], 4)} | {_f(h['train_bce'], 4)} | "
                     f"{_f(h['train_pull'], 4)} | {_f(h.get('eval_loss'), 4)} | {_f(h.get('eval_auroc'))} | "
                     f"{_f(h['samples_per_s'], 1)} |")
    lines += ["", f"![loss curve](data:image/png;base64,{base64.b64encode(pngs['loss']).decode()})", "",
              "## Held-out set (problems never trained on)", "",
              "| rows | steps | truncated rows | loss | AUROC vs labels | acc vs labels | ECE | AUROC vs toy truth |"
              " acc vs toy truth |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {metrics['rows']} | {metrics['steps']} | {metrics['truncated_rows']} | {_f(metrics['loss'], 4)} | "
              f"{_f(metrics['auroc_vs_labels'])} | {_f(metrics['accuracy_vs_labels'])} | "
              f"{_f(metrics['ece_vs_labels'])} | {_f(metrics.get('auroc_vs_truth'))} | "
              f"{_f(metrics.get('accuracy_vs_truth'))} |", ""]
    if "calibration" in pngs:
        lines += [f"![calibration](data:image/png;base64,{base64.b64encode(pngs['calibration']).decode()})", ""]
    return "\n".join(lines), pngs
