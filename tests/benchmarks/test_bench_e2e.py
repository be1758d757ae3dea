"""The end-to-end benchmark's summary arithmetic and run_all's carry-on-after-failure, on hand-made inputs.

No engine, no training: the curves, the two headline ratios of issue 14 and run_all's report are pure bookkeeping
over points, so they are checked against values computed by hand here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def e2e():
    return _load("bench_e2e")


@pytest.fixture(scope="module")
def run_all():
    return _load("run_all")


def _points() -> list[dict]:
    pts = []
    for seed, (a8, a4) in enumerate([(0.70, 0.60), (0.74, 0.62)]):
        pts.append({"arm": "ms-8", "seed": seed, "tokens": 10000 + 2000 * seed, "problems": 48, "step_auroc": a8})
        pts.append({"arm": "ms-4", "seed": seed, "tokens": 5000, "problems": 48, "step_auroc": a4})
        pts.append({"arm": "edu-4", "seed": seed, "tokens": 3000, "problems": 48, "step_auroc": 0.68 + 0.02 * seed})
        # ActPRM: round 0 at 0.60/0.62, round 1 at 0.71/0.73 (mean 0.72 >= ms-8's mean 0.72), round 2 higher.
        for rnd, (tok, au) in enumerate([(400, 0.60 + 0.02 * seed), (800, 0.71 + 0.02 * seed), (1200, 0.80)]):
            pts.append({"arm": "actprm", "seed": seed, "round": rnd, "tokens": tok, "pool_tokens": 200,
                        "problems": 6 * (rnd + 1), "step_auroc": au})
    return pts


def test_curves_average_seeds_and_keep_the_spread(e2e):
    cur = e2e.curves(_points(), ["step_auroc"])
    ms8 = next(r for r in cur["ms"] if r["arm"] == "ms-8")
    assert ms8["tokens"] == 11000 and ms8["step_auroc"]["mean"] == pytest.approx(0.72)
    assert (ms8["step_auroc"]["min"], ms8["step_auroc"]["max"]) == (0.70, 0.74)
    assert [r["step"] for r in cur["actprm"]] == [0, 1, 2]
    assert cur["actprm"][1]["step_auroc"]["mean"] == pytest.approx(0.72)
    assert cur["actprm"][1]["pool_tokens"] == 200


def test_headline_ratios_by_hand(e2e):
    h = e2e.headline(e2e.curves(_points(), ["step_auroc"]), "step_auroc", "edu-4")
    # ms-8: 11,000 tokens at mean AUROC 0.72; ActPRM first reaches 0.72 at round 1, 800 tokens (1,000 with the pool).
    assert h["actprm_reaches_ms8"]["round"] == 1
    assert h["token_ratio_ms8_over_actprm"] == pytest.approx(11000 / 800)
    assert h["token_ratio_with_pool"] == pytest.approx(11000 / 1000)
    assert h["goal_20x_met"] is False  # 13.75x
    # Full data: edu-4 on 48 problems at mean 0.69; ActPRM's round 1 (12 problems, 0.72) is the first to reach it.
    assert h["actprm_reaches_full"]["problems"] == 12
    assert h["label_share_problems"] == pytest.approx(12 / 48)
    assert h["label_share_tokens"] == pytest.approx(800 / 3000)
    assert h["goal_30pct_met"] is True


def test_headline_says_not_reached(e2e):
    pts = [p for p in _points() if not (p["arm"] == "actprm" and p["round"] > 0)]
    h = e2e.headline(e2e.curves(pts, ["step_auroc"]), "step_auroc", "edu-4")
    assert h["actprm_reaches_ms8"] is None and h["goal_20x_met"] is False
    assert h["actprm_reaches_full"] is None and h["goal_30pct_met"] is False
    assert h["actprm_best"] == {"round": 0, "tokens": 400, "step_auroc": pytest.approx(0.61)}


def test_run_all_goes_on_after_a_failing_step_and_marks_it(run_all, tmp_path):
    bad = run_all.Run("bad", [sys.executable, "-c", "import sys; print('| a | b |'); sys.exit(3)"], 60)
    slow = run_all.Run("slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    dependent = run_all.Run("dep", [sys.executable, "-c", "print('never')"], 60, needs=["bad"])
    good = run_all.Run("good", [sys.executable, "-c", "print('| x | y |\\n|---|---|\\n| 1 | 2 |')"], 60)
    done: dict = {}
    for r in (bad, slow, dependent, good):
        run_all.run_one(r, tmp_path, done)
        done[r.name] = r
    assert (bad.status, bad.reason) == ("failed", "exit code 3")
    assert slow.status == "failed" and slow.reason.startswith("timed out after 1 s")
    assert (dependent.status, dependent.reason) == ("skipped", "needs bad, which did not finish")
    assert good.status == "ok" and "| 1 | 2 |" in good.output_tail
    report = tmp_path / "REPORT.md"
    meta = {"command": "benchmarks/run_all", "started": "2026-11-23 20:00", "machine": run_all.machine()}
    run_all.write_report([bad, slow, dependent, good], ["newbench"], tmp_path, report, meta)
    text = report.read_text()
    run_all.report_only(tmp_path, report)  # rebuilt from run_all.json and the logs: the same figures
    assert report.read_text().split("## Machine")[1].split("load average")[0] == \
        text.split("## Machine")[1].split("load average")[0]
    assert "| bad | failed: exit code 3 |" in report.read_text() and "| 1 | 2 |" in report.read_text()
    assert "| bad | failed: exit code 3 |" in text
    assert "| dep | skipped: needs bad, which did not finish |" in text
    assert "| newbench | not run: no CI size in benchmarks/run_all.py |" in text
    assert "| 1 | 2 |" in text


def test_headline_judges_no_goal_below_the_scorer_free_floor(e2e):
    # ms-8's mean 0.72 is below a floor of 0.75 (say, a random pick at best-of-N): reaching it proves nothing.
    h = e2e.headline(e2e.curves(_points(), ["step_auroc"]), "step_auroc", "edu-4", floor=0.75)
    assert h["token_ratio_ms8_over_actprm"] == pytest.approx(11000 / 800)  # still computed, for the record
    assert h["goal_20x_met"] is None and h["goal_30pct_met"] is None and len(h["note"]) == 2
    assert e2e.headline(e2e.curves(_points(), ["step_auroc"]), "step_auroc", "edu-4", floor=0.5)["goal_30pct_met"]
