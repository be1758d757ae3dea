"""Dataset reports: the numbers from a hand-made dataset, the markdown, the PNG plots and `prm-factory inspect`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.labelling.label_rule import step_labels
from tasks.store.dataset import SCHEMA_VERSION, write_manifest, write_shard
from tasks.store.report import build_report, dataset_stats, render_markdown, render_plots, step_counts

PNG = b"\x89PNG\r\n\x1a\n"


def row(problem_id: str, counts: list[tuple[int, int]], entropies: list[float], final: bool) -> dict:
    """A row whose steps before the last have (k, N) rollout counts and whose last step is the outcome `final`;
    its labels are what the label rule gives (eta 1), as the dataset's row check demands."""
    n = len(counts) + 1
    successes, rollouts = [k for k, _ in counts] + [int(final)], [m for _, m in counts] + [1]
    origins = ["rollout"] * (n - 1) + ["final"]
    labels = step_labels(successes, rollouts, origins, 1.0, [None] * (n - 1) + [final])
    return {
        "prompt": "q\n", "completions": [f"s{i}" for i in range(n)], "labels": labels.hard_list(),
        "successes": successes, "rollouts": rollouts, "soft_labels": labels.soft_list(),
        "er_labels": labels.er_list(), "tree_value": labels.soft_list(), "eta": 1.0, "step_entropies": entropies,
        "entropy_kind": "exact",
        "problem_id": problem_id, "source": "toy", "split": "train", "policy_model": "m", "partitioner": "edu",
        "partitioner_params": "{}", "step_origin": origins, "answer": "1",
        "final_correct": final, "prompt_tokens": 3, "completion_tokens": 4, "rollout_tokens": 5, "tree_id": "t",
    }


def make_dataset(out: Path) -> Path:
    # Shard 0: 2 rows, 3 labelled steps (good, bad, good); shard 1: 1 row, 1 labelled step (bad).
    # ER at eta 1: 7/8 -> ln(1/8 + 7e/8) = 0.918, 2/5 -> ln(3/5 + 2e/5) = 0.523, 0/N -> 0.0.
    s0 = write_shard(out, 0, [
        row("a", [(7, 8), (0, 8)], [0.2, 1.5, 2.5], True),
        row("b", [(2, 5)], [0.1, 0.5], False),
    ], {"cost": {"generate_tokens": 10, "branch_tokens": 20, "rollout_tokens": 30, "generated_tokens": 60}})
    s1 = write_shard(out, 1, [row("c", [(0, 4)], [0.3, 3.0], False)],
                     {"cost": {"generate_tokens": 4, "branch_tokens": 0, "rollout_tokens": 6, "generated_tokens": 10}})
    write_manifest(out, schema_version=SCHEMA_VERSION,
                   config_hash="cafe", code_version="0.1.0", shards=[s0, s1], parents=["p1"],
                   extra={"name": "hand", "problems": 3, "quarantined": 1, "shard_keys": ["k0", "k1"],
                          "lineage": {"version": "0002-abcd", "parent": "p1", "reused_shards": [],
                                      "labelled_shards": [0, 1]}})
    (out / "build.json").write_text(json.dumps({"config": {"partition": {"tau": 1.0}}}))
    return out


def test_stats_count_labels_entropies_and_cost(tmp_path):
    stats = dataset_stats(make_dataset(tmp_path / "ds"))
    assert stats["rows"] == 3 and stats["shards"] == 2 and stats["steps"] == 7
    assert stats["labelled_steps"] == 4  # the final step of each row is not a labelled step
    assert stats["hard_labels"] == {"good": 2, "bad": 2}
    assert stats["step_origin"] == {"final": 3, "rollout": 4}
    assert stats["er_label_histogram"] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # 0.0 twice; 0.523; 0.918
    assert sorted(stats["entropies"]) == [0.5, 1.5, 2.5, 3.0]  # step 0 starts the solution: not an anchor
    assert stats["step_entropy"]["at_or_above_tau"] == 3 and stats["tau"] == 1.0
    assert stats["cost"] == {"generate_tokens": 14, "branch_tokens": 20, "rollout_tokens": 36,
                             "generated_tokens": 70}
    assert stats["tokens_per_labelled_step"] == 17.5
    assert [(p["shard"], p["labelled_steps"], p["tokens_per_labelled_step"]) for p in stats["per_shard"]] == [
        (0, 3, 20.0), (1, 1, 10.0)]
    assert stats["final_correct"] == 1 and stats["parents"] == ["p1"] and stats["version"] == "0002-abcd"


def test_markdown_names_counts_cost_and_this_run(tmp_path):
    stats = dataset_stats(make_dataset(tmp_path / "ds"))
    md = render_markdown(stats, {"status": "up_to_date", "version": "0002-abcd", "cost": {}, "seconds": 1.0})
    assert "**Up to date**" in md
    assert "| rows / shards | 3 / 2 |" in md
    assert "| generated | 70 | 0 |" in md
    assert "**Tokens per labelled step**: 17.5" in md
    assert "`p1`" in md


def test_build_report_writes_pngs_and_embeds_them(tmp_path):
    out = make_dataset(tmp_path / "ds")
    report = build_report(out, run={"cost": {"generated_tokens": 70}}, embed_images=True)
    assert set(report.images) == {"entropy", "labels", "cost"}
    for path in report.images.values():
        assert path.parent == out / "reports" and path.read_bytes().startswith(PNG)
    assert report.markdown.count("](data:image/png;base64,") == 3
    assert (out / "reports" / "report.md").read_text().count(".png)") == 3
    assert json.loads((out / "reports" / "stats.json").read_text())["rows"] == 3


def test_build_report_without_files_leaves_the_directory_alone(tmp_path):
    out = make_dataset(tmp_path / "ds")
    report = build_report(out, write_files=False)
    assert report.images == {} and not (out / "reports").exists()
    assert "reports/entropy.png" in report.markdown


def test_inspect_cli_prints_json(tmp_path):
    out = make_dataset(tmp_path / "ds")
    result = subprocess.run([sys.executable, "-m", "prm_factory.cli", "inspect", str(out), "--json"],
                            capture_output=True, text=True, check=True)
    stats = json.loads(result.stdout)
    assert stats["labelled_steps"] == 4 and stats["tokens_per_labelled_step"] == 17.5
    assert "entropies" not in stats


def test_step_counts_split_the_stored_hard_labels_at_the_final_step():
    rows = [{"labels": [True, False, True], "step_origin": ["rollout", "tree", "final"]},
            {"labels": [False, False], "step_origin": ["early_stop", "final"]}]
    counts = step_counts(rows)
    assert counts["step_origin"] == {"rollout": 1, "tree": 1, "early_stop": 1, "final": 2}
    assert counts["hard_labels"] == {"good": 1, "bad": 2} and counts["final_labels"] == {"good": 1, "bad": 1}
    with pytest.raises(ValueError):  # a row whose columns disagree in length is not counted
        step_counts([{"labels": [True], "step_origin": ["rollout", "final"]}])


def test_stats_and_markdown_handle_null_soft_and_er_labels(tmp_path):
    """Early-stop and rule-estimated steps have null soft/ER labels: counted, not binned, not a crash."""
    out = tmp_path / "ds"
    r = row("e", [(1, 3), (0, 1)], [0.2, 1.5, 2.5], True)
    r["step_origin"] = ["early_stop", "estimated", "final"]
    r["soft_labels"] = r["er_labels"] = [None, None, 1.0]
    r["labels"] = [True, False, True]  # early stop: 1 of 3 drawn, so 1[k > 0]; estimated: the rule said bad
    s0 = write_shard(out, 0, [r, row("f", [(2, 3)], [0.1, 0.5], True)],
                     {"cost": {"generated_tokens": 12}})
    write_manifest(out, schema_version=2, config_hash="cafe", code_version="0.1.0", shards=[s0], parents=[],
                   extra={"name": "nulls"})
    stats = dataset_stats(out)
    assert stats["step_origin"] == {"early_stop": 1, "estimated": 1, "final": 2, "rollout": 1}
    assert stats["hard_labels"] == {"good": 2, "bad": 1}
    assert stats["er_label_null_steps"] == 2
    assert stats["er_label_histogram"] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]  # only the rollout step's 2/3: 0.763
    assert "| steps without soft/ER label (early stop, estimated) | 2 |" in render_markdown(stats)
    assert set(render_plots(stats)) == {"entropy", "labels", "cost"}


def test_key_value_tables_have_a_header_and_run_counts_are_readable(tmp_path):
    stats = dataset_stats(make_dataset(tmp_path / "ds"))
    md = render_markdown(stats, {"status": "new_version", "shards_by_status": {"built": 2, "skipped": 1},
                                 "engine_started": True, "ray_dashboard": "http://127.0.0.1:4321", "cost": {}})
    assert "| | |" not in md  # an empty header row renders as a blank first row
    assert "| dataset | value |" in md and "| this run | value |" in md
    assert "| shards by status | built: 2, skipped: 1 |" in md
    assert "| engine started | yes |" in md
    # The dashboard's port changes on restart: shown as text with where to find the live one, never a link.
    assert "](http://127.0.0.1:4321" not in md and "`http://127.0.0.1:4321` at run time" in md


@pytest.mark.parametrize("figure, bars", [("cost_figure", 5), ("entropy_figure", 4)])
def test_plot_legends_cover_no_bar(tmp_path, figure, bars):
    import matplotlib.pyplot as plt

    from tasks.store import report

    fig = getattr(report, figure)(dataset_stats(make_dataset(tmp_path / "ds")))
    fig.tight_layout()
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    # cost: shard 0 has three stages, shard 1 two (no branch tokens); entropy: 4 entropies, 4 non-empty bins
    drawn = [p.get_window_extent() for p in ax.patches if p.get_height() > 0]
    assert len(drawn) == bars
    assert not any(legend.overlaps(b) for b in drawn)
    assert legend.x0 >= ax.get_window_extent().x1  # right of the plot area
    plt.close(fig)
