"""The ruler report summed up once (tasks/evaluation/summary.py) for `eval`, the training report and benchmarks."""

from __future__ import annotations

from tasks.evaluation.summary import best_of_n_rows, ruler_figures, ruler_markdown, steps_line

STEPS = {"within_position_auroc": 0.8521, "within_position_auroc_ci": [0.81, 0.889], "first_error_f1": 0.6,
         "threshold": 0.5, "step_auroc": 0.9, "step_accuracy": None, "unscored_steps": 3}
BON = {"ns": [1, 8], "accuracy": {"min_step": [0.5, 0.75], "majority": [0.5, 0.625], "random": [0.5, 0.5]},
       "ci": {"min_step": [[0.4, 0.6], [0.65, 0.85]], "majority": [[0.4, 0.6], [0.5, 0.75]]},
       "diff_vs_majority": {"min_step": [[0.0, 0.0], [-0.02, 0.27]]}, "oracle_any_correct": [0.5, 0.9]}


def test_steps_line_leads_with_the_metrics_position_cannot_win():
    assert steps_line(STEPS) == ("within-position AUROC 0.852 (95% CI 0.810-0.889), first-error F1@0.5 0.600; "
                                 "beside them: step AUROC 0.900, step accuracy -; 3 steps unscored")


def test_best_of_n_rows_and_figures():
    rows = dict(best_of_n_rows(BON))
    assert rows["min_step"] == ["0.500 (0.40-0.60)", "0.750 (0.65-0.85)"]
    assert rows["random"] == ["0.500", "0.500"]  # no interval recorded: none shown
    assert rows["min_step - majority"] == ["+0.000..+0.000", "-0.020..+0.270"]
    assert rows["(some sample right)"] == ["0.500", "0.900"]
    figures = ruler_figures({"steps": STEPS, "best_of_n": BON}, n=8)
    assert figures["bon8_min_step"] == 0.75 and figures["bon8_majority_ci"] == [0.5, 0.75]
    assert figures["bon8_min_step_minus_majority_ci"] == [-0.02, 0.27] and figures["bon8_any_right"] == 0.9


def test_ruler_markdown_is_the_training_reports_tables():
    steps = {**STEPS, "ruler_version": "toy-ruler-v1", "problems": 2, "trajectories": 4, "steps": 10,
             "correct_steps": 7}
    assert ruler_markdown({"steps": steps, "best_of_n": BON}).split("\n") == [
        "## Toy ruler (held-out policy trajectories, exact step truth)", "",
        "Ruler `toy-ruler-v1`: 2 problems, 4 trajectories, 10 steps (7 correct).", "",
        "| within-position AUROC (95% CI) | first-error F1 | step AUROC | step accuracy |",
        "|---:|---:|---:|---:|",
        "| 0.852 (0.810-0.889) | 0.600 | 0.900 | - |", "",
        "| best-of-N accuracy (95% CI) | N=1 | N=8 |",
        "|---|---:|---:|",
        "| min_step | 0.500 (0.40-0.60) | 0.750 (0.65-0.85) |",
        "| majority | 0.500 (0.40-0.60) | 0.625 (0.50-0.75) |",
        "| random | 0.500 | 0.500 |",
        "| min_step - majority | +0.000..+0.000 | -0.020..+0.270 |",
        "| (some sample right) | 0.500 | 0.900 |", ""]
    assert "best-of-N" not in ruler_markdown({"steps": steps})  # no best-of-N in the report: no table
