"""The toy ruler's report (``tasks.evaluation.ruler.evaluate_ruler``) summed up for people and for JSON, once.

``steps_line`` and ``best_of_n_rows`` are what `prm-factory eval` prints, ``ruler_markdown`` the training report's
tables (flows/train_prm.py); ``ruler_figures`` is the flat dict of headline figures the benchmarks and studies record.
"""

from __future__ import annotations

from typing import Any


def f3(x: float | None) -> str:
    """A figure to 3 decimals, or "-" when there is none."""
    return "-" if x is None else f"{x:.3f}"


def steps_line(steps: dict[str, Any]) -> str:
    """The per-step metrics in one line: the two that position cannot win first (with the 95% interval), then the
    pooled ones beside them."""
    ci = steps.get("within_position_auroc_ci")
    return (f"within-position AUROC {f3(steps['within_position_auroc'])}"
            + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
            + f", first-error F1@{steps['threshold']:g} {f3(steps['first_error_f1'])}; beside them: step AUROC "
            f"{f3(steps['step_auroc'])}, step accuracy {f3(steps['step_accuracy'])}"
            + (f"; {steps['unscored_steps']} steps unscored" if steps.get("unscored_steps") else ""))


def best_of_n_rows(bon: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, one cell per N) rows of the best-of-N table: each selector's accuracy with its 95% interval, each
    selector minus majority vote (paired interval), and the share of problems where some sample is right."""
    rows = []
    for name, accs in bon["accuracy"].items():
        cis = bon.get("ci", {}).get(name) or [None] * len(accs)
        rows.append((name, [f"{a:.3f}" + (f" ({c[0]:.2f}-{c[1]:.2f})" if c else "")
                            for a, c in zip(accs, cis, strict=True)]))
    for name, diffs in bon.get("diff_vs_majority", {}).items():
        rows.append((f"{name} - majority", [f"{d[0]:+.3f}..{d[1]:+.3f}" for d in diffs]))
    rows.append(("(some sample right)", [f"{a:.3f}" for a in bon["oracle_any_correct"]]))
    return rows


def ruler_markdown(report: dict[str, Any]) -> str:
    """The ruler's tables for the training report: the metrics position cannot win first, with 95% intervals."""
    st = report["steps"]
    ci = st.get("within_position_auroc_ci")
    lines = ["## Toy ruler (held-out policy trajectories, exact step truth)", "",
             f"Ruler `{st['ruler_version']}`: {st['problems']} problems, {st['trajectories']} trajectories, "
             f"{st['steps']} steps ({st['correct_steps']} correct).", "",
             "| within-position AUROC (95% CI) | first-error F1 | step AUROC | step accuracy |",
             "|---:|---:|---:|---:|",
             f"| {f3(st['within_position_auroc'])}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
             + f" | {f3(st['first_error_f1'])} | {f3(st['step_auroc'])} | {f3(st['step_accuracy'])} |", ""]
    if "best_of_n" in report:
        bon = report["best_of_n"]
        lines += ["| best-of-N accuracy (95% CI) | " + " | ".join(f"N={n}" for n in bon["ns"]) + " |",
                  "|---|" + "---:|" * len(bon["ns"])]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in best_of_n_rows(bon)]
        lines.append("")
    return "\n".join(lines)


def ruler_figures(report: dict[str, Any], n: int = 8) -> dict[str, Any]:
    """The headline figures of a ruler report with best-of-N at `n`, flat, for a benchmark's JSON."""
    st, bon = report["steps"], report["best_of_n"]
    i = bon["ns"].index(n)
    return {"within_position_auroc": st["within_position_auroc"], "within_position_auroc_ci":
            st["within_position_auroc_ci"], "first_error_f1": st["first_error_f1"], "step_auroc": st["step_auroc"],
            f"bon{n}_min_step": bon["accuracy"]["min_step"][i], f"bon{n}_min_step_ci": bon["ci"]["min_step"][i],
            f"bon{n}_majority": bon["accuracy"]["majority"][i], f"bon{n}_majority_ci": bon["ci"]["majority"][i],
            f"bon{n}_min_step_minus_majority_ci": bon["diff_vs_majority"]["min_step"][i],
            f"bon{n}_random": bon["accuracy"]["random"][i], f"bon{n}_any_right": bon["oracle_any_correct"][i]}
